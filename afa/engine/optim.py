"""AdamW with AFA's parameter groups and poly-warmup schedule (AFA.md §2)."""
from __future__ import annotations

import torch

from afa.models.network import AFANetwork, parameter_groups


def poly_warmup_multiplier(
    step: int, max_iters: int, warmup_iters: int = 1500, warmup_ratio: float = 1e-6, power: float = 1.0
) -> float:
    """Learning-rate multiplier at global step ``step`` (AFA.md §2).

    Linear warm-up from ``warmup_ratio`` while step < warmup_iters, then poly decay
    ``(1 - step / max_iters) ** power``.
    """
    if step < warmup_iters:
        return 1.0 - (1.0 - step / warmup_iters) * (1.0 - warmup_ratio)
    return max(0.0, 1.0 - step / max_iters) ** power


def build_optimizer(
    network: AFANetwork,
    lr: float = 6e-5,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    max_iters: int = 20000,
    warmup_iters: int = 1500,
    warmup_ratio: float = 1e-6,
    power: float = 1.0,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over AFA's parameter groups with the poly-warmup schedule (AFA.md §2).

    Call ``scheduler.step()`` after each ``optimizer.step()``: step t then runs at
    ``base_lr · poly_warmup_multiplier(t)``, as in the reference.
    """
    groups = parameter_groups(network, lr, weight_decay)
    for group in groups:
        if group["lr"] == 0.0:
            # AdamW with lr 0 leaves a parameter unchanged; skipping its gradient saves work.
            for parameter in group["params"]:
                parameter.requires_grad_(False)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)

    def multiplier(step: int) -> float:
        return poly_warmup_multiplier(step, max_iters, warmup_iters, warmup_ratio, power)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)

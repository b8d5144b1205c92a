"""The scale of the attention logits AFA's affinity starts from, for each encoder start.

AFA's affinity is a sigmoid of a 1×1 projection of the *unscaled* attention logits q kᵀ
(AFA.md §6). Where those logits are large, the freshly initialised projection saturates the
sigmoid (P near 0 or 1) and its gradient σ(1 − σ) vanishes, so the affinity hardly learns.
For the tiny MiT at the synthetic experiment's strides this prints, per start (random
weights, or a ``mit_*.pth`` file), the logits' standard deviation and largest magnitude and
the share of the initial P below 0.01 or above 0.99, on the first val images of the
benchmark (128 × 128 crops, one projection initialised with the given seed). A training
checkpoint (``train.py``'s ``*.pt``) is shown with its own trained projection instead: where
a run's logits and P stand at that iteration (``train.keep_last`` keeps a run's steps).

    python benchmarks/attention_scale.py weights/mit_tiny_synthetic_prior.pth runs/exp/prior_colour.pth
    python benchmarks/attention_scale.py runs/<run>/checkpoints/step_*.pt
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from afa.data.synthetic import generate_split_image  # noqa: E402
from afa.data.transforms import normalize_to_tensor  # noqa: E402
from afa.engine.checkpoint import load_checkpoint  # noqa: E402
from afa.models.network import AFANetwork, build_afa_network  # noqa: E402
from afa.models.weights import CheckpointError  # noqa: E402
from benchmarks.synthetic_proxy import network_from_checkpoint  # noqa: E402


def is_training_checkpoint(state: object) -> bool:
    """A loaded ``train.py`` checkpoint (the whole network and its config), not encoder weights."""
    return isinstance(state, dict) and {"model", "config"} <= state.keys()


def load_start(weights: Path | None) -> AFANetwork:
    """Random weights (None), a ``mit_*.pth`` encoder with a fresh projection, or the whole
    network of a training checkpoint (read once)."""
    if weights is not None and weights.is_file():
        try:
            state = load_checkpoint(weights)
        except (RuntimeError, TypeError):  # not a torch dict (safetensors, corrupt): see below
            state = None
        if is_training_checkpoint(state):
            return network_from_checkpoint(state)[0]
    # Encoder weights, or a missing or unreadable file, which the weights loader names.
    return build_afa_network("tiny", 8, strides=(4, 2, 1, 1), pretrained=None if weights is None else str(weights))


@torch.no_grad()
def attention_scale(weights: Path | None, images: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """Logit std / largest magnitude and P's saturated share for one start (a fresh
    projection) or one training checkpoint (its own projection)."""
    torch.manual_seed(seed)  # the same projection initialisation for every start
    network = load_start(weights)
    network.eval()
    _, attention = network.encoder(images, attention_images=images.shape[0])
    logits, affinity = attention.logits(), network.attn_proj(attention)
    return {"logit_std": logits.std().item(), "logit_absmax": logits.abs().max().item(),
            "p_below_0.01": (affinity < 0.01).float().mean().item(),
            "p_above_0.99": (affinity > 0.99).float().mean().item()}


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("weights", nargs="*", type=Path, help="mit_*.pth files (random weights are always shown)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    images = torch.stack([normalize_to_tensor(generate_split_image(0, "val", i).image[:128, :128])
                          for i in range(args.images)])
    lines = ["| start | logit std | logit max abs | P < 0.01 | P > 0.99 |", "|---|---|---|---|---|"]
    for weights in (None, *args.weights):
        try:
            numbers = attention_scale(weights, images, args.seed)
        except CheckpointError as error:
            raise SystemExit(f"error: {error}") from None
        lines.append(f"| {'random weights' if weights is None else weights} | {numbers['logit_std']:.2f} | "
                     f"{numbers['logit_absmax']:.1f} | {numbers['p_below_0.01']:.3f} | {numbers['p_above_0.99']:.3f} |")
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()

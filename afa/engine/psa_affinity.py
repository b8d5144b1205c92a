"""The PSA mode's affinity and random-walk computations on an AffinityNet (PSA.md §3-§5):
the training loss of a batch of crops and the pseudo labels of a batch of full images.

Both take any module mapping normalised images (B, 3, H, W) to features on the stride-8
grid (B, D, ⌈H/8⌉, ⌈W/8⌉), such as `afa.models.psa.AffinityNet`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from afa.ops import (
    PSA_RADIUS,
    PSA_STRIDE,
    affinity_pair_indices,
    affinity_pair_labels,
    feature_affinity,
    psa_affinity_loss,
    psa_random_walk,
    random_walk_label,
)


@dataclass(frozen=True)
class WalkOptions:
    """PSA.md §5: radius γ = 5, β = 8, t = 2^8."""

    radius: int = PSA_RADIUS
    beta: float = 8.0
    logt: int = 8


def affinity_training_loss(network: nn.Module, images: Tensor, grid_labels: Tensor,
                           radius: int = PSA_RADIUS) -> tuple[Tensor, dict[str, Tensor]]:
    """The AffinityNet loss of a batch of crops (PSA.md §3, §4).

    Args:
        images: (B, 3, S, S) normalised crops, S a multiple of 8.
        grid_labels: (B, S/8, S/8) int64 confident-region labels (0, 1..C, IGN).

    Returns:
        The loss L_bg+/4 + L_fg+/4 + L_−/2 and its three parts plus the pair counts.
    """
    features = network(images)
    height, width = features.shape[-2:]
    if tuple(grid_labels.shape[-2:]) != (height, width):
        raise ValueError(f"afa/engine/psa_affinity.py: features on a {height}x{width} grid, labels "
                         f"{tuple(grid_labels.shape[-2:])}; the network's stride must be {PSA_STRIDE}")
    origins, partners = affinity_pair_indices(height, width, radius, device=images.device)
    masks = affinity_pair_labels(grid_labels, origins, partners)
    loss, parts = psa_affinity_loss(feature_affinity(features, origins, partners), *masks)
    counts = {f"{name}_pairs": mask.sum() for name, mask in zip(("background_positive", "foreground_positive", "negative"), masks)}
    return loss, {**parts, **counts}


@torch.no_grad()
def random_walk_labels(network: nn.Module, images: Tensor, labels: Tensor, walk_scores: Tensor,
                       options: WalkOptions = WalkOptions()) -> Tensor:
    """Pseudo labels of full images by the random walk (PSA.md §5).

    The images are zero-padded (after normalisation) to a multiple of 8, as the reference
    pads image and CAM; the walked scores are upsampled and cropped back.

    Args:
        images: (B, 3, H, W) normalised, same size.
        labels: (B, C) multi-hot image labels.
        walk_scores: (B, 1 + C, ⌈H/8⌉, ⌈W/8⌉) X from the CAM stage.

    Returns:
        (B, H, W) int64 labels (0, 1..C).
    """
    height, width = images.shape[-2:]
    padded = F.pad(images, (0, -width % PSA_STRIDE, 0, -height % PSA_STRIDE))
    features = network(padded)
    grid = tuple(features.shape[-2:])
    if tuple(walk_scores.shape[-2:]) != grid:
        raise ValueError(f"afa/engine/psa_affinity.py: features on a {grid} grid, walk scores "
                         f"{tuple(walk_scores.shape[-2:])}; the network's stride must be {PSA_STRIDE}")
    origins, partners = affinity_pair_indices(*grid, options.radius, device=images.device)
    affinity = feature_affinity(features.float(), origins, partners)
    walked = psa_random_walk(walk_scores.float(), affinity, origins, partners, options.beta, options.logt)
    return random_walk_label(walked, labels, (height, width))

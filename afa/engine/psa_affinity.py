"""The PSA mode's affinity and random-walk computations on an AffinityNet (PSA.md §3-§5):
the training loss of a batch of crops and the pseudo labels of a batch of full images.

Both take any module mapping normalised images (B, 3, H, W) to features on the stride-8
grid (B, D, ⌈H/8⌉, ⌈W/8⌉), such as `afa.models.psa.AffinityNet`.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from afa.data.readers import DatasetError, write_index_mask
from afa.engine.psa_cam import WALK_SCORES, load_walk_scores
from afa.metrics import ConfusionMatrix, ReduceSum

from afa.ops import (
    PSA_RADIUS,
    PSA_STRIDE,
    affinity_pair_indices,
    affinity_pair_labels,
    psa_affinity_loss,
    psa_random_walk,
    random_walk_label,
    window_feature_affinity,
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
    loss, parts = psa_affinity_loss(window_feature_affinity(features, radius), *masks)
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
    affinity = window_feature_affinity(features.float(), options.radius)
    walked = psa_random_walk(walk_scores.float(), affinity, origins, partners, options.beta, options.logt)
    return random_walk_label(walked, labels, (height, width))


PSEUDO_LABELS = "pseudo_labels"


class WithWalkScores(Dataset):
    """A full-image dataset's samples plus ``walk_scores`` (1 + C, h, w), the CAM stage's X of
    that image, read in the loader's workers.

    Args:
        dataset: samples with ``name``, ``image``, ``labels`` (e.g. FullImageEvalDataset).
        cam_dir: the CAM stage's output folder (holding ``walk_scores/``).
        num_classes: foreground classes C.
    """

    def __init__(self, dataset: Dataset, cam_dir: str | Path, num_classes: int) -> None:
        self.dataset, self.folder, self.num_classes = dataset, Path(cam_dir) / WALK_SCORES, int(num_classes)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def image_sizes(self) -> list[tuple[int, int]]:
        return self.dataset.image_sizes

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.dataset[index])
        path = self.folder / f"{sample['name']}.npz"
        if not path.is_file():
            raise DatasetError(f"{path} does not exist: run the CAM stage first (method.stage=cam)")
        sample["walk_scores"] = load_walk_scores(path, self.num_classes)
        return sample


def write_walk_labels(network: nn.Module, batches: Iterable[dict], out_dir: Path, num_classes: int,
                      options: WalkOptions, device: torch.device, scored: bool | None = None,
                      reduce_sum: ReduceSum | None = None) -> dict | None:
    """Random-walk pseudo labels (PSA.md §5) of every image as palette PNGs in
    ``out_dir/pseudo_labels`` (readable as a dataset's masks); returns their metrics against
    the masks (summed over ranks by ``reduce_sum``) when ``scored`` (None: when the batches
    carried masks, for one process), else None.

    Args:
        batches: samples of :class:`WithWalkScores` collated by size.
    """
    (out_dir / PSEUDO_LABELS).mkdir(parents=True, exist_ok=True)
    matrix, carried_masks = ConfusionMatrix(num_classes + 1, device=device), False
    network.eval()
    for batch in batches:
        labels = random_walk_labels(network, batch["image"].to(device), batch["labels"].to(device),
                                    batch["walk_scores"].to(device), options)
        if "mask" in batch:
            matrix.update(labels, batch["mask"].to(device))
            carried_masks = True
        for name, label in zip(batch["name"], labels.cpu().numpy().astype(np.uint8)):
            write_index_mask(out_dir / PSEUDO_LABELS / f"{name}.png", label)
    scored = carried_masks if scored is None else scored  # given by the caller: the reduce is collective
    return matrix.reduce_(reduce_sum).compute() if scored else None

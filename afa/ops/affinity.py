"""Local windows, affinity labels and the affinity loss (AFA.md §6)."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from afa.constants import IGNORE_INDEX


@functools.lru_cache(maxsize=16)
def _window_mask(height: int, width: int, radius: int, device: torch.device) -> Tensor:
    index = torch.arange(height * width, device=device)
    rows, cols = index // width, index % width
    near_rows = (rows[:, None] - rows[None, :]).abs() <= radius  # (N, N)
    near_cols = (cols[:, None] - cols[None, :]).abs() <= radius
    return near_rows & near_cols


def local_window_mask(height: int, width: int, radius: int, device: torch.device | str = "cpu") -> Tensor:
    """Pairs of grid nodes within the radius-r window: |Δrow| ≤ r and |Δcol| ≤ r (AFA.md §6).

    Built once per (height, width, radius, device) and cached: treat it as read-only.

    Args:
        height: grid rows.
        width: grid columns.
        radius: window radius r.
        device: where the mask lives.

    Returns:
        (N, N) bool with N = height · width, nodes flattened row-major; symmetric.
    """
    return _window_mask(height, width, radius, torch.device(device))


@functools.lru_cache(maxsize=16)
def _window_neighbours(height: int, width: int, radius: int, device: torch.device) -> tuple[Tensor, Tensor]:
    index = torch.arange(height * width, device=device)
    rows, cols = index // width, index % width
    reach_rows, reach_cols = min(radius, height - 1), min(radius, width - 1)  # no slots beyond the grid
    row_offsets = torch.arange(-reach_rows, reach_rows + 1, device=device)
    col_offsets = torch.arange(-reach_cols, reach_cols + 1, device=device)
    neighbour_rows = rows[:, None, None] + row_offsets[None, :, None]  # (N, 2r+1, 1)
    neighbour_cols = cols[:, None, None] + col_offsets[None, None, :]  # (N, 1, 2r+1)
    valid = (neighbour_rows >= 0) & (neighbour_rows < height) & (neighbour_cols >= 0) & (neighbour_cols < width)
    flat = neighbour_rows.clamp(0, height - 1) * width + neighbour_cols.clamp(0, width - 1)
    return flat.reshape(height * width, -1), valid.reshape(height * width, -1)


def local_window_neighbours(
    height: int, width: int, radius: int, device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """The radius-r window as a neighbour list: the sparse form of `local_window_mask`.

    Built once per (height, width, radius, device) and cached: treat it as read-only.

    Returns:
        index: (N, M) int64, node of each window slot (M = (2r'+1)², r' capped by the grid).
        valid: (N, M) bool, False for slots that fall outside the grid (their index is a
            clamped, in-range node).
    """
    return _window_neighbours(height, width, radius, torch.device(device))


def labels_on_grid(labels: Tensor, grid: tuple[int, int]) -> Tensor:
    """A label map on the affinity grid, flattened: nearest downsampling (AFA.md §6).

    Args:
        labels: (B, H, W) int64 class ids (255 ignored).
        grid: (h, w) of the affinity grid.

    Returns:
        (B, h·w) int64.
    """
    small = F.interpolate(labels[:, None].float(), size=grid, mode="nearest")  # label ids ≤ 255 are exact
    return small.flatten(1).long()


def affinity_labels_from_segmentation(
    labels: Tensor, grid_size: int | tuple[int, int], radius: int = 8,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Pairwise affinity targets from a refined label map (AFA.md §6).

    The label is downsampled to the grid (nearest) and flattened; Y_ij = 1 if l_i = l_j,
    0 otherwise, ignore if l_i or l_j is ignored or j is outside the window of i.

    Args:
        labels: (B, H, W) int64 refined pseudo labels.
        grid_size: (h, w) of the affinity grid (H/16, W/16), or one int for a square grid.
        radius: window radius r.
        ignore_index: label of ignored pixels and pairs.

    Returns:
        (B, N, N) uint8 with N = h · w; values 0, 1 or ignore_index.
    """
    grid = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    small = labels_on_grid(labels, grid)  # (B, N)
    same = small[:, :, None] == small[:, None, :]  # (B, N, N)
    ignored = small == ignore_index
    window = local_window_mask(grid[0], grid[1], radius, labels.device)
    invalid = ignored[:, :, None] | ignored[:, None, :] | ~window
    return same.to(torch.uint8).masked_fill_(invalid, ignore_index)


def affinity_loss(affinity: Tensor, affinity_targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """L_aff = ½ Σ[Y=1](1 − P)/(#[Y=1] + 1) + ½ Σ[Y=0] P/(#[Y=0] + 1), sums over the batch (AFA.md §6).

    Args:
        affinity: (B, N, N) predicted affinity P in (0, 1).
        affinity_targets: (B, N, N) Y from `affinity_labels_from_segmentation`.

    Returns:
        loss: scalar float32.
        counts: {"positive_pairs", "negative_pairs"}: int64 scalars (no host sync).
    """
    prediction = affinity.float()  # sums over B·N² terms need float32 under autocast
    positive = affinity_targets == 1
    negative = affinity_targets == 0
    positive_count = positive.sum()
    negative_count = negative.sum()
    positive_loss = torch.where(positive, 1.0 - prediction, 0.0).sum() / (positive_count + 1)
    negative_loss = torch.where(negative, prediction, 0.0).sum() / (negative_count + 1)
    loss = 0.5 * positive_loss + 0.5 * negative_loss
    return loss, {"positive_pairs": positive_count, "negative_pairs": negative_count}

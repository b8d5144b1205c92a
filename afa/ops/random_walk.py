"""Propagation of CAMs by a random walk on the attention affinity (AFA.md §7, §10)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from afa.constants import IGNORE_INDEX
from afa.ops.affinity import local_window_mask, local_window_neighbours
from afa.ops.boxes import valid_box_mask
from afa.ops.cam import combine_threshold_labels
from afa.ops.classes import class_channel_index, threshold_class_scores
from afa.ops.par import DEFAULT_DILATIONS, pixel_adaptive_refinement_in_boxes
from afa.ops.sparse import fixed_width_csr, index_dtype_for


def random_walk_transition(affinity: Tensor, window: Tensor, power: int = 2) -> Tensor:
    """T from the affinity (AFA.md §7): W = P ⊙ window; W ← W^∘power; T_ij = W_ij / (Σ_i W_ij + 0.1).

    Columns are normalised (+0.1 guards empty columns), so T is not symmetric even for a
    symmetric P; W is. Float32; the input is not modified.

    Args:
        affinity: (B, N, N) P.
        window: (N, N) bool from `local_window_mask`.
        power: elementwise power.

    Returns:
        (B, N, N) float32.
    """
    weights = affinity.float() * window  # new tensor: the caller's affinity stays intact
    if power != 1:
        weights.pow_(power)
    return weights.div_(weights.sum(dim=1, keepdim=True) + 0.1)


def _propagate_in_window(
    cams_on_grid: Tensor, labels: Tensor, class_ids: Tensor, affinity: Tensor, grid: tuple[int, int],
    radius: int, thresholds: tuple[float, ...], power: int = 2,
) -> Tensor:
    """X' = X T straight from the affinity (AFA.md §7), exploiting the window's sparsity.

    Only the (2r+1)² window entries of each column of W are gathered (12.5% of N² at 48×48,
    r = 8), the product runs as one block-diagonal sparse matrix over the batch, and the
    column normalisation of T divides the result instead of the N×N matrix:
    X T = (X W) / (Σ_i W_ij + 0.1). On CUDA, or when the window covers much of the grid,
    the dense masked T with one bmm is faster (measured: benchmarks/bench_ops.py), so that
    path is taken instead; both give the same numbers.

    Args:
        cams_on_grid: (B, C, N) CAMs on the grid.
        labels: (B, C) multi-hot.
        class_ids: (B, K') kept class ids.
        affinity: (B, N, N) P.
        grid: (h, w) with h·w = N.
        radius: window radius r.
        thresholds: background scores τ.
        power: elementwise power of W.

    Returns:
        (B, len(thresholds), K', N) float32.
    """
    batch, nodes = affinity.shape[0], affinity.shape[-1]
    device = affinity.device
    neighbours, valid = local_window_neighbours(grid[0], grid[1], radius, device)  # (N, M)
    slots = neighbours.shape[1]
    if device.type == "cuda" or 2 * slots > nodes:
        transition = random_walk_transition(affinity, local_window_mask(*grid, radius, device), power)
        return _propagate(cams_on_grid, labels, class_ids, transition, thresholds)
    scores = threshold_class_scores(cams_on_grid, labels, class_ids, thresholds)  # (B, t, K', N)
    rows = scores.shape[1] * scores.shape[2]
    with torch.autocast(device_type=device.type, enabled=False):
        # Column j of W: P[i, j] for i in the window of j (the window is symmetric).
        column_entries = neighbours * nodes + torch.arange(nodes, device=device)[:, None]  # (N, M)
        weights = affinity.flatten(1)[:, column_entries.flatten()].view(batch, nodes, slots).float()
        weights = torch.where(valid, weights, 0.0)
        if power != 1:
            weights.pow_(power)
        column_sums = weights.sum(dim=2)  # (B, N): Σ_i W_ij
        columns = neighbours[None] + (torch.arange(batch, device=device) * nodes)[:, None, None]  # (B, N, M)
        # Wᵀ, block-diagonal over images: row j lists column j of W.
        transposed = fixed_width_csr(
            columns.flatten().to(index_dtype_for(weights.numel())), weights.flatten(), batch * nodes)
        state = scores.flatten(1, 2).transpose(1, 2).reshape(batch * nodes, rows)  # (B·N, t·K') Xᵀ
        propagated = (transposed @ state).view(batch, nodes, rows) / (column_sums[:, :, None] + 0.1)
    return propagated.transpose(1, 2).reshape(scores.shape)


def _propagate(
    cams_on_grid: Tensor, labels: Tensor, class_ids: Tensor, transition: Tensor,
    thresholds: tuple[float, ...],
) -> Tensor:
    """X' = X T for every threshold in one batched product (AFA.md §7).

    Args:
        cams_on_grid: (B, C, N) CAMs on the grid.
        labels: (B, C) multi-hot.
        class_ids: (B, K') kept class ids.
        transition: (B, N, N) T.
        thresholds: background scores τ.

    Returns:
        (B, len(thresholds), K', N) float32.
    """
    scores = threshold_class_scores(cams_on_grid, labels, class_ids, thresholds)  # (B, t, K', N)
    with torch.autocast(device_type=transition.device.type, enabled=False):
        # All thresholds share T: stacking them as rows avoids repeating the N×N matrix.
        propagated = torch.bmm(scores.flatten(1, 2), transition.float())  # (B, t·K', N)
    return propagated.view_as(scores)


def propagate_cams(
    valid_cams_on_grid: Tensor, labels: Tensor, transition: Tensor, bkg_score: float,
) -> Tensor:
    """One random-walk step with background τ = bkg_score (AFA.md §7).

    X = softmax over background + present classes of [τ; valid_cam] (absent = 0); X' = X T.

    Args:
        valid_cams_on_grid: (B, C, h, w) or (B, C, N) CAMs resized to the grid.
        labels: (B, C) multi-hot.
        transition: (B, N, N) from `random_walk_transition`.
        bkg_score: background score τ.

    Returns:
        (B, K, N) float32, absent classes 0.
    """
    return propagate_cams_per_threshold(valid_cams_on_grid, labels, transition, (bkg_score,))[:, 0]


def propagate_cams_per_threshold(
    valid_cams_on_grid: Tensor, labels: Tensor, transition: Tensor, thresholds: Sequence[float],
) -> Tensor:
    """`propagate_cams` for several background scores in one product (AFA.md §7).

    Args:
        valid_cams_on_grid: (B, C, h, w) or (B, C, N) CAMs resized to the grid.
        labels: (B, C) multi-hot.
        transition: (B, N, N) from `random_walk_transition`.
        thresholds: background scores τ.

    Returns:
        (B, len(thresholds), K, N) float32, absent classes 0.
    """
    class_ids = class_channel_index(labels)
    return _propagate(valid_cams_on_grid.flatten(2), labels, class_ids, transition, tuple(thresholds))


def propagate_cams_in_window(
    valid_cams_on_grid: Tensor, labels: Tensor, affinity: Tensor, thresholds: Sequence[float],
    radius: int = 8, power: int = 2,
) -> Tensor:
    """`propagate_cams_per_threshold` straight from the affinity, with the window as a sparse
    structure instead of a dense mask and T never formed (AFA.md §7). Same result.

    Args:
        valid_cams_on_grid: (B, C, h, w) CAMs resized to the grid.
        labels: (B, C) multi-hot.
        affinity: (B, N, N) P with N = h·w.
        thresholds: background scores τ.
        radius: window radius r.
        power: elementwise power of W.

    Returns:
        (B, len(thresholds), K, N) float32, absent classes 0.
    """
    grid = _grid_from_nodes(affinity.shape[-1], tuple(valid_cams_on_grid.shape[-2:]))
    return _propagate_in_window(valid_cams_on_grid.flatten(2), labels, class_channel_index(labels), affinity,
                                grid, radius, tuple(thresholds), power)


def _grid_from_nodes(nodes: int, grid_size: tuple[int, int] | None) -> tuple[int, int]:
    if grid_size is not None:
        if grid_size[0] * grid_size[1] != nodes:
            raise ValueError(
                f"afa/ops/random_walk.py: grid_size {grid_size} has {grid_size[0] * grid_size[1]} nodes "
                f"but the affinity has N={nodes}; pass the stage-4 grid of the affinity's forward")
        return grid_size
    side = math.isqrt(nodes)
    if side * side != nodes:
        raise ValueError(
            f"afa/ops/random_walk.py: affinity has N={nodes} nodes, not a square grid; pass grid_size=(h, w)")
    return side, side


def propagate_cams_with_affinity(
    cams: Tensor, labels: Tensor, affinity: Tensor, images: Tensor, valid_boxes: Tensor,
    thresholds: tuple[float, float] = (0.35, 0.55), radius: int = 8,
    grid_size: tuple[int, int] | None = None, dilations: Sequence[int] = DEFAULT_DILATIONS,
    num_iterations: int = 10, w1: float = 0.3, w2: float = 0.01,
    max_classes_per_image: int | None = None, ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """The affinity-propagated training label (AFA.md §7).

    valid_cam resized to the grid (bilinear); τ prepended, softmax over present channels;
    X' = X T; upsampled to (H, W); PAR per image inside its valid box on the image
    downsampled by 2 (no extra softmax, see `pixel_adaptive_refinement_in_boxes`, exact vs
    cropping each image); argmax. Both thresholds share T and the PAR kernel, stacked along
    channels in one call; combined as in §5; ignore outside the valid box.

    Args:
        cams: (B, C, H, W) normalised CAMs (absent classes are masked here).
        labels: (B, C) multi-hot.
        affinity: (B, N, N) P of the largest CAM scale.
        images: (B, 3, H, W) images (normalised or 0–255).
        valid_boxes: (B, 4) int64 (top, bottom, left, right), half-open, each ≥ 2×2.
        thresholds: the two background scores; the larger is `high`, order does not matter.
        radius: window radius r.
        grid_size: (h, w) with h·w = N; None: a square grid.
        max_classes_per_image: optional bound on foreground classes per image (see
            `refine_cams_with_par`).
        ignore_index: label of ignored pixels.

    Returns:
        (B, H, W) int64.
    """
    batch, _, height, width = cams.shape
    grid = _grid_from_nodes(affinity.shape[-1], grid_size)
    high, low = max(thresholds), min(thresholds)
    class_ids = class_channel_index(
        labels, None if max_classes_per_image is None else max_classes_per_image + 1)
    kept = class_ids.shape[1]
    with torch.autocast(device_type=cams.device.type, enabled=False):
        # Absent classes are masked by the softmax, so resizing cams equals resizing valid_cam.
        on_grid = F.interpolate(cams.float(), size=grid, mode="bilinear", align_corners=False)
        propagated = _propagate_in_window(
            on_grid.flatten(2), labels, class_ids, affinity, grid, radius, (high, low))  # (B, 2, K', N)
        propagated = F.interpolate(
            propagated.view(batch, 2 * kept, *grid), size=(height, width), mode="bilinear", align_corners=False)
        refined = pixel_adaptive_refinement_in_boxes(
            images, propagated, valid_boxes, dilations, num_iterations, w1, w2)  # (B, 2K', H, W)
    slots = refined.view(batch, 2, kept, height, width).argmax(dim=2)  # (B, 2, H, W)
    label = class_ids.gather(1, slots.flatten(1)).view(batch, 2, height, width)
    inside = valid_box_mask(valid_boxes, height, width)
    return combine_threshold_labels(label[:, 0], label[:, 1], inside, ignore_index)


def propagate_cams_for_evaluation(
    cams: Tensor, labels: Tensor, affinity: Tensor, bkg_score: float = 0.35, radius: int = 8,
    grid_size: tuple[int, int] | None = None,
) -> Tensor:
    """Propagated-CAM label for §10's evaluation: random walk, upsample, argmax; no PAR.

    AFA.md §10 (τ = 0.35, grid ⌈h/16⌉×⌈w/16⌉, r = 8) names no PAR, and the reference's
    validation applies none, so neither do we. The CAMs are whatever the caller evaluates
    (the reference passes the multi-scale CAM resized to the label, with the affinity of a
    single-scale forward).

    Args:
        cams: (B, C, H, W) normalised CAMs at label resolution (absent classes masked here).
        labels: (B, C) multi-hot.
        affinity: (B, N, N) P of the forward at the image's size.
        bkg_score: background score τ.
        radius: window radius r.
        grid_size: (h, w) with h·w = N; None: (⌈H/16⌉, ⌈W/16⌉).

    Returns:
        (B, H, W) int64 class ids.
    """
    height, width = cams.shape[-2:]
    grid = grid_size if grid_size is not None else (-(-height // 16), -(-width // 16))
    grid = _grid_from_nodes(affinity.shape[-1], grid)
    with torch.autocast(device_type=cams.device.type, enabled=False):
        on_grid = F.interpolate(cams.float(), size=grid, mode="bilinear", align_corners=False)
        class_ids = class_channel_index(labels)
        propagated = _propagate_in_window(
            on_grid.flatten(2), labels, class_ids, affinity, grid, radius, (bkg_score,))[:, 0]  # (B, K, N)
        propagated = F.interpolate(
            propagated.unflatten(2, grid), size=(height, width), mode="bilinear", align_corners=False)
    # Absent classes are 0 and present ones ≥ 0, so ties go to the lower id, as per image.
    return propagated.argmax(dim=1)

"""Propagation of CAMs by a random walk on the attention affinity (AFA.md §7, §10)."""
from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from afa.constants import IGNORE_INDEX
from afa.ops.affinity import local_window_mask, local_window_neighbours
from afa.ops.cam import label_from_threshold_scores
from afa.ops.classes import class_channel_index, threshold_class_scores
from afa.ops.par import DEFAULT_DILATIONS, pixel_adaptive_refinement_in_boxes
from afa.ops.sparse import fixed_width_csr, index_dtype_for

# The random walk's two products with the same result: a dense masked N×N T, or a sparse
# product over the window only. The caller picks (by device: docs/ops-notes.md).
RandomWalkImplementation = Literal["dense", "windowed"]


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


def _random_walk(
    cams_on_grid: Tensor, labels: Tensor, class_ids: Tensor, affinity: Tensor, grid: tuple[int, int],
    radius: int, thresholds: tuple[float, ...], implementation: RandomWalkImplementation, power: int = 2,
) -> Tensor:
    """X' = X T for every threshold in one product (AFA.md §7); both implementations agree.

    X: τ prepended, softmax over the kept present channels (`threshold_class_scores`); all
    thresholds share T, so they are stacked as rows. "dense": T as the masked N×N matrix
    (`random_walk_transition`) and one bmm. "windowed": only the (2r+1)² window entries of
    each column of W are gathered, the product runs as one block-diagonal sparse matrix over
    the batch, and T's column normalisation divides the result instead of the N×N matrix:
    X T = (X W) / (Σ_i W_ij + 0.1). Where the window covers over half the grid the sparse
    form saves nothing, so "windowed" takes the dense product there (docs/ops-notes.md).

    Args:
        cams_on_grid: (B, C, N) CAMs on the grid.
        labels: (B, C) multi-hot.
        class_ids: (B, K') kept class ids.
        affinity: (B, N, N) P.
        grid: (h, w) with h·w = N.
        radius: window radius r.
        thresholds: background scores τ.
        implementation: "dense" or "windowed".
        power: elementwise power of W.

    Returns:
        (B, len(thresholds), K', N) float32.
    """
    if implementation not in ("dense", "windowed"):
        raise ValueError(
            f"afa/ops/random_walk.py: implementation {implementation!r}; pass \"dense\" or \"windowed\"")
    batch, nodes = affinity.shape[0], affinity.shape[-1]
    device = affinity.device
    scores = threshold_class_scores(cams_on_grid, labels, class_ids, thresholds)  # (B, t, K', N)
    rows = scores.shape[1] * scores.shape[2]
    neighbours, valid = local_window_neighbours(grid[0], grid[1], radius, device)  # (N, M), cached
    slots = neighbours.shape[1]
    with torch.autocast(device_type=device.type, enabled=False):
        if implementation == "dense" or 2 * slots > nodes:
            transition = random_walk_transition(affinity, local_window_mask(*grid, radius, device), power)
            return torch.bmm(scores.flatten(1, 2), transition.float()).view_as(scores)  # rows (B, t·K', N)
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
    cams: Tensor, labels: Tensor, affinity: Tensor, images: Tensor | None = None,
    valid_boxes: Tensor | None = None, *, implementation: RandomWalkImplementation,
    thresholds: Sequence[float] = (0.35, 0.55), radius: int = 8, grid_size: tuple[int, int] | None = None,
    dilations: Sequence[int] = DEFAULT_DILATIONS, num_iterations: int = 10, w1: float = 0.3, w2: float = 0.01,
    max_classes_per_image: int | None = None, ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """The affinity-propagated label: §7's training label, or §10's evaluation label.

    CAMs resized to the grid (bilinear; absent classes are masked by the softmax, so this
    equals resizing valid_cam); per τ, τ prepended, softmax over present channels, X' = X T;
    upsampled to (H, W) (bilinear); argmax.
    Training (images and valid_boxes given, two τ): before the argmax, PAR per image inside
    its valid box on the image downsampled by 2 (no extra softmax, see
    `pixel_adaptive_refinement_in_boxes`, exact vs cropping each image); both τ share T and
    the PAR kernel, stacked along channels in one call; combined as in §5, ignore outside
    the valid box.
    Evaluation (neither given, one τ): no PAR, as AFA.md §10 names none and the reference's
    validation applies none. The CAMs are whatever the caller evaluates (the reference
    passes the multi-scale CAM resized to the label, with the affinity of a single-scale
    forward at the image's size).

    Args:
        cams: (B, C, H, W) normalised CAMs (absent classes are masked here).
        labels: (B, C) multi-hot.
        affinity: (B, N, N) P (training: of the largest CAM scale).
        images: (B, 3, H, W) images (normalised or 0–255), for the training label.
        valid_boxes: (B, 4) int64 (top, bottom, left, right), half-open, each ≥ 2×2, for the
            training label.
        implementation: the random walk's product, "dense" or "windowed" (same result; which
            is faster depends on the device, docs/ops-notes.md).
        thresholds: background scores τ: two for the training label (the larger is `high`,
            order does not matter), one for the evaluation label.
        radius: window radius r.
        grid_size: (h, w) with h·w = N; None: a square grid.
        max_classes_per_image: optional bound on foreground classes per image (see
            `refine_cams_with_par`).
        ignore_index: label of ignored pixels.

    Returns:
        (B, H, W) int64.
    """
    training = images is not None
    if training != (valid_boxes is not None) or len(thresholds) != (2 if training else 1):
        raise ValueError(
            "afa/ops/random_walk.py propagate_cams_with_affinity: pass images, valid_boxes and two "
            f"thresholds (training label) or none of them and one threshold (evaluation); got images "
            f"{'set' if training else 'None'}, valid_boxes {'None' if valid_boxes is None else 'set'}, "
            f"thresholds {tuple(thresholds)}")
    batch, _, height, width = cams.shape
    grid = _grid_from_nodes(affinity.shape[-1], grid_size)
    taus = (max(thresholds), min(thresholds)) if training else tuple(thresholds)
    class_ids = class_channel_index(
        labels, None if max_classes_per_image is None else max_classes_per_image + 1)
    with torch.autocast(device_type=cams.device.type, enabled=False):
        on_grid = F.interpolate(cams.float(), size=grid, mode="bilinear", align_corners=False)
        propagated = _random_walk(
            on_grid.flatten(2), labels, class_ids, affinity, grid, radius, taus, implementation)  # (B, t, K', N)
        scores = F.interpolate(
            propagated.view(batch, -1, *grid), size=(height, width), mode="bilinear", align_corners=False)
        if training:
            scores = pixel_adaptive_refinement_in_boxes(
                images, scores, valid_boxes, dilations, num_iterations, w1, w2)  # (B, 2K', H, W)
    # Absent classes are 0 and present ones ≥ 0, so ties go to the lower id, as per image.
    return label_from_threshold_scores(scores, class_ids, valid_boxes, ignore_index)

"""PAR, pixel-adaptive refinement, for a whole batch at once (AFA.md §5).

Design. One PAR step, M ← Σ_k κ_k · M_k over 48 replicate-padded neighbours, is the same
sparse linear map for every channel and every iteration of an image. We build it once as a
CSR matrix of size (B·h·w)², block-diagonal over images, 48 entries a row (column = flat
index of the neighbour, value = κ_k), and apply it with one sparse-dense product per
iteration to the channels-last masks (B·h·w, K'): one pass over the masks per iteration,
not 48 (shifted slices), and no 48-fold copy (gathered neighbours); measurements in
docs/ops-notes.md. Replicate padding is a clamp of the neighbour's coordinates, so a
per-image valid extent (AFA.md §7, PAR inside each valid box) is only a different clamp
bound per image: no loop and no difference from PAR on the cropped image.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from afa.constants import IGNORE_INDEX
from afa.ops.boxes import resample_boxes_bilinear
from afa.ops.cam import label_from_threshold_scores
from afa.ops.classes import class_channel_index, threshold_class_scores
from afa.ops.sparse import fixed_width_csr, index_dtype_for

DEFAULT_DILATIONS: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
# PAR runs on the image downsampled by this factor (AFA.md §5, §7).
PAR_DOWN_SCALE = 2
# Order of the 8 neighbours within a dilation (AFA.md §5).
_DIRECTIONS: tuple[tuple[int, int], ...] = (
    (-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def neighbour_offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    """The (row, column) offsets of PAR's neighbours, 8 per dilation (AFA.md §5)."""
    return [(dy * d, dx * d) for d in dilations for dy, dx in _DIRECTIONS]


@functools.lru_cache(maxsize=32)
def _position_kernel(dilations: tuple[int, ...], w1: float, w2: float, device: torch.device) -> Tensor:
    """w2 · softmax_k(b_k), the image-independent part of κ (AFA.md §5); cached: it depends
    only on the dilations. Returns (n,) float32 with n = 8 · len(dilations)."""
    root2 = torch.tensor(math.sqrt(2.0), dtype=torch.float32)
    distances = torch.stack([
        (root2 if dy != 0 and dx != 0 else torch.tensor(1.0)) * d
        for d in dilations for dy, dx in _DIRECTIONS])
    logits = -(distances / (distances.std() + 1e-8) / w1) ** 2
    return (w2 * torch.softmax(logits, dim=0)).to(device)


@functools.lru_cache(maxsize=32)
def _offset_tensors(offsets: tuple[tuple[int, int], ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """Row and column offsets as (n,) int64 tensors on `device`; cached so that the copy to
    the device happens once, not per call."""
    table = torch.tensor(offsets, dtype=torch.int64).to(device)
    return table[:, 0], table[:, 1]


def _padded_coordinates(length: int, pad: int, extents: Tensor | None, device: torch.device) -> Tensor:
    """Source coordinate of every position of a replicate-padded axis.

    Args:
        length: the axis length.
        pad: padding on each side.
        extents: (B,) int64 valid lengths (positions ≥ extent replicate the last valid one),
            or None for the full length.

    Returns:
        (B or 1, length + 2·pad) int64.
    """
    coordinates = torch.arange(-pad, length + pad, device=device).clamp_min(0)[None]
    if extents is None:
        return coordinates.clamp_max(length - 1)
    return torch.minimum(coordinates, (extents[:, None] - 1).clamp_min(0))


def _appearance_logits(padded: Tensor, dilations: tuple[int, ...], pad: int, w1: float) -> Tensor:
    """a_k = mean over RGB of −(|I_k − I| / (σ_I + 1e-8) / w1)² (AFA.md §5).

    Neighbours are stacked one dilation (8 of them) at a time, never all 48 at once; a few
    dozen kernels in all, so the GPU is not bound by launches.

    Args:
        padded: (B, 3, h + 2·pad, w + 2·pad) float32 replicate-padded image.
        dilations: neighbour rings.
        pad: the padding (≥ every dilation).
        w1: appearance temperature.

    Returns:
        (B, n, h, w) float32, n = 8 · len(dilations), neighbours in `neighbour_offsets` order.
    """
    height, width = padded.shape[2] - 2 * pad, padded.shape[3] - 2 * pad

    def ring(d: int) -> Tensor:  # (B, 3, 8, h, w): the 8 neighbours at dilation d
        return torch.stack([padded[:, :, pad + dy * d:pad + dy * d + height, pad + dx * d:pad + dx * d + width]
                            for dy, dx in _DIRECTIONS], dim=2)

    count = 8 * len(dilations)
    mean = sum(ring(d).sum(dim=2) for d in dilations) / count
    # Two passes (mean, then squared deviations) as torch.std does: one-pass sums lose
    # precision in flat regions, where σ_I is small and divides the difference.
    variance = sum((ring(d) - mean[:, :, None]).square_().sum(dim=2) for d in dilations)
    scale = (variance / (count - 1)).sqrt_().add_(1e-8)[:, :, None]  # σ_I + 1e-8, unbiased
    centre = padded[:, :, None, pad:pad + height, pad:pad + width]
    logits = [(ring(d) - centre).abs_().div_(scale).div_(w1).square_().neg_().mean(dim=1) for d in dilations]
    return torch.cat(logits, dim=1)


def _neighbour_columns(
    rows: Tensor, cols: Tensor, offsets: list[tuple[int, int]], pad: int, height: int, width: int,
    dtype: torch.dtype,
) -> Tensor:
    """Flat index (into B·h·w) of every pixel's n neighbours, replicate-clamped.

    Args:
        rows: (B, h + 2·pad) source row of each padded row.
        cols: (B, w + 2·pad) source column of each padded column.
        dtype: index dtype (int32 keeps the (B, h, w, n) result at half the memory).

    Returns:
        (B, h, w, n) contiguous, in `dtype`.
    """
    device = rows.device
    batch = rows.shape[0]
    dy, dx = _offset_tensors(tuple(offsets), device)
    row_positions = pad + torch.arange(height, device=device)[:, None] + dy[None]  # (h, n)
    col_positions = pad + torch.arange(width, device=device)[:, None] + dx[None]  # (w, n)
    image_starts = torch.arange(batch, device=device, dtype=dtype) * (height * width)
    first_rows = rows.to(dtype) * width + image_starts[:, None]  # (B, h + 2·pad) flat index of row starts
    neighbour_rows = first_rows[:, row_positions]  # (B, h, n): flat index of the row start
    neighbour_cols = cols.to(dtype)[:, col_positions]  # (B, w, n)
    return neighbour_rows[:, :, None, :] + neighbour_cols[:, None, :, :]  # one pass in (B, h, w, n) layout


def _par_operator(
    images: Tensor, dilations: tuple[int, ...], w1: float, w2: float, extents: Tensor | None,
) -> Tensor:
    """The PAR step as a block-diagonal CSR matrix (B·h·w, B·h·w), 48 entries a row.

    Args:
        images: (B, 3, h, w) float32.
        extents: (B, 2) int64 valid (height, width) at the top-left, or None for all.

    Returns:
        sparse CSR float32 (dense for inputs under 48 pixels); row p holds κ_k(p) at the
        column of p's k-th neighbour.
    """
    batch, _, height, width = images.shape
    device = images.device
    offsets = neighbour_offsets(dilations)
    pad = max(dilations)
    rows = _padded_coordinates(height, pad, None if extents is None else extents[:, 0], device)
    cols = _padded_coordinates(width, pad, None if extents is None else extents[:, 1], device)
    rows, cols = rows.expand(batch, -1), cols.expand(batch, -1)
    padded = images.gather(2, rows[:, None, :, None].expand(batch, 3, -1, width))
    padded = padded.gather(3, cols[:, None, None, :].expand(batch, 3, padded.shape[2], -1))
    kernel = torch.softmax(_appearance_logits(padded, dilations, pad, w1), dim=1)  # (B, n, h, w)
    kernel = kernel.add_(_position_kernel(tuple(dilations), w1, w2, device)[None, :, None, None])
    values = kernel.permute(0, 2, 3, 1).reshape(-1)  # row-major (B, h, w, n)
    size = batch * height * width
    columns = _neighbour_columns(rows, cols, offsets, pad, height, width, index_dtype_for(values.numel()))
    columns = columns.reshape(-1)
    if size < len(offsets):  # tiny inputs: cuSPARSE rejects nnz > size², so sum duplicates densely
        row_ids = torch.arange(size, device=device).repeat_interleave(len(offsets))
        return torch.zeros(size, size, device=device).index_put_((row_ids, columns.long()), values, accumulate=True)
    return fixed_width_csr(columns, values, size)


def pixel_adaptive_refinement(
    images: Tensor, masks: Tensor, dilations: Sequence[int] = DEFAULT_DILATIONS,
    num_iterations: int = 10, w1: float = 0.3, w2: float = 0.01, extents: Tensor | None = None,
) -> Tensor:
    """PAR (AFA.md §5) on a batch; float32 throughout, also under autocast.

    The kernel is invariant to a per-channel affine change of the image (|I_k − I| / σ_I),
    so normalised or 0–255 images give the same result up to the 1e-8 guard.

    Args:
        images: (B, 3, h, w).
        masks: (B, K', h', w'), resized to (h, w) bilinear with align_corners=True.
        dilations: neighbour rings (8 neighbours each).
        num_iterations: refinement steps (0: the masks as resized, unrefined).
        w1: appearance and position temperature.
        w2: weight of the position kernel.
        extents: (B, 2) int64 valid (height, width) of each image at its top-left corner:
            replicate padding then happens at that border, exactly as PAR on the cropped
            image; values outside the extent are not meaningful. None: the whole image.

    Returns:
        (B, K', h, w) float32.
    """
    batch, _, height, width = images.shape
    with torch.autocast(device_type=images.device.type, enabled=False):
        masks = masks.float()
        if masks.shape[-2:] != images.shape[-2:]:
            masks = F.interpolate(masks, size=(height, width), mode="bilinear", align_corners=True)
        channels = masks.shape[1]
        state = masks.permute(0, 2, 3, 1).reshape(batch * height * width, channels)  # channels-last rows
        if num_iterations > 0:  # 0: no refinement (the w/o-PAR ablation), no kernel built
            operator = _par_operator(images.float(), tuple(dilations), w1, w2, extents)
            for _ in range(num_iterations):
                state = operator @ state
    return state.view(batch, height, width, channels).permute(0, 3, 1, 2).contiguous()


def pixel_adaptive_refinement_in_boxes(
    images: Tensor, masks: Tensor, valid_boxes: Tensor, dilations: Sequence[int] = DEFAULT_DILATIONS,
    num_iterations: int = 10, w1: float = 0.3, w2: float = 0.01,
) -> Tensor:
    """PAR per image inside its valid box, on the box downsampled by 2 (AFA.md §7).

    Per image b with box (t, bo, l, r) this equals: crop image and masks to the box,
    downsample the image crop to ((bo−t)//2, (r−l)//2) (bilinear), PAR (which resizes the
    mask crop with align_corners=True and pads at the box border), upsample the result
    to the box size (bilinear) and paste it into zeros. All images run as one batch: boxes
    are resampled onto the top-left of an (H//2, W//2) canvas with per-image bilinear taps,
    and PAR clamps neighbours to each image's extent. Boxes must be at least 2×2.

    Args:
        images: (B, 3, H, W).
        masks: (B, K', H, W) scores at crop resolution.
        valid_boxes: (B, 4) int64 (top, bottom, left, right), half-open.

    Returns:
        (B, K', H, W) float32, zero outside the boxes.
    """
    height, width = images.shape[-2:]
    canvas = (height // PAR_DOWN_SCALE, width // PAR_DOWN_SCALE)
    box_heights = (valid_boxes[:, 1] - valid_boxes[:, 0]) // PAR_DOWN_SCALE
    box_widths = (valid_boxes[:, 3] - valid_boxes[:, 2]) // PAR_DOWN_SCALE
    zeros = torch.zeros_like(box_heights)
    small_boxes = torch.stack([zeros, box_heights, zeros, box_widths], dim=1)
    with torch.autocast(device_type=images.device.type, enabled=False):
        small_images = resample_boxes_bilinear(images.float(), valid_boxes, small_boxes, canvas)
        # PAR's own mask resize (align_corners=True), from each box to its small box.
        small_masks = resample_boxes_bilinear(masks.float(), valid_boxes, small_boxes, canvas, align_corners=True)
        refined = pixel_adaptive_refinement(
            small_images, small_masks, dilations, num_iterations, w1, w2,
            extents=torch.stack([box_heights, box_widths], dim=1))
        return resample_boxes_bilinear(refined, small_boxes, valid_boxes, (height, width))


def refine_cams_with_par(
    images: Tensor, cams: Tensor, labels: Tensor, valid_boxes: Tensor,
    thresholds: tuple[float, float] = (0.55, 0.35), dilations: Sequence[int] = DEFAULT_DILATIONS,
    num_iterations: int = 10, w1: float = 0.3, w2: float = 0.01,
    max_classes_per_image: int | None = None, ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """The PAR-refined CAM pseudo label (AFA.md §5, "Refining CAMs with PAR").

    Background plane τ prepended; image and planes downsampled by 2; softmax over
    background + present classes (absent ones masked to 0); PAR on the whole crop; upsample
    to (H, W); argmax. Both thresholds share the image's PAR kernel: their planes are
    stacked along channels and refined in one call. Combined as in §5; ignore outside the
    valid box.

    Args:
        images: (B, 3, H, W) images (normalised or 0–255: PAR's kernel is the same).
        cams: (B, C, H, W) normalised CAMs (absent classes are masked here).
        labels: (B, C) multi-hot.
        valid_boxes: (B, 4) int64 (top, bottom, left, right), half-open.
        thresholds: the two background scores; the larger is `high`, order does not matter.
        max_classes_per_image: optional bound on foreground classes in any image of the
            batch (compute it from the labels while they are still on the CPU); refines
            1 + this many channels per image instead of K. None: all K, masked.
        ignore_index: label of ignored pixels.

    Returns:
        (B, H, W) int64.
    """
    height, width = cams.shape[-2:]
    high, low = max(thresholds), min(thresholds)
    class_ids = class_channel_index(
        labels, None if max_classes_per_image is None else max_classes_per_image + 1)  # (B, K')
    small = (height // PAR_DOWN_SCALE, width // PAR_DOWN_SCALE)
    with torch.autocast(device_type=cams.device.type, enabled=False):
        small_cams = F.interpolate(cams.float(), size=small, mode="bilinear", align_corners=False)
        small_images = F.interpolate(images.float(), size=small, mode="bilinear", align_corners=False)
        # Downsampling the constant τ plane is the identity, so it is prepended after.
        scores = threshold_class_scores(small_cams, labels, class_ids, (high, low))  # (B, 2, K', h, w)
        refined = pixel_adaptive_refinement(
            small_images, scores.flatten(1, 2), dilations, num_iterations, w1, w2)
        refined = F.interpolate(refined, size=(height, width), mode="bilinear", align_corners=False)
    return label_from_threshold_scores(refined, class_ids, valid_boxes, ignore_index)

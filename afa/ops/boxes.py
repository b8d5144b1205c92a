"""Valid boxes of crops, and bilinear resampling of a different box in every image.

A valid box is (top, bottom, left, right), half-open, in crop pixel coordinates: the part
of the crop covered by the image rather than padding (AFA.md §4, §9).
"""
from __future__ import annotations

import torch
from torch import Tensor


def valid_box_mask(valid_boxes: Tensor, height: int, width: int) -> Tensor:
    """Marks the pixels inside each image's valid box (AFA.md §4).

    Args:
        valid_boxes: (B, 4) int64, (top, bottom, left, right) half-open.
        height: H of the crop.
        width: W of the crop.

    Returns:
        (B, H, W) bool, True inside the box.
    """
    rows = torch.arange(height, device=valid_boxes.device)
    cols = torch.arange(width, device=valid_boxes.device)
    inside_rows = (rows >= valid_boxes[:, 0, None]) & (rows < valid_boxes[:, 1, None])  # (B, H)
    inside_cols = (cols >= valid_boxes[:, 2, None]) & (cols < valid_boxes[:, 3, None])  # (B, W)
    return inside_rows[:, :, None] & inside_cols[:, None, :]


def _bilinear_taps(
    src_start: Tensor, src_len: Tensor, dst_start: Tensor, dst_len: Tensor, out_len: int,
    align_corners: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-image 1-D bilinear taps, with PyTorch's source-index rule (upsample_bilinear2d).

    Args:
        src_start, src_len, dst_start, dst_len: (B,) int64, the source and destination spans.
        out_len: length of the destination axis.
        align_corners: as in F.interpolate.

    Returns:
        index0, index1: (B, out_len) int64 source indices; weight0, weight1: (B, out_len)
        float32, both 0 outside the destination span.
    """
    position = torch.arange(out_len, device=src_len.device)[None] - dst_start[:, None]  # (B, L)
    inside = (position >= 0) & (position < dst_len[:, None])
    src_f = src_len[:, None].float()
    dst_f = dst_len[:, None].float().clamp_min(1.0)  # an empty span has no taps; avoid 1/0
    position_f = position.float()
    if align_corners:
        scale = torch.where(dst_f > 1, (src_f - 1) / (dst_f - 1).clamp_min(1.0), torch.zeros_like(dst_f))
        real = scale * position_f
    else:
        real = (src_f / dst_f * (position_f + 0.5) - 0.5).clamp_min(0.0)
    last = (src_len[:, None] - 1).clamp_min(0)
    index0 = torch.minimum(real.floor().long(), last)
    lam = (real - index0.float()).clamp(0.0, 1.0)
    index1 = index0 + (index0 < last).long()
    zero = torch.zeros((), device=lam.device)
    weight1 = torch.where(inside, lam, zero)
    weight0 = torch.where(inside, 1.0 - lam, zero)
    # Outside the destination span any in-range index will do: its weight is 0.
    index0 = torch.where(inside, src_start[:, None] + index0, src_start[:, None])
    index1 = torch.where(inside, src_start[:, None] + index1, src_start[:, None])
    return index0, index1, weight0, weight1


def resample_boxes_bilinear(
    x: Tensor, src_boxes: Tensor, dst_boxes: Tensor, out_size: tuple[int, int],
    align_corners: bool = False,
) -> Tensor:
    """Resizes box `src_boxes[b]` of image b onto box `dst_boxes[b]` of a zero canvas.

    Equals, per image, ``F.interpolate(x[b:b+1, :, t:bo, l:r], size=(dst h, dst w),
    mode="bilinear", align_corners=align_corners)`` pasted at the destination box, to
    float rounding; every image may have its own boxes, and no Python loop runs over images.
    Used for AFA.md §7's "PAR per image inside its valid box".

    Args:
        x: (B, C, H, W) float.
        src_boxes: (B, 4) int64 (top, bottom, left, right) in x, non-empty.
        dst_boxes: (B, 4) int64 (top, bottom, left, right) in the output canvas.
        out_size: (H', W') of the output canvas.
        align_corners: as in F.interpolate.

    Returns:
        (B, C, H', W'), zero outside each destination box.
    """
    batch, channels, _, width = x.shape
    out_h, out_w = out_size
    r0, r1, rw0, rw1 = _bilinear_taps(
        src_boxes[:, 0], src_boxes[:, 1] - src_boxes[:, 0],
        dst_boxes[:, 0], dst_boxes[:, 1] - dst_boxes[:, 0], out_h, align_corners)
    c0, c1, cw0, cw1 = _bilinear_taps(
        src_boxes[:, 2], src_boxes[:, 3] - src_boxes[:, 2],
        dst_boxes[:, 2], dst_boxes[:, 3] - dst_boxes[:, 2], out_w, align_corners)

    def take_rows(index: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H', W)
        return x.gather(2, index[:, None, :, None].expand(batch, channels, out_h, width))

    rows = take_rows(r0) * rw0[:, None, :, None].to(x.dtype) + take_rows(r1) * rw1[:, None, :, None].to(x.dtype)

    def take_cols(index: Tensor) -> Tensor:  # (B, C, H', W) -> (B, C, H', W')
        return rows.gather(3, index[:, None, None, :].expand(batch, channels, out_h, out_w))

    return take_cols(c0) * cw0[:, None, None, :].to(x.dtype) + take_cols(c1) * cw1[:, None, None, :].to(x.dtype)

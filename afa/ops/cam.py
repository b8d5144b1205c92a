"""Multi-scale CAMs and labels from CAMs (AFA.md §3, §4, and the §5 label combination)."""
from __future__ import annotations

from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from afa.constants import IGNORE_INDEX
from afa.ops.boxes import valid_box_mask


class CamFunction(Protocol):
    """The network's CAM-only forward (AFA.md §2, §3)."""

    def __call__(self, images: Tensor, affinity_images: int) -> tuple[Tensor, Tensor | None]:
        """Maps images (b, 3, h, w) to raw CAMs (b, C, h', w') (classifier as a 1×1 conv on
        F4, no ReLU) and the attention affinity (affinity_images, N, N) of the first
        `affinity_images` images, or None when affinity_images is 0."""
        ...


def multi_scale_cam(
    cam_fn: CamFunction, images: Tensor, scales: Sequence[float] = (1.0, 0.5, 1.5),
    with_affinity: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Multi-scale, flip-augmented, min-max normalised CAMs (AFA.md §3).

    One `cam_fn` call per scale on [images; flipped images]; no gradients. The affinity is
    requested only at the largest scale, for the non-flipped half.

    Args:
        cam_fn: the CAM-only forward, see `CamFunction`.
        images: (B, 3, H, W) normalised images.
        scales: resize factors; the image at scale s is (⌊sH⌋, ⌊sW⌋).
        with_affinity: whether to return the largest scale's affinity.

    Returns:
        cams: (B, C, H, W) float32 in [0, 1), not multiplied by the labels (see `valid_cams`).
        affinity: (B, N, N) in cam_fn's dtype, or None.
    """
    if not scales:
        raise ValueError("afa/ops/cam.py multi_scale_cam: scales is empty; pass e.g. (1.0, 0.5, 1.5)")
    batch, _, height, width = images.shape
    largest = max(range(len(scales)), key=lambda i: scales[i])
    total: Tensor | None = None
    affinity: Tensor | None = None
    with torch.no_grad():
        for index, scale in enumerate(scales):
            size = (int(scale * height), int(scale * width))
            scaled = images if size == (height, width) else F.interpolate(
                images, size=size, mode="bilinear", align_corners=False)
            affinity_images = batch if with_affinity and index == largest else 0
            raw, scale_affinity = cam_fn(torch.cat([scaled, scaled.flip(-1)], dim=0), affinity_images)
            # Upsample in float32: under autocast the network returns bf16/fp16 CAMs.
            raw = F.interpolate(raw.float(), size=(height, width), mode="bilinear", align_corners=False)
            cam = torch.maximum(raw[:batch], raw[batch:].flip(-1)).relu_()  # (B, C, H, W)
            total = cam if total is None else total.add_(cam)
            if affinity_images:
                affinity = scale_affinity
        assert total is not None  # scales is non-empty, checked above
        flat = total.flatten(2)  # (B, C, H*W)
        flat.sub_(flat.amin(dim=2, keepdim=True))  # in place: `total` is this function's own
        flat.div_(flat.amax(dim=2, keepdim=True) + 1e-5)
    return flat.view_as(total), affinity


def valid_cams(cams: Tensor, labels: Tensor) -> Tensor:
    """valid_cam = cam · y: absent classes become 0 (AFA.md §3).

    Args:
        cams: (B, C, H, W).
        labels: (B, C) multi-hot.

    Returns:
        (B, C, H, W).
    """
    return cams * labels[:, :, None, None].to(cams.dtype)


def cam_to_label(cams: Tensor, labels: Tensor, bkg_score: float = 0.45) -> Tensor:
    """Evaluation label from CAMs (AFA.md §4): c* = argmax + 1, 0 where max ≤ bkg_score.

    Args:
        cams: (B, C, H, W) normalised CAMs (absent classes are masked here).
        labels: (B, C) multi-hot.
        bkg_score: background threshold.

    Returns:
        (B, H, W) int64 class ids.
    """
    score, index = valid_cams(cams, labels).max(dim=1)
    return torch.where(score <= bkg_score, 0, index + 1)


def cam_to_training_label(
    cams: Tensor, labels: Tensor, valid_boxes: Tensor, high: float = 0.55, low: float = 0.35,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Training label from CAMs (AFA.md §4).

    c* where max > high; ignore where low < max ≤ high; 0 where max ≤ low; ignore outside
    the valid box (padding is never background).

    Args:
        cams: (B, C, H, W) normalised CAMs.
        labels: (B, C) multi-hot.
        valid_boxes: (B, 4) int64 (top, bottom, left, right), half-open.
        high: foreground threshold.
        low: background threshold.
        ignore_index: label of ignored pixels.

    Returns:
        (B, H, W) int64.
    """
    score, index = valid_cams(cams, labels).max(dim=1)
    label = torch.where(score > high, index + 1, ignore_index)
    label = torch.where(score <= low, 0, label)
    inside = valid_box_mask(valid_boxes, cams.shape[-2], cams.shape[-1])
    return torch.where(inside, label, ignore_index)


def combine_threshold_labels(
    label_high: Tensor, label_low: Tensor, inside: Tensor, ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Combines the labels refined with τ = high and τ = low (AFA.md §5).

    Label = l_h; ignore where l_h = 0; 0 where l_h = 0 and l_l = 0; ignore outside the box.

    Args:
        label_high: (B, H, W) int64 class ids from τ = high.
        label_low: (B, H, W) int64 class ids from τ = low.
        inside: (B, H, W) bool, the valid box.
        ignore_index: label of ignored pixels.

    Returns:
        (B, H, W) int64.
    """
    high_is_background = label_high == 0
    label = torch.where(high_is_background, ignore_index, label_high)
    label = torch.where(high_is_background & (label_low == 0), 0, label)
    return torch.where(inside, label, ignore_index)


def label_from_threshold_scores(
    scores: Tensor, class_ids: Tensor, valid_boxes: Tensor | None = None, ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """The label of refined or propagated per-threshold class scores (AFA.md §5, §7, §10).

    Per threshold, the class id of the argmax channel (ties go to the earlier channel).
    One threshold: that label. Two (high first): combined by `combine_threshold_labels`,
    ignore outside the valid box.

    Args:
        scores: (B, t·K', H, W), t = 1 or 2 blocks of K' channels, one per threshold.
        class_ids: (B, K') class id of each channel (from `class_channel_index`).
        valid_boxes: (B, 4) int64 (top, bottom, left, right), half-open; needed for t = 2.
        ignore_index: label of ignored pixels.

    Returns:
        (B, H, W) int64.
    """
    batch, channels, height, width = scores.shape
    kept = class_ids.shape[1]
    slots = scores.view(batch, channels // kept, kept, height, width).argmax(dim=2)  # (B, t, H, W)
    label = class_ids.gather(1, slots.flatten(1)).view(slots.shape)
    if slots.shape[1] == 1:
        return label[:, 0]
    if valid_boxes is None:
        raise ValueError("afa/ops/cam.py label_from_threshold_scores: two thresholds need valid_boxes")
    return combine_threshold_labels(label[:, 0], label[:, 1], valid_box_mask(valid_boxes, height, width), ignore_index)

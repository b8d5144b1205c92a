"""Classification and segmentation losses (AFA.md §8); the affinity loss is in affinity.py."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from afa.constants import IGNORE_INDEX


def multilabel_soft_margin_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """L_cls: multi-label soft-margin loss on the image logits (AFA.md §8), in float32.

    Args:
        logits: (B, C).
        labels: (B, C) multi-hot.

    Returns:
        scalar float32.
    """
    return F.multilabel_soft_margin_loss(logits.float(), labels.float())


def balanced_segmentation_loss(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """L_seg = ½ CE(background pixels) + ½ CE(foreground pixels) (AFA.md §8).

    Logits are upsampled (bilinear) to the target size; each half is averaged over its own
    non-ignored pixels of the whole batch. Defect fixed: the reference returns NaN when a
    half has no pixels (e.g. an all-ignore crop); here that half contributes 0, and the
    gradient stays finite.

    Args:
        logits: (B, K, h, w) segmentation logits.
        target: (B, H, W) int64 labels in [0, K) or ignore_index.
        ignore_index: label of ignored pixels.

    Returns:
        scalar float32.
    """
    logits = logits.float()  # softmax / log-sum-exp in float32 under autocast
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    per_pixel = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")  # 0 if ignored
    background = target == 0
    foreground = (target != 0) & (target != ignore_index)
    background_loss = (per_pixel * background).sum() / background.sum().clamp_min(1)
    foreground_loss = (per_pixel * foreground).sum() / foreground.sum().clamp_min(1)
    return 0.5 * (background_loss + foreground_loss)

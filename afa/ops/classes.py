"""Class channels present in each image: masks, compaction and the masked softmax.

Channel 0 is background and always present; channel c ≥ 1 is present when the image's
multi-hot label has class c (AFA.md §5, §7: "keep the channels of background + present
classes"). Absent channels are handled by masking, so no Python loop runs over images.
"""
from __future__ import annotations

import torch
from torch import Tensor


def present_class_mask(labels: Tensor) -> Tensor:
    """Background plus the image's present classes.

    Args:
        labels: (B, C) multi-hot image labels.

    Returns:
        (B, K) bool with K = C + 1; column 0 (background) is always True.
    """
    background = torch.ones_like(labels[:, :1], dtype=torch.bool)
    return torch.cat([background, labels > 0], dim=1)


def class_channel_index(labels: Tensor, num_channels: int | None = None) -> Tensor:
    """Class ids (0 = background) of the channels to keep, present ones first.

    With `num_channels` = None every class is kept in order (index k is class k). With a
    number, each row lists its present classes in increasing order, then absent ones as
    filler, truncated to `num_channels`; computations then run on num_channels instead of K
    channels. It must be at least 1 + the most foreground classes in any image (checked
    asynchronously, so there is no host sync on GPU).

    Args:
        labels: (B, C) multi-hot image labels.
        num_channels: channels to keep, or None for all K = C + 1.

    Returns:
        (B, num_channels or K) int64 class ids.
    """
    present = present_class_mask(labels)
    batch, classes = present.shape
    if num_channels is None or num_channels >= classes:
        return torch.arange(classes, device=labels.device).expand(batch, classes)
    torch._assert_async(
        present.sum(dim=1).max() <= num_channels,
        f"afa/ops/classes.py: an image has more than {num_channels} channels (background + present "
        "classes); raise max_classes_per_image to the labels' largest row sum, or pass None")
    # Stable sort of "absent" flags puts present classes first, each group in class order.
    order = torch.sort((~present).to(torch.uint8), dim=1, stable=True).indices
    return order[:, :num_channels]


def masked_softmax(logits: Tensor, present: Tensor, dim: int = 1) -> Tensor:
    """Softmax over the present channels only; absent channels become exactly 0.

    Computed in float32 (AFA.md §5, §7: softmax over background + present classes).

    Args:
        logits: (B, K, ...) scores (any layout; `dim` names the channel dimension).
        present: bool, broadcastable to `logits`, True for kept channels; at least one True
            along `dim` everywhere.
        dim: the channel dimension.

    Returns:
        float32 tensor shaped like `logits`.
    """
    masked = logits.float().masked_fill(~present, float("-inf"))  # exp(-inf) = 0: absent drop out
    return torch.softmax(masked, dim=dim)


def threshold_class_scores(
    foreground: Tensor, labels: Tensor, class_ids: Tensor, thresholds: tuple[float, ...],
) -> Tensor:
    """Prepends a constant background τ to the CAMs and softmaxes over present channels.

    One set of scores per threshold, so that both background thresholds of AFA.md §5/§7
    run through later steps as one tensor (stacked along a new dimension, not looped).

    Args:
        foreground: (B, C, *S) CAMs (any spatial shape S); absent classes are ignored.
        labels: (B, C) multi-hot image labels.
        class_ids: (B, K') class ids to keep (from `class_channel_index`), 0 = background.
        thresholds: the background scores τ, one output set each.

    Returns:
        (B, len(thresholds), K', *S) float32; kept-but-absent channels are exactly 0.
    """
    batch, kept = class_ids.shape
    spatial = foreground.shape[2:]
    ones = (1,) * len(spatial)
    foreground_index = (class_ids - 1).clamp_min(0).view(batch, kept, *ones).expand(batch, kept, *spatial)
    gathered = foreground.float().gather(1, foreground_index)  # (B, K', *S); slot of class 0 is filler
    is_background = (class_ids == 0).view(batch, kept, *ones)
    logits = torch.stack([torch.where(is_background, tau, gathered) for tau in thresholds], dim=1)
    present = present_class_mask(labels).gather(1, class_ids).view(batch, 1, kept, *ones)
    return masked_softmax(logits, present, dim=2)

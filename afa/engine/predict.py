"""Predictions of a trained AFA network for evaluation: one function per target (AFA.md §10;
the PAR label of §5 as a fourth, the attention affinity against its §6 targets as a fifth).

All take a batch of same-size images on the device and return device tensors; nothing
here reads files or talks to other processes.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from afa.constants import IGNORE_INDEX
from afa.engine.afa_step import PAROptions
from afa.models.network import AFANetwork
from afa.ops import (
    affinity_labels_from_segmentation,
    cam_to_label,
    labels_on_grid,
    multi_scale_cam,
    propagate_cams_with_affinity,
    refine_cams_with_par,
)

Target = Literal["segmentation", "cam", "propagated", "par", "affinity"]


@dataclass(frozen=True)
class TestProtocol:
    """The reference's test protocol (AFA.md §10).

    Attributes:
        scales: input scales; their logits are fused by max (single-scale: ``(1.0,)``).
        flip: average each scale's logits with those of its horizontal flip.
        resize_long: resize the long side to this first (``int`` sizes); None keeps the size.
    """

    scales: tuple[float, ...] = (1.0, 0.5, 0.75)
    flip: bool = True
    resize_long: int | None = 512


def resize_long_side(images: Tensor, long_side: int | None) -> Tensor:
    """images: (B, 3, H, W) -> (B, 3, int(H·r), int(W·r)) with r = long_side / max(H, W), bilinear."""
    if long_side is None:
        return images
    height, width = images.shape[-2:]
    ratio = long_side / max(height, width)
    size = (int(height * ratio), int(width * ratio))
    if size == (height, width):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def _flip_averaged_logits(network: AFANetwork, images: Tensor, flip: bool) -> Tensor:
    """(B, K, h, w) segmentation logits, averaged with the flipped-back logits of the flip."""
    if not flip:
        return network.forward_segmentation(images)
    batch = images.shape[0]
    logits = network.forward_segmentation(torch.cat([images, images.flip(-1)]))  # image and flip in one pass
    return (logits[:batch] + logits[batch:].flip(-1)) / 2


@torch.no_grad()
def segmentation_logits(network: AFANetwork, images: Tensor, protocol: TestProtocol) -> Tensor:
    """Fused segmentation logits of AFA.md §10's test protocol.

    Args:
        images: (B, 3, H, W) normalised, same size.

    Returns:
        (B, K, h, w) float32 at the scale-1 logit size of the (long-side resized) input.
    """
    images = resize_long_side(images, protocol.resize_long)
    base = _flip_averaged_logits(network, images, protocol.flip).float() if 1.0 in protocol.scales else None
    size = base.shape[-2:] if base is not None else None
    fused = base
    for scale in protocol.scales:
        if scale == 1.0:
            continue
        scaled = F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
        logits = _flip_averaged_logits(network, scaled, protocol.flip).float()
        if size is None:  # no scale 1: the logit grid a scale-1 pass would give (stride-4 patch embedding)
            size = (-(-images.shape[-2] // 4), -(-images.shape[-1] // 4))
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        fused = logits if fused is None else torch.maximum(fused, logits)
    return fused


def upsample(scores: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, K, h, w) -> (B, K, *size), bilinear, float32."""
    scores = scores.float()
    if scores.shape[-2:] == tuple(size):
        return scores
    return F.interpolate(scores, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def label_size_cams(network: AFANetwork, images: Tensor, output_size: tuple[int, int], cam_scales: Sequence[float]) -> Tensor:
    """Multi-scale CAMs (AFA.md §3) upsampled to the label size: (B, C, H_out, W_out) float32."""
    cams, _ = multi_scale_cam(network.forward_cam, images, tuple(cam_scales), with_affinity=False)
    return upsample(cams, output_size)


@torch.no_grad()
def propagate_label(network: AFANetwork, images: Tensor, cams: Tensor, labels: Tensor, affinity: Tensor,
                    bkg_score: float, radius: int, implementation: str) -> Tensor:
    """The CAM propagated by an affinity (AFA.md §10, no PAR): (B, H_out, W_out) int64.

    Args:
        cams: (B, C, H_out, W_out) from :func:`label_size_cams`.
        affinity: (B, N, N) on the images' affinity grid.
        bkg_score: the propagation's background score (τ = 0.35 in AFA).
        implementation: the random walk's implementation (``dense`` or ``windowed``).
    """
    with torch.autocast(images.device.type, enabled=False):  # float32 under amp, as the training labels
        return propagate_cams_with_affinity(
            cams.float(), labels, affinity.float(), thresholds=(bkg_score,), implementation=implementation,
            radius=radius, grid_size=network.affinity_grid(*images.shape[-2:]),
        )


@torch.no_grad()
def par_label(images: Tensor, cams: Tensor, labels: Tensor, bkg_score: float, par: PAROptions,
              max_classes: int | None = None) -> Tensor:
    """The PAR-refined CAM label (AFA.md §5) with both thresholds at ``bkg_score``: no ignored
    pixels, so it is scored like the CAM label; valid box = the whole image. (B, H_out, W_out) int64.

    Args:
        images: (B, 3, H, W) normalised (PAR's kernel is invariant to the normalisation).
        cams: (B, C, H_out, W_out) from :func:`label_size_cams`.
        max_classes: most foreground classes in any image of the batch (read on the CPU), or None.
    """
    batch, _, height, width = cams.shape
    boxes = torch.tensor([0, height, 0, width], device=cams.device).expand(batch, 4)
    with torch.autocast(images.device.type, enabled=False):  # float32 under amp, as the training labels
        return refine_cams_with_par(
            images, cams.float(), labels, boxes, (bkg_score, bkg_score), dilations=par.dilations,
            num_iterations=par.num_iterations, w1=par.w1, w2=par.w2, max_classes_per_image=max_classes,
        )


@torch.no_grad()
def target_label(network: AFANetwork, images: Tensor, labels: Tensor, output_size: tuple[int, int], target: Target,
                 cam_scales: Sequence[float], bkg_score: float, propagation_bkg_score: float, radius: int,
                 implementation: str, par: PAROptions | None = None, max_classes: int | None = None) -> Tensor:
    """The CAM label (AFA.md §4), the PAR label (§5, see :func:`par_label`; needs ``par``) or
    the propagated label (§10) of images with known image labels."""
    cams = label_size_cams(network, images, output_size, cam_scales)
    if target == "cam":
        return cam_to_label(cams, labels, bkg_score)
    if target == "par":
        if par is None:
            raise ValueError("target='par' needs the PAR options (par=PAROptions(...))")
        return par_label(images, cams, labels, bkg_score, par, max_classes)
    affinity = network(images, with_segmentation=False, with_affinity=True).affinity
    return propagate_label(network, images, cams, labels, affinity, propagation_bkg_score, radius, implementation)


@torch.no_grad()
def affinity_with_targets(network: AFANetwork, images: Tensor, masks: Tensor,
                          radius: int) -> tuple[Tensor, Tensor, Tensor]:
    """The attention affinity P of the scale-1 forward, its ground-truth pair targets (AFA.md
    §6 with the mask in place of the refined label) and foreground nodes, as the propagated target's P.

    Args:
        images: (B, 3, H, W) normalised, same size.
        masks: (B, H, W) int64 ground truth, 255 ignored.
        radius: the window radius r of the targets.

    Returns:
        affinity: (B, N, N) float32 with N = h·w nodes of ``network.affinity_grid(H, W)``.
        targets: (B, N, N) uint8: 1 same class, 0 different, 255 ignored node or outside the window.
        foreground: (B, N) bool, the nodes of a foreground class.
    """
    _, affinity = network.forward_cam(images, affinity_images=images.shape[0])
    grid = network.affinity_grid(*images.shape[-2:])
    with torch.autocast(images.device.type, enabled=False):  # float32 under amp, as the training's targets
        nodes = labels_on_grid(masks, grid)
        foreground = (nodes > 0) & (nodes != IGNORE_INDEX)
        return affinity.float(), affinity_labels_from_segmentation(masks, grid, radius=radius), foreground

"""One AFA iteration as the paper's pipeline (AFA.md §8): pseudo labels, then losses.

Typed options are built once from ``cfg.method``; the two functions below take them and
tensors only (no config reads, no logging).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor

from afa.models.network import AFANetwork, AFAOutput
from afa.ops import (
    affinity_labels_from_segmentation,
    affinity_loss,
    balanced_segmentation_loss,
    multi_scale_cam,
    multilabel_soft_margin_loss,
    propagate_cams_with_affinity,
    refine_cams_with_par,
)
from afa.ops.random_walk import RandomWalkImplementation

Phase = Literal["classification", "par_label", "propagated_label"]
Propagation = Literal["auto", "dense", "windowed"]


def resolve_propagation(option: str, device: torch.device | str) -> RandomWalkImplementation:
    """The random walk's implementation for ``method.affinity.propagation`` on ``device``.

    ``auto``: the dense masked T on CUDA, the sparse window product elsewhere, each the
    faster there (docs/ops-notes.md); ``dense`` and ``windowed`` are taken as given.
    """
    if option == "auto":
        return "dense" if torch.device(device).type == "cuda" else "windowed"
    if option not in ("dense", "windowed"):
        raise ValueError(f"method.affinity.propagation={option!r}; expected auto, dense or windowed")
    return option  # type: ignore[return-value]


@dataclass(frozen=True)
class PAROptions:
    """AFA.md §5."""

    dilations: tuple[int, ...]
    num_iterations: int
    w1: float
    w2: float


@dataclass(frozen=True)
class AFAOptions:
    """Every number of the AFA step (AFA.md §3-§8), read once from ``cfg.method``.

    Phases follow the reference's 0-based iteration ``i``: classification only while
    ``i <= cam_iters``; the segmentation target is the PAR label while ``i <= switch_iters``
    and the propagated label after; the affinity labels come from the PAR label, or from
    the propagated label once ``i > affinity_from_propagated_after`` (COCO; None: never).
    """

    cam_iters: int
    switch_iters: int
    affinity_from_propagated_after: int | None
    cam_scales: tuple[float, ...]
    high_thre: float
    low_thre: float
    cam_reference_mode: bool
    par: PAROptions
    radius: int
    propagation: Propagation
    seg_weight: float
    aff_weight: float
    inactive_losses: Literal["zero", "skip"]

    @classmethod
    def from_config(cls, method: DictConfig) -> AFAOptions:
        par = method.par
        after = method.get("affinity_from_propagated_after")
        propagation = str(method.affinity.get("propagation", "auto"))
        resolve_propagation(propagation, "cpu")  # a bad value fails here, not at the first propagated label
        return cls(
            cam_iters=int(method.cam_iters),
            switch_iters=int(method.switch_iters),
            affinity_from_propagated_after=None if after is None else int(after),
            cam_scales=tuple(float(s) for s in method.cam.scales),
            high_thre=float(method.cam.high_thre),
            low_thre=float(method.cam.low_thre),
            cam_reference_mode=bool(method.cam.get("reference_mode", False)),
            par=PAROptions(tuple(int(d) for d in par.dilations), int(par.num_iterations), float(par.w1), float(par.w2)),
            radius=int(method.affinity.radius),
            propagation=propagation,  # type: ignore[arg-type]
            seg_weight=float(method.loss.seg_weight),
            aff_weight=float(method.loss.aff_weight),
            inactive_losses=str(method.get("inactive_losses", "zero")),  # type: ignore[arg-type]
        )

    def phase(self, iteration: int) -> Phase:
        """The training phase of 0-based ``iteration`` (boundaries as the reference's)."""
        if iteration <= self.cam_iters:
            return "classification"
        return "par_label" if iteration <= self.switch_iters else "propagated_label"

    def affinity_source(self, iteration: int) -> Literal["refined", "propagated"]:
        after = self.affinity_from_propagated_after
        return "propagated" if after is not None and iteration > after else "refined"


def _reference_cam_pass(network: AFANetwork):
    """The reference's CAM forward: train mode, decoder run (its BatchNorm statistics update)."""

    def cam_fn(images: Tensor, affinity_images: int = 0) -> tuple[Tensor, Tensor | None]:
        features, attention = network.encoder(images, attention_images=affinity_images)
        network.decoder(features)  # output unused, as in the reference: only its BN running stats change
        cams = F.conv2d(features[-1], network.classifier.weight)
        return cams, network.attn_proj(attention) if attention is not None else None

    return cam_fn


def reference_classification_cam_passes(network: AFANetwork, images: Tensor, options: AFAOptions) -> None:
    """The CAM passes the reference runs in its classification phase too, outputs unused.

    Only in ``cam_reference_mode``: they update the decoder's BatchNorm statistics and draw
    stochastic depth as the reference does, so its runs are reproduced from iteration 0.
    """
    with torch.no_grad():
        multi_scale_cam(_reference_cam_pass(network), images, options.cam_scales, with_affinity=False)


def pseudo_labels(
    network: AFANetwork, images: Tensor, labels: Tensor, boxes: Tensor, options: AFAOptions, *,
    propagate: bool, max_classes: int | None = None, mark: Callable[[str], None] | None = None,
) -> dict[str, Tensor]:
    """Multi-scale CAM (§3) → PAR label (§5) → propagated label (§7, if ``propagate``); no gradients.

    Args:
        network: the AFA network (left in train mode on return).
        images: (B, 3, H, W) normalised; labels: (B, C) multi-hot; boxes: (B, 4) valid crop boxes.
        propagate: also compute the propagated label (needs the affinity of the CAM pass).
        max_classes: most foreground classes in any image (read on the CPU) so PAR refines
            1 + that many channels instead of all.
        mark: called with "cam", "par" and "propagation" as each part ends (a phase timer).

    Returns:
        ``cams`` (B, C, H, W); ``refined`` (B, H, W) long; ``propagated`` (B, H, W) if asked.
    """
    par = dict(dilations=options.par.dilations, num_iterations=options.par.num_iterations,
               w1=options.par.w1, w2=options.par.w2)
    mark = mark or (lambda phase: None)
    with torch.no_grad():
        if options.cam_reference_mode:
            cams, affinity = multi_scale_cam(_reference_cam_pass(network), images, options.cam_scales, with_affinity=propagate)
        else:
            # afa's default: deterministic passes (no stochastic depth), no decoder run.
            network.eval()
            try:
                cams, affinity = multi_scale_cam(network.forward_cam, images, options.cam_scales, with_affinity=propagate)
            finally:
                network.train()
        mark("cam")
    # The label operators in float32 under autocast too: thresholds, PAR's kernel and the
    # random walk's powers are what bf16 would round; they are a small part of the step.
    with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
        refined = refine_cams_with_par(
            images, cams, labels, boxes, (options.high_thre, options.low_thre), max_classes_per_image=max_classes, **par
        )
        mark("par")
        result = {"cams": cams, "refined": refined}
        if propagate:
            result["propagated"] = propagate_cams_with_affinity(
                cams, labels, affinity.float(), images, boxes, thresholds=(options.low_thre, options.high_thre),
                implementation=resolve_propagation(options.propagation, images.device),
                radius=options.radius, max_classes_per_image=max_classes, **par,
            )
            mark("propagation")
    return result


def afa_losses(
    output: AFAOutput, labels: Tensor, pseudo: dict[str, Tensor] | None, phase: Phase, options: AFAOptions,
    affinity_grid: tuple[int, int], affinity_source: Literal["refined", "propagated"] = "refined",
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The AFA losses of §8: L = L_cls + λ_seg·L_seg + λ_aff·L_aff.

    In the classification phase with ``inactive_losses="zero"`` (the reference), the seg and
    affinity outputs enter with weight 0: their parameters get zero gradients, so AdamW
    counts the steps and applies weight decay. ``"skip"`` (afa's option) leaves them out.

    Returns:
        losses (``loss`` and each term, float32 scalars) and affinity-label counts.
    """
    cls_loss = multilabel_soft_margin_loss(output.class_logits.float(), labels)
    if phase == "classification":
        losses = {"loss": cls_loss, "cls_loss": cls_loss}
        if options.inactive_losses == "zero":
            # Zero-weighted like the reference; the value of the zeroed terms does not matter.
            inactive = output.seg_logits.float().sum() + output.affinity.float().sum()
            losses["loss"] = cls_loss + 0.0 * inactive
        return losses, {}
    assert pseudo is not None
    target = pseudo["propagated"] if phase == "propagated_label" else pseudo["refined"]
    seg_loss = balanced_segmentation_loss(output.seg_logits.float(), target)
    affinity_targets = affinity_labels_from_segmentation(pseudo[affinity_source], affinity_grid, radius=options.radius)
    aff_loss, counts = affinity_loss(output.affinity, affinity_targets)
    loss = cls_loss + options.seg_weight * seg_loss + options.aff_weight * aff_loss
    return {"loss": loss, "cls_loss": cls_loss, "seg_loss": seg_loss, "aff_loss": aff_loss}, counts

"""Validation during AFA training (AFA.md §10): classification F1, CAM, propagated-CAM and
segmentation mIoU, each over the full images, sharded across ranks and reduced."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import nullcontext

import torch
from torch import Tensor

from afa.engine.afa_step import resolve_propagation
from afa.metrics import ConfusionMatrix, MultiLabelCounts, ReduceSum
from afa.models.network import AFANetwork
from afa.engine.predict import label_size_cams, propagate_label, upsample
from afa.ops import cam_to_label


def autocast_context(device: torch.device, enabled: bool):
    """bf16 autocast on `device` (CUDA or CPU) when enabled; a no-op otherwise."""
    if enabled and device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


class AFAValidation:
    """Accumulates the four validation results of AFA.md §10.

    Args:
        num_classes: foreground classes C.
        device: where the counts live.
    """

    parts = ("cam", "propagated", "segmentation")

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.classification = MultiLabelCounts(num_classes, device=device)
        self.matrices = {part: ConfusionMatrix(num_classes + 1, device=device) for part in self.parts}

    def update(self, class_logits: Tensor, labels: Tensor, masks: Tensor, predictions: dict[str, Tensor]) -> None:
        self.classification.update(class_logits, labels)
        for part, prediction in predictions.items():
            self.matrices[part].update(prediction, masks)

    def compute(self, reduce_sum: ReduceSum | None = None) -> dict[str, dict]:
        """Reduced over ranks with ``reduce_sum`` (None: one process):
        {"classification": …, "cam": …, "propagated": …, "segmentation": …}."""
        results = {"classification": self.classification.reduce_(reduce_sum).compute()}
        for part, matrix in self.matrices.items():
            results[part] = matrix.reduce_(reduce_sum).compute()
        return results


@torch.no_grad()
def predict_afa_batch_with_cams(
    network: AFANetwork,
    images: Tensor,
    labels: Tensor,
    output_size: tuple[int, int],
    cam_scales: Sequence[float],
    bkg_score: float,
    propagation_bkg_score: float,
    radius: int,
    affinity: Tensor | None = None,
    propagation: str = "auto",
) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """Class logits, the three label maps of AFA.md §10 and the CAMs for same-size images.

    Args:
        images: (B, 3, H, W) normalised, unpadded.
        labels: (B, C) ground-truth image labels (CAM labels keep only present classes).
        output_size: (H_label, W_label).
        affinity: (B, N, N) to propagate with instead of the network's (e.g. a perfect one).
        propagation: the random walk's implementation, ``method.affinity.propagation``
            (auto, dense or windowed; see `resolve_propagation`).

    Returns:
        class_logits (B, C), {"cam", "propagated", "segmentation"}: (B, H_label, W_label),
        and the CAMs (B, C, H_label, W_label).
    """
    output = network(images, with_affinity=affinity is None)
    cams = label_size_cams(network, images, output_size, cam_scales)
    predictions = {
        "cam": cam_to_label(cams, labels, bkg_score),
        "propagated": propagate_label(
            network, images, cams, labels, output.affinity if affinity is None else affinity, propagation_bkg_score,
            radius, resolve_propagation(propagation, images.device),
        ),
        "segmentation": upsample(output.seg_logits, output_size).argmax(dim=1),
    }
    return output.class_logits.float(), predictions, cams


def evaluate_afa(
    network: AFANetwork,
    batches: Iterable[dict],
    num_classes: int,
    device: torch.device,
    cam_scales: Sequence[float] = (1.0, 0.5, 1.5),
    bkg_score: float = 0.45,
    propagation_bkg_score: float = 0.35,
    radius: int = 8,
    amp: bool = False,
    propagation: str = "auto",
    reduce_sum: ReduceSum | None = None,
) -> dict[str, dict]:
    """Run AFA.md §10's validation over ``batches`` (this rank's shard) and reduce.

    Args:
        network: the (unwrapped) network; put in eval mode here and restored after.
        batches: eval samples collated by size (``image``, ``mask``, ``labels``).
        num_classes: foreground classes C.
        propagation: ``method.affinity.propagation`` (auto: by ``device``, see `resolve_propagation`).
        reduce_sum: the engine's in-place sum over ranks (``RunContext.reduce_sum_``); None alone.
    """
    implementation = resolve_propagation(propagation, device)
    was_training = network.training
    network.eval()
    validation = AFAValidation(num_classes, device)
    try:
        for batch in batches:
            images = batch["image"].to(device, non_blocking=True)
            masks = batch["mask"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            with autocast_context(device, amp):
                class_logits, predictions, _ = predict_afa_batch_with_cams(
                    network, images, labels, tuple(masks.shape[-2:]), cam_scales, bkg_score,
                    propagation_bkg_score, radius, propagation=implementation,
                )
            validation.update(class_logits, labels, masks, predictions)
    finally:
        network.train(was_training)
    return validation.compute(reduce_sum)

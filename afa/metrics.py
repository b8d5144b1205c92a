"""Segmentation, image-label and affinity metrics that accumulate on the device (AFA.md §10).

The accumulators keep integer counts in one tensor on the device of the predictions,
update without any host synchronisation, and sum across ranks with ``reduce_(reduce_sum)``,
the in-place sum the engine provides (the metrics know nothing of processes).
``compute()`` is the only place that reads values back to the host.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from afa.data.classes import IGNORE_INDEX


ReduceSum = Callable[[torch.Tensor], object]
"""Sums a tensor over the ranks in place (e.g. ``RunContext.reduce_sum_``)."""


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator`` in float64, NaN where the denominator is 0."""
    numerator, denominator = numerator.double(), denominator.double()
    return torch.where(denominator > 0, numerator / denominator.clamp_min(1), torch.nan)


def _nanmean(values: torch.Tensor) -> float:
    """Mean over the finite entries, NaN when there are none."""
    finite = values[~values.isnan()]
    return float(finite.mean()) if finite.numel() else math.nan


class ConfusionMatrix:
    """A K×K confusion matrix (rows: ground truth, columns: prediction) ignoring 255.

    Pixels whose ground truth is ``ignore_index`` are skipped. Any other value outside
    ``[0, K)`` in the target, or outside ``[0, K)`` in the prediction of a counted pixel,
    is tallied as invalid and makes :meth:`compute` raise, so a wrong ``num_classes``
    cannot silently shrink the metric (the check is deferred to keep updates sync-free).

    Args:
        num_classes: K, including background at index 0.
        ignore_index: Ground-truth value to skip.
        device: Where the counts live at first; they follow the predictions' device.

    Example:
        >>> matrix = ConfusionMatrix(21)
        >>> matrix.update(prediction, target)  # (B, H, W) int64 each
        >>> matrix.reduce_(run.reduce_sum_).compute()["miou"]
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = IGNORE_INDEX,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        # K*K cells plus one trailing bin for invalid pixels and one for ignored pixels.
        self._counts = torch.zeros(num_classes * num_classes + 2, dtype=torch.int64, device=device)
        self._reduced = False

    @property
    def matrix(self) -> torch.Tensor:
        """The (K, K) int64 counts, rows = ground truth, columns = prediction."""
        k = self.num_classes
        return self._counts[: k * k].view(k, k)

    def reset(self) -> None:
        """Zeroes the counts, e.g. before the next evaluation round."""
        self._counts.zero_()
        self._reduced = False

    @torch.no_grad()
    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Adds one batch of label maps.

        Args:
            prediction: (B, H, W) (or any shape) integer class indices.
            target: Ground truth of the same shape; ``ignore_index`` pixels are skipped.
        """
        if self._reduced:
            raise RuntimeError(
                "ConfusionMatrix.update() after reduce_(): the counts already hold every "
                "rank's pixels; call reset() before accumulating a new round"
            )
        if prediction.shape != target.shape:
            raise ValueError(
                f"prediction shape {tuple(prediction.shape)} != target shape {tuple(target.shape)}; "
                "upsample the prediction to the label size first"
            )
        if self._counts.device != prediction.device:
            self._counts = self._counts.to(prediction.device)
        k = self.num_classes
        prediction = prediction.reshape(-1).long()
        target = target.reshape(-1).to(prediction.device).long()
        ignored = target == self.ignore_index
        valid = (target >= 0) & (target < k) & (prediction >= 0) & (prediction < k)
        cell = torch.where(valid, target * k + prediction, k * k)  # k*k: invalid bin
        cell = torch.where(ignored, k * k + 1, cell)  # k*k+1: ignored bin
        # scatter into a fixed-size buffer: torch.bincount reads the max back to the host on CUDA.
        self._counts.index_add_(0, cell, torch.ones_like(cell))

    def reduce_(self, reduce_sum: ReduceSum | None = None) -> ConfusionMatrix:
        """Sums the counts over all ranks in place with ``reduce_sum`` (None: one process); returns self."""
        if self._reduced:
            raise RuntimeError("ConfusionMatrix.reduce_() called twice; it would double-count other ranks")
        if reduce_sum is not None:
            reduce_sum(self._counts)
        self._reduced = True
        return self

    def compute(self) -> dict[str, float | int | list[float]]:
        """Reads the metrics back to the host.

        Returns:
            ``miou``: mean IoU over classes present in the ground truth (NaN if none; the
            reference's definition, AFA.md §10); ``iou``: K per-class IoUs,
            TP / (TP + FP + FN), NaN for classes absent from the ground truth;
            ``miou_standard``: mean IoU over classes with a non-empty union (mmsegmentation,
            torchmetrics: a predicted-but-absent class counts 0); ``pixel_accuracy``:
            correct / counted pixels; ``mean_accuracy``: mean over present classes of
            TP / ground truth; ``num_pixels``: counted pixels; ``num_ignored``: skipped pixels.
        """
        counts = self._counts.cpu()
        k = self.num_classes
        num_invalid = int(counts[k * k])
        if num_invalid:
            raise ValueError(
                f"ConfusionMatrix(num_classes={k}) saw {num_invalid} pixels with a label or "
                f"prediction outside [0, {k}) (other than ignore_index={self.ignore_index}); "
                "check num_classes against the dataset and the network's output channels"
            )
        matrix = counts[: k * k].view(k, k)
        true_positive = matrix.diagonal()
        ground_truth = matrix.sum(dim=1)
        predicted = matrix.sum(dim=0)
        union_iou = _ratio(true_positive, ground_truth + predicted - true_positive)  # NaN where the union is empty
        iou = torch.where(ground_truth > 0, union_iou, torch.nan)  # §10: only classes present in GT
        total = int(matrix.sum())
        return {
            "miou": _nanmean(iou),
            "iou": iou.tolist(),
            "miou_standard": _nanmean(union_iou),
            "pixel_accuracy": float(true_positive.sum()) / total if total else math.nan,
            "mean_accuracy": _nanmean(_ratio(true_positive, ground_truth)),
            "num_pixels": total,
            "num_ignored": int(counts[k * k + 1]),
        }


class MultiLabelCounts:
    """TP/FP/FN counts of multi-label image classification, for F1 scores.

    A class is predicted when its logit is > 0 (probability > 0.5).

    Args:
        num_classes: C, the number of foreground classes (logit channels).
        device: Where the counts live at first; they follow the logits' device.
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        # rows: TP, FP, FN per class; slot [3, 0]: images; [3, 1]: exact matches.
        self._counts = torch.zeros(4, num_classes, dtype=torch.int64, device=device)
        # float sum of per-image F1 (the reference implementation's number); kept apart
        # from the int64 counts so they stay exact.
        self._sample_f1_sum = torch.zeros((), dtype=torch.float64, device=device)
        self._reduced = False

    def reset(self) -> None:
        """Zeroes the counts."""
        self._counts.zero_()
        self._sample_f1_sum.zero_()
        self._reduced = False

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Adds one batch.

        Args:
            logits: (B, C) classification logits.
            targets: (B, C) multi-hot labels (0/1, any dtype).
        """
        if self._reduced:
            raise RuntimeError("MultiLabelCounts.update() after reduce_(); call reset() first")
        if logits.shape != targets.shape or logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"expected logits and targets of shape (B, {self.num_classes}), got "
                f"{tuple(logits.shape)} and {tuple(targets.shape)}"
            )
        if self._counts.device != logits.device:
            self._counts = self._counts.to(logits.device)
            self._sample_f1_sum = self._sample_f1_sum.to(logits.device)
        predicted = logits > 0
        actual = targets.to(logits.device) > 0.5
        true_positive = predicted & actual
        false_positive = predicted & ~actual
        false_negative = ~predicted & actual
        # (3, B, C) -> per-class sums (3, C)
        self._counts[:3] += torch.stack([true_positive, false_positive, false_negative]).sum(dim=1)
        self._counts[3, 0] += logits.shape[0]
        self._counts[3, 1] += (predicted == actual).all(dim=1).sum()
        per_image = torch.stack([true_positive, false_positive, false_negative], dim=1).sum(dim=2)
        self._sample_f1_sum += _f1(per_image[:, 0], per_image[:, 1], per_image[:, 2]).nan_to_num(0.0).sum()

    def reduce_(self, reduce_sum: ReduceSum | None = None) -> MultiLabelCounts:
        """Sums the counts over all ranks in place with ``reduce_sum`` (None: one process); returns self."""
        if self._reduced:
            raise RuntimeError("MultiLabelCounts.reduce_() called twice; it would double-count other ranks")
        if reduce_sum is not None:
            reduce_sum(self._counts)
            reduce_sum(self._sample_f1_sum)
        self._reduced = True
        return self

    def compute(self) -> dict[str, float | int | list[float]]:
        """Reads the metrics back to the host.

        Returns:
            ``f1``: micro F1 = 2TP / (2TP + FP + FN) over all classes and images;
            ``precision``, ``recall``: micro; ``per_class_f1``: C values, NaN for a class
            never present nor predicted; ``macro_f1``: their mean over defined classes;
            ``sample_f1``: per-image F1 averaged over images (0 for an image with neither
            labels nor predictions), the number the reference implementation logs;
            ``exact_match``: fraction of images with every class right; ``num_images``.
        """
        counts = self._counts.cpu()
        true_positive, false_positive, false_negative = counts[0], counts[1], counts[2]
        num_images = int(counts[3, 0])
        tp, fp, fn = true_positive.sum(), false_positive.sum(), false_negative.sum()
        per_class = _f1(true_positive, false_positive, false_negative)
        return {
            "f1": float(_f1(tp, fp, fn)),
            "precision": float(_ratio(tp, tp + fp)),
            "recall": float(_ratio(tp, tp + fn)),
            "per_class_f1": per_class.tolist(),
            "macro_f1": _nanmean(per_class),
            "sample_f1": float(self._sample_f1_sum.cpu()) / num_images if num_images else math.nan,
            "exact_match": int(counts[3, 1]) / num_images if num_images else math.nan,
            "num_images": num_images,
        }


class AffinityRecall:
    """How well an affinity P separates the pairs of affinity targets (AFA.md §6).

    A pair counts as predicted "same region" when P > 0.5. Positive recall: the share of
    Y = 1 pairs with P > 0.5; negative recall: the share of Y = 0 pairs with P ≤ 0.5;
    ignored pairs (Y = 255: outside the window or an ignored node) are not counted. Given
    the foreground nodes, the foreground positive recall counts only Y = 1 pairs inside
    objects: background pairs are most of the positives and hide how objects fare.

    Args:
        device: Where the counts live at first; they follow the affinity's device.

    Example:
        >>> recall = AffinityRecall()
        >>> recall.update(affinity, affinity_labels_from_segmentation(masks, grid, radius=4))  # (B, N, N) each
        >>> recall.reduce_(run.reduce_sum_).compute()["positive_recall"]
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        # positives, positives found, negatives, negatives found, foreground positives, found
        self._counts = torch.zeros(6, dtype=torch.int64, device=device)
        self._reduced = False

    def reset(self) -> None:
        """Zeroes the counts."""
        self._counts.zero_()
        self._reduced = False

    @torch.no_grad()
    def update(self, affinity: torch.Tensor, targets: torch.Tensor, foreground: torch.Tensor | None = None) -> None:
        """Adds one batch: ``affinity`` (B, N, N) in [0, 1]; ``targets`` (B, N, N) 0 / 1 / 255;
        ``foreground`` (B, N) bool, the nodes inside objects (None: not counted)."""
        if self._reduced:
            raise RuntimeError("AffinityRecall.update() after reduce_(); call reset() first")
        if affinity.shape != targets.shape:
            raise ValueError(f"affinity {tuple(affinity.shape)} and targets {tuple(targets.shape)} differ in shape")
        if self._counts.device != affinity.device:
            self._counts = self._counts.to(affinity.device)
        same = affinity.float() > 0.5  # compared in float32 whatever the autocast dtype
        targets = targets.to(affinity.device)
        positive, negative = targets == 1, targets == 0
        counts = [positive.sum(), (positive & same).sum(), negative.sum(), (negative & ~same).sum()]
        if foreground is not None:
            inside = positive & foreground.to(affinity.device)[:, :, None]  # Y = 1: j is in the same object class
            counts += [inside.sum(), (inside & same).sum()]
        self._counts[: len(counts)] += torch.stack(counts)

    def reduce_(self, reduce_sum: ReduceSum | None = None) -> AffinityRecall:
        """Sums the counts over all ranks in place with ``reduce_sum`` (None: one process); returns self."""
        if self._reduced:
            raise RuntimeError("AffinityRecall.reduce_() called twice; it would double-count other ranks")
        if reduce_sum is not None:
            reduce_sum(self._counts)
        self._reduced = True
        return self

    def compute(self) -> dict[str, float | int]:
        """``positive_recall``, ``foreground_positive_recall``, ``negative_recall`` (NaN without
        such pairs), ``positives``, ``foreground_positives``, ``negatives``."""
        positives, found_positives, negatives, found_negatives, inside, found_inside = self._counts.cpu().tolist()
        return {
            "positive_recall": found_positives / positives if positives else math.nan,
            "foreground_positive_recall": found_inside / inside if inside else math.nan,
            "negative_recall": found_negatives / negatives if negatives else math.nan,
            "positives": positives,
            "foreground_positives": inside,
            "negatives": negatives,
        }


def _f1(true_positive: torch.Tensor, false_positive: torch.Tensor, false_negative: torch.Tensor) -> torch.Tensor:
    """F1 = 2TP / (2TP + FP + FN) elementwise, NaN where the denominator is 0."""
    return _ratio(2 * true_positive, 2 * true_positive + false_positive + false_negative)


def iou_table_rows(iou: Sequence[float], class_names: Sequence[str]) -> list[list[object]]:
    """Rows ``[index, name, IoU]`` for a per-class table (absent classes keep NaN)."""
    if len(iou) != len(class_names):
        raise ValueError(f"{len(iou)} IoU values but {len(class_names)} class names")
    return [[index, name, float(value)] for index, (name, value) in enumerate(zip(class_names, iou, strict=True))]

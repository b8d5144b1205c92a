import math

import numpy as np
import pytest
import torch

from afa.metrics import ConfusionMatrix, MultiLabelCounts, iou_table_rows


def reference_confusion(predictions: np.ndarray, targets: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixel-by-pixel loop: obviously correct, slow."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    for prediction, target in zip(predictions.ravel(), targets.ravel()):
        if target == 255:
            continue
        matrix[target, prediction] += 1
    return matrix


def reference_miou(matrix: np.ndarray) -> tuple[float, list[float]]:
    """Class-by-class IoU over classes present in the ground truth."""
    ious = []
    for k in range(matrix.shape[0]):
        tp = matrix[k, k]
        fp = matrix[:, k].sum() - tp
        fn = matrix[k, :].sum() - tp
        ious.append(tp / (tp + fp + fn) if matrix[k, :].sum() > 0 else math.nan)
    present = [value for value in ious if not math.isnan(value)]
    return sum(present) / len(present), ious


def random_batch(generator: torch.Generator, num_classes: int, shape=(3, 17, 23)):
    target = torch.randint(0, num_classes, shape, generator=generator)
    prediction = torch.where(
        torch.rand(shape, generator=generator) < 0.6, target, torch.randint(0, num_classes, shape, generator=generator)
    )
    target[torch.rand(shape, generator=generator) < 0.1] = 255
    return prediction, target


def test_confusion_matrix_matches_pixel_loop_over_several_batches():
    generator = torch.Generator().manual_seed(0)
    num_classes = 6
    matrix = ConfusionMatrix(num_classes)
    predictions, targets = [], []
    for _ in range(3):
        prediction, target = random_batch(generator, num_classes)
        target[target == 5] = 0  # class 5 absent from the ground truth
        matrix.update(prediction, target)
        predictions.append(prediction.numpy())
        targets.append(target.numpy())
    expected = reference_confusion(np.stack(predictions), np.stack(targets), num_classes)
    np.testing.assert_array_equal(matrix.matrix.numpy(), expected)

    result = matrix.compute()
    expected_miou, expected_iou = reference_miou(expected)
    assert result["miou"] == pytest.approx(expected_miou, abs=1e-12)
    np.testing.assert_allclose(result["iou"], expected_iou, equal_nan=True)
    assert math.isnan(result["iou"][5])  # predicted but absent from GT: excluded from the mean
    assert result["pixel_accuracy"] == pytest.approx(np.trace(expected) / expected.sum())
    assert result["num_pixels"] == expected.sum()
    assert result["num_ignored"] == sum(int((t == 255).sum()) for t in targets)


def test_confusion_matrix_perfect_and_all_ignored():
    target = torch.tensor([[[0, 1], [2, 255]]])
    matrix = ConfusionMatrix(3)
    matrix.update(target.clone(), target)
    assert matrix.compute()["miou"] == 1.0
    assert matrix.compute()["pixel_accuracy"] == 1.0

    empty = ConfusionMatrix(3)
    empty.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 255))
    result = empty.compute()
    assert math.isnan(result["miou"]) and math.isnan(result["pixel_accuracy"])
    assert result["num_ignored"] == 4


def test_confusion_matrix_ignores_predictions_on_ignored_pixels_and_rejects_bad_labels():
    matrix = ConfusionMatrix(3)
    # a prediction of 7 on an ignored pixel is irrelevant
    matrix.update(torch.tensor([[0, 7]]), torch.tensor([[0, 255]]))
    assert matrix.compute()["num_pixels"] == 1

    matrix.update(torch.tensor([[0]]), torch.tensor([[3]]))  # label 3 with num_classes=3
    with pytest.raises(ValueError, match="outside \\[0, 3\\)"):
        matrix.compute()
    with pytest.raises(ValueError, match="shape"):
        matrix.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long))


def test_confusion_matrix_reduce_is_noop_single_process_and_guards_misuse():
    generator = torch.Generator().manual_seed(1)
    prediction, target = random_batch(generator, 4)
    matrix = ConfusionMatrix(4)
    matrix.update(prediction, target)
    before = matrix.matrix.clone()
    assert matrix.reduce_() is matrix
    assert torch.equal(matrix.matrix, before)
    with pytest.raises(RuntimeError, match="twice"):
        matrix.reduce_()
    with pytest.raises(RuntimeError, match="reset"):
        matrix.update(prediction, target)
    matrix.reset()
    assert matrix.matrix.sum() == 0
    matrix.update(prediction, target)  # usable again


def reference_multilabel(logits: np.ndarray, targets: np.ndarray) -> dict:
    """Class-by-class and image-by-image counts with Python loops."""
    num_images, num_classes = logits.shape
    tp = np.zeros(num_classes)
    fp = np.zeros(num_classes)
    fn = np.zeros(num_classes)
    sample_f1 = []
    exact = 0
    for i in range(num_images):
        image_tp = image_fp = image_fn = 0
        for c in range(num_classes):
            predicted, actual = logits[i, c] > 0, targets[i, c] == 1
            tp[c] += predicted and actual
            fp[c] += predicted and not actual
            fn[c] += actual and not predicted
            image_tp += predicted and actual
            image_fp += predicted and not actual
            image_fn += actual and not predicted
        denominator = 2 * image_tp + image_fp + image_fn
        sample_f1.append(2 * image_tp / denominator if denominator else 0.0)
        exact += image_fp == 0 and image_fn == 0
    per_class = [2 * tp[c] / (2 * tp[c] + fp[c] + fn[c]) if 2 * tp[c] + fp[c] + fn[c] else math.nan
                 for c in range(num_classes)]
    return {
        "f1": 2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()),
        "precision": tp.sum() / (tp.sum() + fp.sum()),
        "recall": tp.sum() / (tp.sum() + fn.sum()),
        "per_class_f1": per_class,
        "sample_f1": float(np.mean(sample_f1)),
        "exact_match": exact / num_images,
    }


def test_multilabel_counts_match_loops():
    generator = torch.Generator().manual_seed(2)
    counts = MultiLabelCounts(5)
    all_logits, all_targets = [], []
    for _ in range(4):
        targets = (torch.rand(6, 5, generator=generator) < 0.3).long()
        targets[:, 4] = 0  # class 4: never present...
        logits = torch.randn(6, 5, generator=generator) + 1.5 * (2 * targets - 1)
        logits[:, 4] = -1.0  # ...nor predicted: per-class F1 undefined
        counts.update(logits, targets)
        all_logits.append(logits.numpy())
        all_targets.append(targets.numpy())
    expected = reference_multilabel(np.concatenate(all_logits), np.concatenate(all_targets))
    result = counts.compute()
    for key in ("f1", "precision", "recall", "sample_f1", "exact_match"):
        assert result[key] == pytest.approx(expected[key], abs=1e-12), key
    np.testing.assert_allclose(result["per_class_f1"], expected["per_class_f1"], equal_nan=True)
    assert math.isnan(result["per_class_f1"][4])
    assert result["macro_f1"] == pytest.approx(np.nanmean(expected["per_class_f1"]))
    assert result["num_images"] == 24


def test_multilabel_threshold_is_zero_logit_and_shape_checked():
    counts = MultiLabelCounts(2)
    counts.update(torch.tensor([[0.0, 1e-3]]), torch.tensor([[1, 1]]))  # logit 0 = p 0.5: not predicted
    result = counts.compute()
    assert result["recall"] == 0.5 and result["precision"] == 1.0
    with pytest.raises(ValueError, match="\\(B, 2\\)"):
        counts.update(torch.zeros(1, 3), torch.zeros(1, 3))


def test_iou_table_rows():
    rows = iou_table_rows([0.5, math.nan], ["background", "aeroplane"])
    assert rows[0] == [0, "background", 0.5]
    assert rows[1][:2] == [1, "aeroplane"] and math.isnan(rows[1][2])
    with pytest.raises(ValueError):
        iou_table_rows([0.5], ["a", "b"])


def test_both_miou_definitions_on_a_hand_computed_matrix():
    """K = 3; class 2 never in the ground truth but predicted once (AFA.md §10's two definitions)."""
    #                gt: 0  0  0  1  1  1 255
    target = torch.tensor([[0, 0, 0, 1, 1, 1, 255]])
    prediction = torch.tensor([[0, 0, 1, 1, 1, 2, 2]])
    matrix = ConfusionMatrix(3)
    matrix.update(prediction, target)
    result = matrix.compute()
    # rows gt, cols prediction: [[2, 1, 0], [0, 2, 1], [0, 0, 0]]
    assert torch.equal(matrix.matrix.cpu(), torch.tensor([[2, 1, 0], [0, 2, 1], [0, 0, 0]]))
    iou0, iou1 = 2 / (3 + 2 - 2), 2 / (3 + 3 - 2)  # 2/3 and 1/2
    assert result["iou"][:2] == pytest.approx([iou0, iou1]) and math.isnan(result["iou"][2])
    assert result["miou"] == pytest.approx((iou0 + iou1) / 2)  # the reference: classes in the GT
    assert result["miou_standard"] == pytest.approx((iou0 + iou1 + 0.0) / 3)  # non-empty union: class 2 counts 0
    assert result["pixel_accuracy"] == pytest.approx(4 / 6)
    assert result["mean_accuracy"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert result["num_ignored"] == 1

"""Operators under CPU autocast (bfloat16): finite, float32 where it matters, close to fp32."""
from __future__ import annotations

import torch

from afa.ops import (
    affinity_labels_from_segmentation,
    affinity_loss,
    balanced_segmentation_loss,
    class_channel_index,
    multi_scale_cam,
    multilabel_soft_margin_loss,
    pixel_adaptive_refinement,
    propagate_cams_with_affinity,
    refine_cams_with_par,
)
from afa.ops.random_walk import _random_walk
from tests.reference_ops import random_images, random_labels_and_boxes
from tests.test_ops_cam import FakeCamNetwork


def _bf16_autocast():
    return torch.autocast(device_type="cpu", dtype=torch.bfloat16)


def _inputs():
    batch, classes, height, width = 2, 4, 32, 48
    images = random_images(batch, height, width, seed=0)
    cams = torch.rand(batch, classes, height, width, generator=torch.Generator().manual_seed(1))
    labels, boxes = random_labels_and_boxes(batch, classes, height, width, seed=2)
    affinity = torch.rand(batch, 6, 6, generator=torch.Generator().manual_seed(3))
    return images, cams, labels, boxes, (affinity + affinity.transpose(1, 2)) / 2


def test_float32_inputs_give_float32_results_under_autocast():
    images, cams, labels, boxes, affinity = _inputs()
    grid = dict(implementation="dense", radius=1, grid_size=(2, 3))

    walk_affinity = torch.rand(2, 20, 20, generator=torch.Generator().manual_seed(5))  # a 4×5 grid, r = 1

    def run():
        return (
            pixel_adaptive_refinement(images, cams),
            refine_cams_with_par(images, cams, labels, boxes),
            propagate_cams_with_affinity(cams, labels, affinity, images, boxes, **grid),
            *(_random_walk(cams[:, :, :4, :5].flatten(2), labels, class_channel_index(labels), walk_affinity,
                           (4, 5), 1, (0.35, 0.55), choice) for choice in ("dense", "windowed")),
        )

    plain = run()
    with _bf16_autocast():
        mixed = run()
    for a, b in zip(plain, mixed):
        assert a.dtype == b.dtype and (a.float() - b.float()).abs().max() <= 1e-6


def test_low_precision_inputs_stay_finite_and_close():
    images, cams, labels, boxes, affinity = _inputs()
    grid = dict(implementation="dense", radius=1, grid_size=(2, 3))
    with _bf16_autocast():
        refined = pixel_adaptive_refinement(images.bfloat16(), cams.bfloat16())
        par_label = refine_cams_with_par(images.bfloat16(), cams.bfloat16(), labels, boxes)
        propagated = propagate_cams_with_affinity(
            cams.bfloat16(), labels, affinity.bfloat16(), images.bfloat16(), boxes, **grid)
    assert refined.dtype == torch.float32 and torch.isfinite(refined).all()
    assert (refined - pixel_adaptive_refinement(images, cams)).abs().max() <= 2e-2
    assert (par_label == refine_cams_with_par(images, cams, labels, boxes)).float().mean() >= 0.97
    expected = propagate_cams_with_affinity(cams, labels, affinity, images, boxes, **grid)
    assert (propagated == expected).float().mean() >= 0.97


def test_multi_scale_cam_under_autocast():
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    plain, plain_affinity = multi_scale_cam(FakeCamNetwork(3), images)
    with _bf16_autocast():
        mixed, mixed_affinity = multi_scale_cam(FakeCamNetwork(3), images)
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed).all()
    assert (mixed - plain).abs().max() <= 5e-2
    assert mixed_affinity is not None and plain_affinity is not None
    assert (mixed_affinity.float() - plain_affinity).abs().max() <= 5e-2


def test_losses_under_autocast_are_float32_finite_and_close():
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 5, 8, 8, generator=generator)
    target = torch.randint(0, 5, (2, 32, 32), generator=generator)
    target[:, :4] = 255
    class_logits = torch.randn(2, 4, generator=generator)
    class_labels = (torch.rand(2, 4, generator=generator) < 0.5).float()
    prediction = torch.rand(2, 16, 16, generator=generator)
    affinity_targets = affinity_labels_from_segmentation(target, (4, 4), radius=1)
    plain = (balanced_segmentation_loss(logits, target), multilabel_soft_margin_loss(class_logits, class_labels),
             affinity_loss(prediction, affinity_targets)[0])
    low = [x.bfloat16().requires_grad_() for x in (logits, class_logits, prediction)]
    with _bf16_autocast():
        mixed = (balanced_segmentation_loss(low[0], target), multilabel_soft_margin_loss(low[1], class_labels),
                 affinity_loss(low[2], affinity_targets)[0])
    sum(mixed).backward()
    for a, b in zip(plain, mixed):
        assert b.dtype == torch.float32 and torch.isfinite(b)
        assert abs(a.item() - b.item()) <= 2e-2 * max(1.0, abs(a.item()))
    assert all(torch.isfinite(x.grad).all() for x in low)

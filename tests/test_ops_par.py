"""PAR (AFA.md §5) and PAR inside valid boxes (§7) against per-image references."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from afa.ops import (
    pixel_adaptive_refinement,
    pixel_adaptive_refinement_in_boxes,
    refine_cams_with_par,
    resample_boxes_bilinear,
)
from afa.ops.par import _position_kernel
from tests.reference_ops import (
    IGN,
    random_images,
    random_labels_and_boxes,
    reference_par,
    reference_par_in_boxes,
    reference_par_single,
    reference_refine_cams_with_par,
)

TOLERANCE = 1e-5


def test_par_matches_per_image_reference():
    images = random_images(3, 33, 41, seed=0)
    masks = torch.rand(3, 5, 17, 20, generator=torch.Generator().manual_seed(1))
    ours = pixel_adaptive_refinement(images, masks)
    expected = reference_par(images, masks)
    assert ours.shape == (3, 5, 33, 41)
    assert (ours - expected).abs().max() <= TOLERANCE


def test_par_other_parameters_match_reference():
    images = random_images(2, 20, 26, seed=2)
    masks = torch.rand(2, 3, 20, 26, generator=torch.Generator().manual_seed(3))
    kwargs = dict(dilations=(1, 3), num_iterations=4, w1=0.5, w2=0.1)
    ours = pixel_adaptive_refinement(images, masks, **kwargs)
    assert (ours - reference_par(images, masks, **kwargs)).abs().max() <= TOLERANCE


def test_par_extents_equal_par_on_the_cropped_image():
    images = random_images(3, 30, 36, seed=4)
    masks = torch.rand(3, 4, 30, 36, generator=torch.Generator().manual_seed(5))
    extents = torch.tensor([[30, 36], [17, 25], [3, 2]])
    ours = pixel_adaptive_refinement(images, masks, extents=extents)
    for i, (height, width) in enumerate(extents.tolist()):
        expected = reference_par_single(images[i:i + 1, :, :height, :width], masks[i:i + 1, :, :height, :width])
        assert (ours[i, :, :height, :width] - expected[0]).abs().max() <= TOLERANCE


@pytest.mark.parametrize("height,width", [(1, 1), (3, 4), (2, 30)])
def test_par_on_tiny_images_matches_reference(height: int, width: int):
    images = random_images(2, 8, 32, seed=17)[:, :, :height, :width]
    masks = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(18))
    assert (pixel_adaptive_refinement(images, masks) - reference_par(images, masks)).abs().max() <= TOLERANCE


def test_par_kernel_ignores_image_normalisation():
    images = random_images(2, 24, 24, seed=6)
    masks = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(7))
    mean = torch.tensor([123.675, 116.28, 103.53])[:, None, None]
    std = torch.tensor([58.395, 57.12, 57.375])[:, None, None]
    raw = pixel_adaptive_refinement(images, masks)
    normalised = pixel_adaptive_refinement((images - mean) / std, masks)
    assert (raw - normalised).abs().max() <= 1e-4


def test_par_scales_constant_masks_by_one_plus_w2_per_iteration():
    images = random_images(2, 16, 18, seed=8)
    masks = torch.full((2, 2, 16, 18), 0.5)
    ours = pixel_adaptive_refinement(images, masks, num_iterations=3)
    assert torch.allclose(ours, torch.full_like(ours, 0.5 * 1.01 ** 3), atol=1e-6)


def test_position_kernel_is_cached():
    first = _position_kernel((1, 2, 4, 8, 12, 24), 0.3, 0.01, torch.device("cpu"))
    second = _position_kernel((1, 2, 4, 8, 12, 24), 0.3, 0.01, torch.device("cpu"))
    assert first is second and first.shape == (48,)


@pytest.mark.parametrize("align_corners", [False, True])
def test_resample_boxes_matches_interpolate_per_image(align_corners: bool):
    generator = torch.Generator().manual_seed(9)
    x = torch.rand(3, 4, 30, 40, generator=generator)
    src = torch.tensor([[0, 30, 0, 40], [3, 20, 5, 33], [7, 10, 1, 4]])
    dst = torch.tensor([[0, 15, 0, 20], [2, 9, 0, 13], [0, 1, 1, 2]])
    ours = resample_boxes_bilinear(x, src, dst, (16, 21), align_corners)
    for i in range(3):
        t, b, l, r = src[i].tolist()
        dt, db, dl, dr = dst[i].tolist()
        expected = torch.zeros(4, 16, 21)
        expected[:, dt:db, dl:dr] = F.interpolate(
            x[i:i + 1, :, t:b, l:r], size=(db - dt, dr - dl), mode="bilinear", align_corners=align_corners)[0]
        assert (ours[i] - expected).abs().max() <= 1e-6


def test_par_in_boxes_matches_per_image_crops():
    images = random_images(3, 40, 46, seed=10)
    masks = torch.rand(3, 4, 40, 46, generator=torch.Generator().manual_seed(11))
    _, boxes = random_labels_and_boxes(3, 5, 40, 46, seed=12)
    ours = pixel_adaptive_refinement_in_boxes(images, masks, boxes)
    expected = reference_par_in_boxes(images, masks, boxes)
    assert (ours - expected).abs().max() <= TOLERANCE


def test_refine_cams_with_par_matches_reference():
    batch, classes, height, width = 3, 6, 48, 56
    images = random_images(batch, height, width, seed=13)
    cams = torch.rand(batch, classes, height, width, generator=torch.Generator().manual_seed(14))
    labels, boxes = random_labels_and_boxes(batch, classes, height, width, seed=15)
    expected = reference_refine_cams_with_par(images, cams, labels, boxes)
    ours = refine_cams_with_par(images, cams, labels, boxes)
    assert ours.dtype == torch.int64
    assert torch.equal(ours, expected)
    # Threshold order is irrelevant; compacting to the present classes changes nothing.
    assert torch.equal(refine_cams_with_par(images, cams, labels, boxes, thresholds=(0.35, 0.55)), expected)
    most = int(labels.sum(dim=1).max())
    assert torch.equal(refine_cams_with_par(images, cams, labels, boxes, max_classes_per_image=most), expected)
    # Absent classes never appear.
    for i in range(batch):
        present = {0, IGN} | {c + 1 for c in torch.nonzero(labels[i])[:, 0].tolist()}
        assert set(ours[i].unique().tolist()) <= present


def test_too_small_class_bound_is_reported():
    labels = torch.tensor([[1.0, 1.0, 1.0]])
    images = random_images(1, 8, 8, seed=16)
    with pytest.raises(RuntimeError, match="max_classes_per_image"):
        refine_cams_with_par(images, torch.rand(1, 3, 8, 8), labels, torch.tensor([[0, 8, 0, 8]]),
                             max_classes_per_image=1)


def test_zero_iterations_is_par_off():
    # method.par.num_iterations=0 (the w/o-PAR ablation): the masks as resized, no refinement.
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 12, 10, generator=generator)
    masks = torch.rand(2, 4, 6, 5, generator=generator)
    expected = F.interpolate(masks, size=(12, 10), mode="bilinear", align_corners=True)
    torch.testing.assert_close(pixel_adaptive_refinement(images, masks, num_iterations=0), expected)

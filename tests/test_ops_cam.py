"""Multi-scale CAMs and labels from CAMs (AFA.md §3, §4, §5 combination)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from afa.constants import IGNORE_INDEX as SHARED_IGNORE_INDEX
from afa.data.classes import IGNORE_INDEX as DATA_IGNORE_INDEX
from afa.ops import (
    IGNORE_INDEX,
    cam_to_label,
    cam_to_training_label,
    combine_threshold_labels,
    multi_scale_cam,
    propagate_cams_with_affinity,
    refine_cams_with_par,
    valid_box_mask,
    valid_cams,
)
from tests.reference_ops import (
    IGN,
    random_images,
    random_labels_and_boxes,
    reference_cam_to_label,
    reference_cam_to_training_label,
    reference_multi_scale_cam,
)

TOLERANCE = 1e-5


class FakeCamNetwork:
    """A tiny CAM-only forward: stride-4 features, a 1×1 classifier, a feature-similarity
    affinity; records its calls."""

    def __init__(self, classes: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.embed = torch.randn(8, 3, 1, 1, generator=generator)
        self.classifier = torch.randn(classes, 8, 1, 1, generator=generator)
        self.calls: list[tuple[tuple[int, ...], int]] = []

    def __call__(self, images: torch.Tensor, affinity_images: int):
        self.calls.append((tuple(images.shape), affinity_images))
        features = torch.tanh(F.conv2d(F.avg_pool2d(images, 4), self.embed))  # (b, 8, h/4, w/4)
        cams = F.conv2d(features, self.classifier)
        if affinity_images == 0:
            return cams, None
        flat = features[:affinity_images].flatten(2)  # (a, 8, N)
        return cams, torch.sigmoid(flat.transpose(1, 2) @ flat)


def test_multi_scale_cam_matches_per_image_reference_in_one_call_per_scale():
    images = torch.randn(3, 3, 32, 40, generator=torch.Generator().manual_seed(0))
    network = FakeCamNetwork(classes=5)
    cams, affinity = multi_scale_cam(network, images, scales=(1.0, 0.5, 1.5))
    # One call per scale, image and flip together; affinity asked only at the largest scale.
    assert [call for call in network.calls] == [
        ((6, 3, 32, 40), 0), ((6, 3, 16, 20), 0), ((6, 3, 48, 60), 3)]
    expected_cams, expected_affinity = reference_multi_scale_cam(FakeCamNetwork(classes=5), images, [1.0, 0.5, 1.5])
    assert cams.shape == (3, 5, 32, 40) and cams.dtype == torch.float32
    assert (cams - expected_cams).abs().max() <= TOLERANCE
    assert affinity is not None and affinity.shape == (3, 12 * 15, 12 * 15)
    assert (affinity - expected_affinity).abs().max() <= TOLERANCE
    flat = cams.flatten(2)
    assert torch.all(flat.amin(dim=2) == 0) and torch.all(flat.amax(dim=2) < 1)


def test_multi_scale_cam_without_affinity():
    network = FakeCamNetwork(classes=2)
    cams, affinity = multi_scale_cam(network, torch.randn(2, 3, 16, 16), scales=(1.0,), with_affinity=False)
    assert affinity is None and cams.shape == (2, 2, 16, 16)
    assert network.calls == [((4, 3, 16, 16), 0)]


def test_cam_labels_match_reference():
    generator = torch.Generator().manual_seed(1)
    cams = torch.rand(4, 6, 20, 24, generator=generator)
    labels, boxes = random_labels_and_boxes(4, 6, 20, 24, seed=2)
    assert torch.equal(cam_to_label(cams, labels, 0.45), reference_cam_to_label(cams, labels, 0.45))
    ours = cam_to_training_label(cams, labels, boxes, high=0.55, low=0.35)
    assert torch.equal(ours, reference_cam_to_training_label(cams, labels, boxes, 0.55, 0.35))
    assert torch.equal(valid_cams(cams, labels)[labels == 0], torch.zeros_like(cams[labels == 0]))


def test_combination_rules():
    high = torch.tensor([[[0, 0, 2, 3, 0]]])
    low = torch.tensor([[[0, 1, 2, 0, 0]]])
    inside = torch.tensor([[[True, True, True, True, False]]])
    combined = combine_threshold_labels(high, low, inside)
    assert combined.tolist() == [[[0, IGN, 2, 3, IGN]]]


def test_ignore_index_is_the_one_of_afa_constants_in_ops_and_data():
    assert IGNORE_INDEX == DATA_IGNORE_INDEX == SHARED_IGNORE_INDEX == IGN


def test_training_labels_never_mark_padding_as_background():
    batch, classes, height, width = 3, 4, 32, 40
    images = random_images(batch, height, width, seed=3)
    # CAMs all low: inside the box everything would be background.
    cams = 0.1 * torch.rand(batch, classes, height, width, generator=torch.Generator().manual_seed(4))
    labels, boxes = random_labels_and_boxes(batch, classes, height, width, seed=5)
    outside = ~valid_box_mask(boxes, height, width)
    assert outside.any()  # some crops are padded
    affinity = torch.rand(batch, 4, 4)
    produced = {
        "cam": cam_to_training_label(cams, labels, boxes),
        "par": refine_cams_with_par(images, cams, labels, boxes),
        "propagated": propagate_cams_with_affinity(
            cams, labels, affinity, images, boxes, implementation="windowed", radius=1),
    }
    for name, label in produced.items():
        assert torch.all(label[outside] == IGN), name
        assert torch.any(label[~outside] == 0), name

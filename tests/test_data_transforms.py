"""Training augmentation (AFA.md §9): rescale, flip, crop with zero padding, valid box."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.fixtures import banded_sample
from afa.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TrainAugmentation, normalize_to_tensor

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def denormalize(image: torch.Tensor) -> torch.Tensor:
    return image * STD + MEAN


def test_normalize_matches_formula():
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    tensor = normalize_to_tensor(image)
    expected = (torch.from_numpy(image).permute(2, 0, 1).float() - MEAN) / STD
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 5, 7)
    torch.testing.assert_close(tensor, expected)


def test_small_image_is_padded_with_rgb_zero_inside_a_random_box():
    image = np.full((20, 30, 3), 200, np.uint8)
    augment = TrainAugmentation(crop_size=64, scale_range=(1.0, 1.0), flip_prob=0.0)
    sample = augment(image, np.random.default_rng(3))
    top, bottom, left, right = sample["valid_box"].tolist()
    assert sample["valid_box"].dtype == torch.int64
    assert (bottom - top, right - left) == (20, 30)
    restored = denormalize(sample["image"])
    inside = torch.zeros(64, 64, dtype=torch.bool)
    inside[top:bottom, left:right] = True
    torch.testing.assert_close(restored[:, inside], torch.full((3, 600), 200.0), atol=1e-3, rtol=0)
    torch.testing.assert_close(restored[:, ~inside], torch.zeros(3, 64 * 64 - 600), atol=1e-3, rtol=0)


def test_large_image_crop_is_fully_valid_and_a_window_of_the_image():
    image = np.arange(100 * 120, dtype=np.int64).reshape(100, 120)
    rgb = np.stack([image % 251, image // 251 % 251, np.zeros_like(image)], axis=2).astype(np.uint8)
    augment = TrainAugmentation(crop_size=32, scale_range=(1.0, 1.0), flip_prob=0.0)
    sample = augment(rgb, np.random.default_rng(0))
    assert sample["valid_box"].tolist() == [0, 32, 0, 32]
    crop = denormalize(sample["image"]).round().to(torch.int64).permute(1, 2, 0).numpy()
    code = crop[..., 1] * 251 + crop[..., 0]  # recover the flat pixel index
    row0, col0 = divmod(int(code[0, 0]), 120)
    np.testing.assert_array_equal(code, image[row0 : row0 + 32, col0 : col0 + 32])


def test_same_seed_same_sample_and_seeds_differ():
    image = np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    augment = TrainAugmentation(crop_size=40)
    first = augment(image, np.random.default_rng(42))
    again = augment(image, np.random.default_rng(42))
    other = augment(image, np.random.default_rng(43))
    torch.testing.assert_close(first["image"], again["image"])
    assert torch.equal(first["valid_box"], again["valid_box"])
    assert not torch.equal(first["image"], other["image"])


def test_flip_mirrors_the_image():
    image = np.zeros((10, 10, 3), np.uint8)
    image[:, :3] = 255  # left stripe
    augment = TrainAugmentation(crop_size=10, scale_range=(1.0, 1.0), flip_prob=1.0)
    restored = denormalize(augment(image, np.random.default_rng(0))["image"])
    assert restored[:, :, -3:].min() > 254 and restored[:, :, :-3].max() < 1


def test_scale_range_bounds_the_rescaled_size():
    image = np.zeros((40, 40, 3), np.uint8)
    augment = TrainAugmentation(crop_size=200, scale_range=(0.5, 2.0), flip_prob=0.0)
    sides = []
    for seed in range(30):
        top, bottom, _, _ = augment(image, np.random.default_rng(seed))["valid_box"].tolist()
        sides.append(bottom - top)
    assert 20 <= min(sides) and max(sides) <= 80 and max(sides) - min(sides) > 30


@pytest.mark.parametrize("seed", range(4))
def test_mask_follows_the_image_geometry(seed):
    image, mask = banded_sample(60, 80, [3, 15])
    mask[:, :25] = 0  # left-right asymmetric, so a flip of only the image would show
    image[:, :25] = (128, 128, 128)
    augment = TrainAugmentation(crop_size=72, scale_range=(0.5, 2.0), flip_prob=0.5)
    sample = augment(image, np.random.default_rng(seed), mask)
    crop_mask = sample["mask"]
    top, bottom, left, right = sample["valid_box"].tolist()
    assert crop_mask.dtype == torch.int64 and crop_mask.shape == (72, 72)
    outside = torch.ones(72, 72, dtype=torch.bool)
    outside[top:bottom, left:right] = False
    assert (crop_mask[outside] == 255).all() and (crop_mask[~outside] != 255).all()
    # Band colours: class 3 (128,128,0), class 15 (192,128,128); check pixels away from edges.
    restored = denormalize(sample["image"])
    for class_index, red in ((3, 128.0), (15, 192.0)):
        region = crop_mask == class_index
        eroded = region.clone()
        eroded[1:-1, 1:-1] &= region[:-2, 1:-1] & region[2:, 1:-1] & region[1:-1, :-2] & region[1:-1, 2:]
        eroded[[0, -1], :] = False
        eroded[:, [0, -1]] = False
        if eroded.any():
            assert (restored[0][eroded] - red).abs().max() < 2.0


@pytest.mark.parametrize("scale", [0.37, 0.55, 1.0, 1.73])
def test_rescale_equals_the_reference_pil_resize(scale):
    """AFA.md §9: PIL bilinear (antialiased when shrinking), sides int(scale * side)."""
    from PIL import Image

    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (47, 101, 3), dtype=np.uint8)
    mask = rng.integers(0, 21, (47, 101), dtype=np.uint8)
    augment = TrainAugmentation(crop_size=200, scale_range=(scale, scale), flip_prob=0.0)
    sample = augment(image, np.random.default_rng(0), mask)
    size = (int(101 * scale), int(47 * scale))
    expected = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    expected_mask = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))
    top, bottom, left, right = sample["valid_box"].tolist()
    assert (right - left, bottom - top) == size
    restored = denormalize(sample["image"])[:, top:bottom, left:right].permute(1, 2, 0)
    torch.testing.assert_close(restored, torch.tensor(expected).float(), atol=1e-3, rtol=0)
    np.testing.assert_array_equal(sample["mask"][top:bottom, left:right].numpy(), expected_mask)
    if scale < 1:  # the shrink is antialiased: OpenCV's plain bilinear gives other pixels
        import cv2

        plain = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        assert np.abs(plain.astype(int) - expected.astype(int)).max() > 10

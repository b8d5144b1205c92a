"""AffinityNet augmentation (PSA.md §4): colour jitter, no rescale, padding after normalisation."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from afa.data import CropTrainDataset, voc_index
from afa.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ColorJitter,
    TrainAugmentation,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    hsv_to_rgb,
    rgb_to_hsv,
)
from tests.fixtures import write_voc_fixture

PSA_JITTER = {"brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "hue": 0.1}
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _image(height: int = 37, width: int = 53, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _digest(sample: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in ("image", "valid_box", "mask"):
        digest.update(sample[key].numpy().tobytes())
    return digest.hexdigest()[:16]


def test_defaults_give_the_samples_of_before_the_jitter_option():
    # Digests of TrainAugmentation(crop_size=48) at cb7a53a (before color_jitter, scale_range=None
    # and pad_after_normalize existed): the default path is bit-identical.
    image = _image()
    mask = np.random.default_rng(1).integers(0, 21, (37, 53), dtype=np.uint8)
    augment = TrainAugmentation(crop_size=48)
    digests = [_digest(augment(image, np.random.default_rng(seed), mask)) for seed in range(4)]
    assert digests == ["806b8df001097b71", "0a4cee90d3fc24c5", "0362c7bd4f777231", "66382c2a523189c9"]
    explicit = TrainAugmentation(crop_size=48, color_jitter=None, pad_after_normalize=False)
    assert _digest(explicit(image, np.random.default_rng(0), mask)) == digests[0]


@pytest.fixture
def voc_root(tmp_path):
    return write_voc_fixture(tmp_path, {"a": [1, 15], "b": [7]}, splits={"mine": ["a", "b"]}, size=(40, 56))


def _dataset(root, **options) -> CropTrainDataset:
    index = voc_index(root, split="mine", labels_file=root / "cls_labels.json", image_ext=".png", with_masks=True)
    return CropTrainDataset(index, crop_size=48, return_mask=True, **options)


def test_dataset_passes_its_options_to_the_augmentation(voc_root):
    plain, jittered = _dataset(voc_root), _dataset(voc_root, color_jitter=PSA_JITTER, scale_range=None)
    assert plain.augmentation.color_jitter is None and plain.augmentation.scale_range == (0.5, 2.0)
    assert jittered.augmentation.color_jitter.strengths == PSA_JITTER
    assert jittered.augmentation.scale_range is None
    image = plain.load_image(0)
    mask = plain.load_mask(0, image.shape[:2])
    expected = TrainAugmentation(48)(image, np.random.default_rng(5), mask)
    sample = plain[(0, 5)]
    assert all(torch.equal(sample[key], expected[key]) for key in expected)
    with pytest.raises(ValueError, match="unknown keys"):
        _dataset(voc_root, color_jitter={"brightnes": 0.3})


def test_jitter_is_deterministic_per_seed_and_differs_across_seeds(voc_root):
    dataset = _dataset(voc_root, color_jitter=PSA_JITTER, scale_range=None)
    first, again, other = dataset[(1, 11)], dataset[(1, 11)], dataset[(1, 12)]
    assert all(torch.equal(first[key], again[key]) for key in ("image", "valid_box", "mask"))
    assert not torch.equal(first["image"], other["image"])
    plain = _dataset(voc_root, scale_range=None)[(1, 11)]
    assert not torch.equal(first["image"], plain["image"])  # the jitter changed the colours


def test_no_rescale_keeps_the_image_size_and_padding_is_rgb_zero_and_ignore():
    augment = TrainAugmentation(crop_size=64, scale_range=None, color_jitter=PSA_JITTER)
    image = np.full((40, 50, 3), 200, np.uint8)
    mask = np.full((40, 50), 3, np.uint8)
    for seed in range(5):
        sample = augment(image, np.random.default_rng(seed), mask)
        top, bottom, left, right = sample["valid_box"].tolist()
        assert (bottom - top, right - left) == (40, 50)
        inside = torch.zeros(64, 64, dtype=torch.bool)
        inside[top:bottom, left:right] = True
        restored = sample["image"] * STD + MEAN
        torch.testing.assert_close(restored[:, ~inside], torch.zeros(3, int((~inside).sum())), atol=1e-3, rtol=0)
        assert (sample["mask"][~inside] == 255).all() and (sample["mask"][inside] == 3).all()
    with pytest.raises(ValueError, match="scale_range"):
        TrainAugmentation(scale_range=(2.0, 1.0))


def test_pad_after_normalize_zeroes_the_padding_and_keeps_the_image():
    image = _image(30, 20)
    rgb_zero = TrainAugmentation(crop_size=48, scale_range=None)(image, np.random.default_rng(3))
    mean_pad = TrainAugmentation(crop_size=48, scale_range=None, pad_after_normalize=True)(
        image, np.random.default_rng(3))
    top, bottom, left, right = mean_pad["valid_box"].tolist()
    inside = torch.zeros(48, 48, dtype=torch.bool)
    inside[top:bottom, left:right] = True
    assert torch.equal(mean_pad["valid_box"], rgb_zero["valid_box"])
    assert torch.equal(mean_pad["image"][:, inside], rgb_zero["image"][:, inside])
    assert (mean_pad["image"][:, ~inside] == 0).all() and (rgb_zero["image"][:, ~inside] < 0).all()


def test_factor_ranges():
    jitter = ColorJitter(**PSA_JITTER)
    draws = [jitter.sample_factors(np.random.default_rng(seed)) for seed in range(2000)]
    for step, (low, high) in {"brightness": (0.7, 1.3), "contrast": (0.7, 1.3),
                              "saturation": (0.7, 1.3), "hue": (-0.1, 0.1)}.items():
        values = np.array([draw[step] for draw in draws])
        assert low <= values.min() < low + 0.01 and high - 0.01 < values.max() <= high, step
    assert ColorJitter(brightness=1.5).sample_factors(np.random.default_rng(0)).keys() == {"brightness"}
    assert min(ColorJitter(brightness=1.5).sample_factors(np.random.default_rng(s))["brightness"]
               for s in range(500)) >= 0.0  # low end clamped at 0, as torchvision does
    with pytest.raises(ValueError):
        ColorJitter(hue=0.6)


def test_brightness_scales_and_saturates_without_wrapping():
    image = np.array([[[100, 200, 250]]], np.uint8)
    np.testing.assert_allclose(adjust_brightness(image.astype(np.float32), 1.3), [[[130, 255, 255]]], rtol=1e-6)
    np.testing.assert_allclose(adjust_brightness(image.astype(np.float32), 0.7), [[[70, 140, 175]]], rtol=1e-6)
    out = ColorJitter().apply(image, {"brightness": 1.3})
    assert out.dtype == np.float32 and out.max() == 255.0


def test_jitter_output_stays_in_range():
    jitter = ColorJitter(**PSA_JITTER)
    image = _image(16, 16)
    image[:4] = 255
    image[4:8] = 0
    extremes = {"brightness": 1.3, "contrast": 1.3, "saturation": 1.3, "hue": 0.1}
    for factors in (extremes, {"brightness": 0.7, "contrast": 0.7, "saturation": 0.7, "hue": -0.1}):
        out = jitter.apply(image, factors)
        assert out.dtype == np.float32 and out.min() >= 0.0 and out.max() <= 255.0
    for seed in range(20):
        out = jitter(image, np.random.default_rng(seed))
        assert out.dtype == np.uint8 and out.shape == image.shape


@pytest.mark.parametrize(
    ("shift", "expected"),
    [(1 / 3, (0, 255, 0)), (-1 / 3, (0, 0, 255)), (0.1, (255, 153, 0)), (-0.1, (255, 0, 153)), (0.5, (0, 255, 255))],
)
def test_hue_shift_of_pure_red(shift, expected):
    red = np.array([[[255.0, 0.0, 0.0]]], np.float32)
    np.testing.assert_allclose(adjust_hue(red, shift)[0, 0], expected, atol=1e-3)


def test_hue_shift_keeps_greys_and_hsv_round_trips():
    greys = np.array([[[0, 0, 0], [128, 128, 128], [255, 255, 255]]], np.float32)
    np.testing.assert_allclose(adjust_hue(greys, 0.25), greys, atol=1e-4)
    image = _image(8, 9).astype(np.float32)
    np.testing.assert_allclose(hsv_to_rgb(*rgb_to_hsv(image)), image, atol=1e-3)
    np.testing.assert_allclose(adjust_hue(adjust_hue(image, 0.1), -0.1), image, atol=1e-2)


def test_matches_torchvision_functional_on_float_images():
    from afa.compat import import_timm

    import_timm()  # lets torchvision import with a CPU-only torch
    functional = pytest.importorskip("torchvision.transforms.functional")
    image = _image(12, 10, seed=4).astype(np.float32)
    tensor = torch.from_numpy(image).permute(2, 0, 1) / 255.0
    cases = [
        (adjust_brightness, functional.adjust_brightness, 1.25), (adjust_contrast, functional.adjust_contrast, 0.75),
        (adjust_saturation, functional.adjust_saturation, 1.3), (adjust_hue, functional.adjust_hue, 0.07),
        (adjust_hue, functional.adjust_hue, -0.1),
    ]
    for ours, theirs, factor in cases:
        expected = theirs(tensor, factor).permute(1, 2, 0).numpy() * 255.0
        np.testing.assert_allclose(ours(image, factor), expected, atol=2e-3, err_msg=f"{ours.__name__}({factor})")

"""AffinityNet's training crops (PSA.md §4) and their window of the CAM stage's grid label (§2)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from afa.data import AffinityCropDataset, DatasetError, ImageIndex, normalize_to_tensor
from afa.data.classes import IGNORE_INDEX, VOC_CLASSES
from afa.data.readers import write_index_mask
from afa.ops.psa import confident_region_label

HEIGHT, WIDTH, NUM_CLASSES = 70, 90, 20
PRESENT = (3, 12)


def _smooth_cams(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, H, W) float64 CAMs of the present classes, smooth blobs normalised to max 1, and (C,) labels."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.zeros(NUM_CLASSES, dtype=torch.float64)
    labels[torch.tensor(PRESENT) - 1] = 1
    coarse = torch.rand((NUM_CLASSES, 4, 5), generator=generator, dtype=torch.float64) ** 3
    cams = F.interpolate(coarse[None], size=(HEIGHT, WIDTH), mode="bilinear", align_corners=False)[0]
    cams = cams / cams.flatten(1).amax(1).view(-1, 1, 1) * labels.view(-1, 1, 1)
    return cams, labels


@pytest.fixture
def split(tmp_path):
    """One 70×90 image with its saved grid label, as the CAM stage writes it."""
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    label_dir = tmp_path / "affinity_labels"
    label_dir.mkdir()
    image_path = tmp_path / "images" / "img.png"
    Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(image_path)
    cams, labels = _smooth_cams(0)
    grid = confident_region_label(cams[None], labels[None])[0]
    assert grid.shape == (9, 12)
    assert {0, IGNORE_INDEX} | set(PRESENT) == set(grid.unique().tolist())  # every kind of cell occurs
    write_index_mask(label_dir / "img.png", grid.numpy().astype(np.uint8))
    index = ImageIndex(names=("img",), image_paths=(image_path,), mask_paths=None,
                       labels=(PRESENT,), class_names=VOC_CLASSES, description="test split")
    return index, label_dir, cams, labels, image_path


def _aligned_window(array: torch.Tensor, sample: dict, padded_hw: tuple[int, int]) -> torch.Tensor:
    """``array`` (..., H, W) zero-padded to the canvas, flipped as the sample, cropped at its crop_box with 0."""
    height, width = array.shape[-2:]
    canvas = array.new_zeros((*array.shape[:-2], *padded_hw))
    canvas[..., :height, :width] = array
    if sample["flipped"]:
        canvas = canvas.flip(-1)
    top, bottom, left, right = sample["crop_box"].tolist()
    pad = (max(0, -left), max(0, right - padded_hw[1]), max(0, -top), max(0, bottom - padded_hw[0]))
    canvas = F.pad(canvas, pad)  # the crop's part beyond the canvas: 0 / False
    return canvas[..., top + pad[2]:bottom + pad[2], left + pad[0]:right + pad[0]]


@pytest.mark.parametrize("crop_size", [32, 48, 128])
def test_grid_label_is_the_confident_region_label_of_the_cropped_cam(split, crop_size):
    index, label_dir, cams, labels, _ = split
    dataset = AffinityCropDataset(index, label_dir, crop_size=crop_size, color_jitter=None)
    seen = set()
    for seed in range(12):
        sample = dataset[(0, seed)]
        top, _, left, _ = sample["crop_box"].tolist()
        assert top % 8 == 0 and left % 8 == 0
        seen.add((top, left, bool(sample["flipped"])))
        crop_cams = _aligned_window(cams, sample, (72, 96))
        valid = _aligned_window(torch.ones(HEIGHT, WIDTH, dtype=torch.bool), sample, (72, 96))
        expected = confident_region_label(crop_cams[None], labels[None], valid=valid[None])[0]
        assert sample["grid_label"].dtype == torch.int64
        assert sample["grid_label"].shape == (crop_size // 8, crop_size // 8)
        assert torch.equal(sample["grid_label"], expected), (seed, sample["crop_box"], sample["flipped"])
    assert len(seen) > 4 and {flip for *_, flip in seen} == {False, True}


@pytest.mark.parametrize("crop_size", [32, 128])
def test_image_is_the_normalised_image_window_and_zero_outside(split, crop_size):
    index, label_dir, _, _, image_path = split
    dataset = AffinityCropDataset(index, label_dir, crop_size=crop_size, color_jitter=None)
    image = normalize_to_tensor(np.asarray(Image.open(image_path)))
    for seed in range(8):
        sample = dataset[(0, seed)]
        assert sample["image"].shape == (3, crop_size, crop_size) and sample["image"].dtype == torch.float32
        expected = _aligned_window(image, sample, (72, 96))
        inside = _aligned_window(torch.ones(HEIGHT, WIDTH, dtype=torch.bool), sample, (72, 96))
        assert torch.equal(sample["image"], expected)
        assert (sample["image"][:, ~inside] == 0).all()
        top, bottom, left, right = sample["valid_box"].tolist()
        box = torch.zeros_like(inside)
        box[top:bottom, left:right] = True
        assert torch.equal(box, inside)


def test_crop_larger_than_the_image_holds_it_at_an_aligned_offset(split):
    index, label_dir, *_ = split
    sample = AffinityCropDataset(index, label_dir, crop_size=160)[(0, 3)]
    top, bottom, left, right = sample["crop_box"].tolist()
    assert -top % 8 == 0 and -left % 8 == 0 and -88 <= top <= 0 and -64 <= left <= 0
    assert (bottom - top, right - left) == (160, 160)
    grid = sample["grid_label"]
    inside = torch.zeros_like(grid, dtype=torch.bool)
    inside[-top // 8:-top // 8 + 9, -left // 8:-left // 8 + 12] = True
    assert (grid[~inside] == IGNORE_INDEX).all() and (grid[inside] != IGNORE_INDEX).any()


def test_same_seed_same_sample_and_seeds_differ(split):
    index, label_dir, *_ = split
    dataset = AffinityCropDataset(index, label_dir, crop_size=48)  # with the PSA jitter
    first, again = dataset[(0, 7)], dataset[(0, 7)]
    assert first["name"] == "img" and first.keys() == again.keys()
    for key in ("image", "grid_label", "crop_box", "valid_box", "flipped"):
        assert torch.equal(first[key], again[key])
    others = [dataset[(0, seed)] for seed in range(8, 12)]
    assert any(not torch.equal(first["image"], other["image"]) for other in others)
    assert any(not torch.equal(first["crop_box"], other["crop_box"]) for other in others)
    assert dataset[0]["image"].shape == (3, 48, 48)  # a plain index draws its own seed


def test_jitter_changes_pixels_but_not_geometry(split):
    index, label_dir, *_ = split
    plain = AffinityCropDataset(index, label_dir, crop_size=48, color_jitter=None)[(0, 5)]
    jittered = AffinityCropDataset(index, label_dir, crop_size=48)[(0, 5)]
    assert not torch.equal(plain["image"], jittered["image"])
    off = AffinityCropDataset(index, label_dir, crop_size=48, color_jitter={"hue": 0.0})[(0, 5)]
    assert torch.equal(plain["image"], off["image"])  # zero strengths draw nothing


@pytest.mark.parametrize("crop_size", [450, 0, -8])
def test_crop_size_must_be_a_positive_multiple_of_the_stride(split, crop_size):
    index, label_dir, *_ = split
    with pytest.raises(ValueError, match="crop_size"):
        AffinityCropDataset(index, label_dir, crop_size=crop_size)


def test_missing_label_file_says_run_the_cam_stage(split, tmp_path):
    index, *_ = split
    dataset = AffinityCropDataset(index, tmp_path / "nowhere", crop_size=48)
    with pytest.raises(DatasetError, match="run the CAM stage first") as error:
        dataset[(0, 0)]
    assert str(tmp_path / "nowhere" / "img.png") in str(error.value) and "\n" not in str(error.value)


def test_label_of_the_wrong_size_is_refused(split):
    index, label_dir, *_ = split
    write_index_mask(label_dir / "img.png", np.zeros((9, 11), np.uint8))
    with pytest.raises(DatasetError, match="re-run the CAM stage"):
        AffinityCropDataset(index, label_dir, crop_size=48)[(0, 0)]

"""The synthetic WSSS benchmark: determinism, label/mask consistency, marks, caching."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from afa.data import (
    SYNTHETIC_CLASSES,
    SyntheticDiskTrainDataset,
    SyntheticEvalDataset,
    SyntheticTrainDataset,
    generate_split_image,
    prepare_synthetic,
    read_image,
    read_mask,
)
from afa.data.__main__ import main as cli
from afa.data.synthetic import DEFAULT_SPEC, GENERATOR_VERSION, MANIFEST_NAME, MARK_HUES, partner_class

SMALL = {"num_train": 6, "num_val": 4, "num_test": 3, "workers": 1}


def test_generation_is_deterministic():
    first = generate_split_image(0, "val", 3)
    again = generate_split_image(0, "val", 3)
    assert np.array_equal(first.image, again.image) and np.array_equal(first.mask, again.mask)
    assert first.classes == again.classes
    assert not np.array_equal(generate_split_image(0, "val", 4).image[:8, :8], first.image[:8, :8])
    assert not np.array_equal(generate_split_image(1, "val", 3).image[:8, :8], first.image[:8, :8])
    assert not np.array_equal(generate_split_image(0, "test", 3).image[:8, :8], first.image[:8, :8])


# (H, W), classes, foreground pixels, mean RGB sum of val images 0..4 at seed 0, version 3.
FINGERPRINT = [
    ((128, 192), (4,), 1244, 395), ((192, 128), (5, 6), 2870, 318), ((128, 192), (1, 2), 3416, 329),
    ((128, 128), (1, 2), 5390, 451), ((160, 160), (8,), 1536, 365),
]


def test_generator_output_matches_its_version():
    """A change to the generator's output must bump GENERATOR_VERSION (caches key on it)."""
    assert GENERATOR_VERSION == 3, "update FINGERPRINT for the new version"
    for index, (size, classes, foreground, mean_rgb_sum) in enumerate(FINGERPRINT):
        sample = generate_split_image(0, "val", index)
        assert sample.mask.shape == size and sample.classes == classes
        assert abs(int(((sample.mask > 0) & (sample.mask < 255)).sum()) - foreground) <= 0.02 * foreground
        assert abs(int(sample.image.astype(np.int64).sum()) // sample.mask.size - mean_rgb_sum) <= 2


def test_labels_match_masks_and_values_are_in_range():
    sizes, object_counts = set(), []
    for index in range(40):
        sample = generate_split_image(0, "train", index)
        height, width = sample.mask.shape
        assert sample.image.shape == (height, width, 3) and sample.image.dtype == np.uint8
        sizes.add((height, width))
        values, counts = np.unique(sample.mask, return_counts=True)
        assert set(values.tolist()) <= set(range(len(SYNTHETIC_CLASSES))) | {255}
        present = {int(v) for v, n in zip(values, counts) if 0 < v < 255 and n >= 30}
        assert present == set(sample.classes) and 1 <= len(sample.classes) <= 3
        assert (sample.mask == 0).mean() > 0.3  # objects never fill the image
        object_counts.append(len(sample.classes))
    assert sizes <= set(DEFAULT_SPEC.image_sizes) and len(sizes) >= 4
    assert set(object_counts) == {1, 2, 3}


def test_each_object_carries_its_class_hue_and_a_larger_neutral_body():
    for index in range(15):
        sample = generate_split_image(0, "val", index)
        hsv = cv2.cvtColor(sample.image, cv2.COLOR_RGB2HSV_FULL).astype(np.float32) / 255.0
        for class_index in sample.classes:
            region = sample.mask == class_index
            saturated = region & (hsv[..., 1] > 0.7) & (hsv[..., 2] > 0.6)
            assert saturated.sum() >= 40, "the mark is visible"
            assert saturated.sum() < 0.6 * region.sum(), "the body is larger than the mark"
            hue = hsv[..., 0][saturated]
            distance = np.abs((hue - MARK_HUES[class_index - 1] + 0.5) % 1.0 - 0.5)
            assert np.median(distance) < 0.04, "the mark's hue identifies the class"
        background = sample.mask == 0
        assert (hsv[..., 1][background] > 0.7).mean() < 0.01, "no mark colours in the background"


def test_partner_classes_co_occur():
    assert partner_class(1) == 2 and partner_class(2) == 1 and partner_class(8) == 7
    pairs = sum(
        any(partner_class(c) in sample.classes for c in sample.classes)
        for sample in (generate_split_image(0, "train", i) for i in range(60))
        if len(sample.classes) >= 2
    )
    assert pairs >= 8  # far above the ~1/8 chance rate per multi-object image


def test_prepare_writes_voc_layout_and_caches(tmp_path):
    folder = prepare_synthetic(tmp_path, seed=3, **SMALL)
    assert folder == tmp_path / "VOCdevkit" / "VOC2012"
    listing = (folder / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert listing == [f"synth_val_{i:06d}" for i in range(4)]
    labels = json.loads((folder / "cls_labels.json").read_text())
    assert len(labels) == 13
    for name in listing:
        mask = read_mask(folder / "SegmentationClass" / f"{name}.png")
        assert sorted(set(np.unique(mask).tolist()) - {0, 255}) == labels[name]
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["seed"] == 3 and manifest["splits"] == {"train": 6, "val": 4, "test": 3}
    stamp = (folder / MANIFEST_NAME).stat().st_mtime_ns
    assert prepare_synthetic(tmp_path, seed=3, **SMALL) == folder
    assert (folder / MANIFEST_NAME).stat().st_mtime_ns == stamp  # cached: nothing rewritten
    prepare_synthetic(tmp_path, seed=3, **{**SMALL, "num_val": 2})
    assert len((folder / "ImageSets" / "Segmentation" / "val.txt").read_text().split()) == 2
    assert not list(folder.parent.glob(".VOC2012*"))  # no staging leftovers


def test_disk_train_split_equals_the_on_the_fly_stream(tmp_path):
    folder = prepare_synthetic(tmp_path, seed=0, **SMALL)
    for index in (0, 5):
        generated = generate_split_image(0, "train", index)
        name = f"synth_train_{index:06d}"
        assert np.array_equal(read_image(folder / "JPEGImages" / f"{name}.png"), generated.image)
        assert np.array_equal(read_mask(folder / "SegmentationClass" / f"{name}.png"), generated.mask)


def test_parallel_generation_writes_the_same_files(tmp_path):
    serial = prepare_synthetic(tmp_path / "one", seed=0, **SMALL)
    parallel = prepare_synthetic(tmp_path / "two", seed=0, **{**SMALL, "workers": 2})
    for path in sorted((serial / "JPEGImages").iterdir()):
        assert path.read_bytes() == (parallel / "JPEGImages" / path.name).read_bytes()


def test_refuses_to_overwrite_a_real_dataset(tmp_path):
    (tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not a synthetic benchmark"):
        prepare_synthetic(tmp_path, **SMALL)


def test_datasets_over_the_generated_layout(tmp_path, capsys):
    evaluation = SyntheticEvalDataset(tmp_path, split="val", **{k: v for k, v in SMALL.items() if k != "workers"})
    assert evaluation.class_names == SYNTHETIC_CLASSES and evaluation.num_classes == 8 and len(evaluation) == 4
    sample = evaluation[0]
    expected = generate_split_image(0, "val", 0)
    assert torch.equal(sample["mask"], torch.from_numpy(expected.mask.astype(np.int64)))
    assert (torch.nonzero(sample["labels"]).flatten() + 1).tolist() == list(expected.classes)
    train = SyntheticDiskTrainDataset(tmp_path, crop_size=64, **{k: v for k, v in SMALL.items() if k != "workers"})
    assert len(train) == 6 and train[(2, 9)]["image"].shape == (3, 64, 64)
    assert cli(["check", "--layout", "synthetic", "--root", str(tmp_path), "--split", "test", "--no-progress"]) == 0
    assert "problems: 0" in capsys.readouterr().out


def test_on_the_fly_train_dataset():
    dataset = SyntheticTrainDataset(seed=0, length=1000, crop_size=96, return_mask=True)
    assert len(dataset) == 1000 and dataset.num_classes == 8
    first, again = dataset[(17, 5)], dataset[(17, 5)]
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["valid_box"], again["valid_box"])
    assert first["image"].shape == (3, 96, 96) and first["mask"].shape == (96, 96)
    classes = generate_split_image(0, "train", 17).classes
    assert (torch.nonzero(first["labels"]).flatten() + 1).tolist() == list(classes)
    with pytest.raises(IndexError):
        dataset[1000]

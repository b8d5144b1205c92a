"""The synthetic WSSS benchmark: determinism, label/mask consistency, marks, caching."""
from __future__ import annotations

import json
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch

from afa.data import (
    SYNTHETIC_CLASSES,
    CropTrainDataset,
    FullImageEvalDataset,
    SyntheticIndex,
    SyntheticTrainDataset,
    generate_split_image,
    prepare_synthetic,
    read_image,
    read_mask,
)
from afa.data.__main__ import main as cli
from afa.data.synthetic import (
    DEFAULT_SPEC,
    GENERATOR_VERSION,
    MANIFEST_NAME,
    MARK_HUES,
    _render,
    as_spec,
    image_seed,
    partner_class,
)
from afa.data.transforms import IMAGENET_MEAN

SMALL = {"num_train": 6, "num_val": 4, "num_test": 3, "workers": 1}


def test_generation_is_deterministic():
    first = generate_split_image(0, "val", 3)
    again = generate_split_image(0, "val", 3)
    assert np.array_equal(first.image, again.image) and np.array_equal(first.mask, again.mask)
    assert first.classes == again.classes
    assert not np.array_equal(generate_split_image(0, "val", 4).image[:8, :8], first.image[:8, :8])
    assert not np.array_equal(generate_split_image(1, "val", 3).image[:8, :8], first.image[:8, :8])
    assert not np.array_equal(generate_split_image(0, "test", 3).image[:8, :8], first.image[:8, :8])


# (H, W), classes, foreground pixels, mean R, G, B, saturated pixels (HSV S > 0.7, V > 0.6)
# of val images 0..4 at seed 0, version 5.
FINGERPRINT = [
    ((128, 192), (4,), 1244, (145, 120, 127), 285),
    ((192, 128), (5, 6), 2870, (106, 113, 91), 1005),
    ((128, 192), (1, 2), 3416, (128, 107, 93), 1457),
    ((128, 128), (1, 2), 5390, (176, 156, 110), 1585),
    ((160, 160), (8,), 1536, (126, 124, 111), 534),
]


def _saturated(image: np.ndarray) -> np.ndarray:
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL).astype(np.float32) / 255.0
    return (hsv[..., 1] > 0.7) & (hsv[..., 2] > 0.6)


def test_generator_output_matches_its_version():
    """A change to the generator's output must bump GENERATOR_VERSION (caches key on it)."""
    assert GENERATOR_VERSION == 5, "update FINGERPRINT for the new version"
    for index, (size, classes, foreground, mean_rgb, saturated) in enumerate(FINGERPRINT):
        sample = generate_split_image(0, "val", index)
        assert sample.mask.shape == size and sample.classes == classes
        assert abs(int(((sample.mask > 0) & (sample.mask < 255)).sum()) - foreground) <= 0.02 * foreground
        means = sample.image.reshape(-1, 3).astype(np.float64).mean(axis=0)
        assert np.abs(means - np.asarray(mean_rgb)).max() <= 1.0
        assert abs(int(_saturated(sample.image).sum()) - saturated) <= 0.05 * saturated


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
    plain_shares = []
    for index in range(15):
        sample, parts = _render(image_seed(0, "val", index), DEFAULT_SPEC)
        hsv = cv2.cvtColor(sample.image, cv2.COLOR_RGB2HSV_FULL).astype(np.float32) / 255.0
        for obj, class_index in enumerate(parts["classes"], start=1):
            body, core = parts["instances"] == obj, parts["marks"] == obj
            assert core.sum() >= 40, "the mark is visible"
            assert core.sum() < 0.3 * body.sum(), "the body is much larger than the mark"
            assert (hsv[..., 1][core] > 0.7).mean() > 0.9, "the mark is saturated"
            distance = np.abs((hsv[..., 0][core] - MARK_HUES[class_index - 1] + 0.5) % 1.0 - 0.5)
            assert np.median(distance) < 0.04, "the mark's hue identifies the class"
            plain_shares.append((body & (hsv[..., 1] < 0.3)).sum() / body.sum())
        background = sample.mask == 0
        assert (hsv[..., 1][background] > 0.7).mean() < 0.01, "no mark colours in the background"
    assert np.median(plain_shares) > 0.2, "the tint fades: much of the body keeps its neutral colour"


def test_greys_are_balanced_to_the_normalisation_mean():
    """Backgrounds average to the ImageNet mean colour's balance (R > G > B), not to grey."""
    means = np.mean([generate_split_image(0, "val", i).image[:8, :8].reshape(-1, 3).mean(0) for i in range(40)], 0)
    balance = means / means.mean()
    assert np.allclose(balance, np.asarray(IMAGENET_MEAN) / np.mean(IMAGENET_MEAN), atol=0.03)


def test_spec_overrides_reach_the_datasets(tmp_path):
    spec = {"mark_tint": 0.0, "mark_halo": 0.5, "neutral_rgb": [1, 1, 1]}
    assert as_spec(spec) == replace(DEFAULT_SPEC, mark_tint=0.0, mark_halo=0.5, neutral_rgb=(1, 1, 1))
    assert as_spec(None) is DEFAULT_SPEC and as_spec(DEFAULT_SPEC) is DEFAULT_SPEC
    expected = generate_split_image(0, "train", 3, as_spec(spec))
    assert not np.array_equal(expected.image, generate_split_image(0, "train", 3).image)
    train = SyntheticTrainDataset(length=10, crop_size=64, scale_range=(1.0, 1.0), flip_prob=0.0, spec=spec)
    assert train.spec == as_spec(spec)
    sizes = {k: v for k, v in SMALL.items() if k != "workers"}
    evaluation = FullImageEvalDataset(SyntheticIndex(tmp_path, split="val", spec=spec, **sizes))
    evaluation.prepare()
    generated = generate_split_image(0, "val", 1, as_spec(spec))
    assert torch.equal(evaluation[1]["mask"], torch.from_numpy(generated.mask.astype(np.int64)))
    folder = tmp_path / "VOCdevkit" / "VOC2012"
    assert np.array_equal(read_image(folder / "JPEGImages" / "synth_val_000001.png"), generated.image)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["spec"]["mark_halo"] == 0.5 and manifest["version"] == GENERATOR_VERSION


def test_parts_match_the_mask():
    image, parts = _render(image_seed(0, "val", 2), DEFAULT_SPEC)
    assert image.mask.shape == parts["instances"].shape == parts["marks"].shape
    for obj, cls in enumerate(parts["classes"], start=1):
        body = parts["instances"] == obj
        assert (parts["marks"] == obj).any() and ((parts["marks"] == obj) <= body).all()
        assert set(np.unique(image.mask[body]).tolist()) <= {cls, 255}


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
    sizes = {k: v for k, v in SMALL.items() if k != "workers"}
    evaluation = FullImageEvalDataset(SyntheticIndex(tmp_path, split="val", **sizes))
    train = CropTrainDataset(SyntheticIndex(tmp_path, split="train", **sizes), crop_size=64, return_mask=True)
    assert evaluation.class_names == SYNTHETIC_CLASSES and evaluation.num_classes == 8  # before prepare()
    assert not tmp_path.joinpath("VOCdevkit").exists()  # constructing generates nothing
    with pytest.raises(RuntimeError, match=r"split 'val' is not prepared .*call dataset\.prepare\(\) first"):
        len(evaluation)
    evaluation.prepare()
    evaluation.prepare()  # idempotent: the cache is found
    assert len(evaluation) == 4
    assert evaluation.image_sizes == [generate_split_image(0, "val", i).image.shape[:2] for i in range(4)]
    sample = evaluation[0]
    expected = generate_split_image(0, "val", 0)
    assert torch.equal(sample["mask"], torch.from_numpy(expected.mask.astype(np.int64)))
    assert (torch.nonzero(sample["labels"]).flatten() + 1).tolist() == list(expected.classes)
    assert len(train) == 6 and train[(2, 9)]["image"].shape == (3, 64, 64)  # prepared by evaluation's prepare()
    assert train[(2, 9)]["mask"].shape == (64, 64)
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

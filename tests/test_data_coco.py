"""COCO: building VOC-style masks and labels from instances json, then loading them."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from afa.data import COCO_CLASSES, CropTrainDataset, FullImageEvalDataset, coco_index
from afa.data.__main__ import main as cli
from afa.data.coco_masks import build_coco_split
from tests.fixtures import write_coco_fixture
from afa.data.readers import DatasetError, read_mask

PERSON, CAR, DOG = 1, 3, 17
NAMES = [f"COCO_val2014_00000000000{i}" for i in (1, 2, 3)]


@pytest.fixture
def built(tmp_path):
    coco_root = write_coco_fixture(tmp_path / "coco")
    out = tmp_path / "MSCOCO"
    counts = build_coco_split(coco_root, out, "val", show_progress=False)
    return coco_root, out, counts


def test_class_indices_follow_official_category_order():
    assert COCO_CLASSES[PERSON] == "person" and COCO_CLASSES[CAR] == "car" and COCO_CLASSES[DOG] == "dog"


def test_masks_polygons_rle_overlap_and_crowd(built):
    _, out, counts = built
    assert counts == {"images": 3, "written": 3, "skipped": 0, "missing_images": 0}
    first = read_mask(out / "SegmentationClass" / "val" / f"{NAMES[0]}.png")
    assert first.shape == (40, 60)
    expected = np.zeros((40, 60), np.uint8)
    expected[5:25, 5:35] = PERSON
    expected[10:20, 20:30] = DOG  # the smaller instance stays on top of the larger one
    expected[30:40, :] = 255  # crowd region → ignore
    np.testing.assert_array_equal(first, expected)
    second = read_mask(out / "SegmentationClass" / "val" / f"{NAMES[1]}.png")
    assert (second[:15] == CAR).all() and (second[15:] == 0).all()  # compressed RLE
    third = read_mask(out / "SegmentationClass" / "val" / f"{NAMES[2]}.png")
    assert third.shape == (20, 20) and (third == 0).all()


def test_labels_include_every_annotated_category(built):
    _, out, _ = built
    labels = json.loads((out / "cls_labels_val.json").read_text())
    assert labels == {NAMES[0]: [PERSON, DOG], NAMES[1]: [CAR], NAMES[2]: []}


def test_images_are_linked(built):
    coco_root, out, _ = built
    link = out / "JPEGImages" / "val" / f"{NAMES[0]}.jpg"
    assert link.is_symlink() and os.path.samefile(link, coco_root / "val2014" / f"{NAMES[0]}.jpg")


def test_build_resumes_and_skips_finished_masks(built):
    coco_root, out, _ = built
    mask_dir = out / "SegmentationClass" / "val"
    finished = mask_dir / f"{NAMES[0]}.png"
    before = finished.stat().st_mtime_ns
    (mask_dir / f"{NAMES[1]}.png").unlink()  # as if the build was killed before this image
    counts = build_coco_split(coco_root, out, "val", show_progress=False)
    assert counts["written"] == 1 and counts["skipped"] == 2
    assert finished.stat().st_mtime_ns == before
    assert (read_mask(mask_dir / f"{NAMES[1]}.png")[:15] == CAR).all()
    assert not list(mask_dir.glob(".*partial*"))


def test_missing_annotation_file_says_where(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"instances_val2014\.json not found"):
        build_coco_split(tmp_path, tmp_path / "out", "val", show_progress=False)


def test_unknown_category_is_an_error(tmp_path):
    coco_root = write_coco_fixture(tmp_path / "coco")
    path = coco_root / "annotations" / "instances_val2014.json"
    instances = json.loads(path.read_text())
    instances["annotations"][0]["category_id"] = 12  # a gap in COCO's ids
    path.write_text(json.dumps(instances))
    with pytest.raises(DatasetError, match=r"category ids \[12\]"):
        build_coco_split(coco_root, tmp_path / "out", "val", show_progress=False)


def test_cli_build_then_datasets_load(tmp_path, capsys):
    coco_root = write_coco_fixture(tmp_path / "coco")
    out = tmp_path / "MSCOCO"
    assert cli(["build-coco", "--coco-root", str(coco_root), "--out", str(out), "--split", "val", "--no-progress"]) == 0
    assert "3 masks written" in capsys.readouterr().out
    split_file = tmp_path / "two.txt"
    split_file.write_text(f"{NAMES[0]}\n{NAMES[1]}\n")
    dataset = FullImageEvalDataset(coco_index(out, split="val", split_file=split_file, with_masks=True))
    assert dataset.num_classes == 80 and len(dataset.class_names) == 81
    sample = dataset[0]
    assert sample["mask"].shape == (40, 60) and int(sample["mask"][15, 25]) == DOG
    assert torch.nonzero(sample["labels"]).flatten().tolist() == [PERSON - 1, DOG - 1]
    train = CropTrainDataset(coco_index(out, split="val", split_file=split_file), crop_size=32)
    assert train[(1, 5)]["image"].shape == (3, 32, 32)
    # The image without annotations has no foreground label: refused unless allowed.
    split_file.write_text(f"{NAMES[2]}\n")
    with pytest.raises(DatasetError, match="no foreground class"):
        CropTrainDataset(coco_index(out, split="val", split_file=split_file))
    assert cli(["check", "--layout", "coco", "--root", str(out), "--split", "val",
                "--split-file", str(split_file), "--no-progress"]) == 1
    assert "no foreground class in the image labels" in capsys.readouterr().out


def test_packaged_split_and_missing_labels_message(tmp_path):
    (tmp_path / "MSCOCO" / "JPEGImages" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"cls_labels_train\.json not found: build it with python -m afa\.data build-coco"):
        CropTrainDataset(coco_index(tmp_path / "MSCOCO", "train"))
    index = coco_index(tmp_path / "MSCOCO", split="train", with_masks=False, with_labels=False, subset="train")
    dataset = FullImageEvalDataset(index)
    assert len(dataset) == 82081 and dataset.names[0].startswith("COCO_train2014_")

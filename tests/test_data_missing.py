"""Construction-time errors: a missing root, folder, split list or labels file, per layout."""
from __future__ import annotations

import pytest

from afa.data import (
    COCOEvalDataset,
    COCOTrainDataset,
    CustomEvalDataset,
    CustomTrainDataset,
    SyntheticEvalDataset,
    VOCEvalDataset,
    VOCTrainDataset,
)
from afa.data.fixtures import write_custom_fixture, write_voc_fixture


@pytest.mark.parametrize("build, pattern", [
    (lambda p: VOCTrainDataset(p / "none"), r"VOC root .*none not found: set dataset\.root"),
    (lambda p: VOCEvalDataset(p / "none"), r"VOC root .*none not found"),
    (lambda p: COCOTrainDataset(p / "none"), r"COCO root .*none not found: set dataset\.root"),
    (lambda p: COCOEvalDataset(p / "none"), r"COCO root .*none not found"),
    (lambda p: CustomTrainDataset(p / "none", p / "labels.csv", ["cat"]), r"images_dir .*none not found"),
    (lambda p: CustomEvalDataset(p, p / "none.csv", ["cat"]), r"labels file .*none\.csv not found"),
])
def test_missing_root_or_labels_is_named(tmp_path, build, pattern):
    with pytest.raises(FileNotFoundError, match=pattern):
        build(tmp_path)


def test_voc_root_without_images_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"JPEGImages not found: the VOC root must hold JPEGImages/"):
        VOCTrainDataset(tmp_path)


def test_missing_explicit_split_file(tmp_path):
    root = write_voc_fixture(tmp_path, {"a": [1]})
    with pytest.raises(FileNotFoundError, match=r"split_file .*gone\.txt not found"):
        VOCTrainDataset(root, split_file=tmp_path / "gone.txt", labels_file=root / "cls_labels.json")
    paths = write_custom_fixture(tmp_path / "custom", {"a.png": ["cat"]}, ["cat"])
    with pytest.raises(FileNotFoundError, match=r"split list .*gone\.txt not found"):
        CustomTrainDataset(paths["images_dir"], paths["labels_file"], ["cat"], split_file=tmp_path / "gone.txt")


def test_empty_and_duplicated_split_lists(tmp_path):
    root = write_voc_fixture(tmp_path, {"a": [1], "b": [2]})
    listing = tmp_path / "list.txt"
    listing.write_text("\n# nothing\n")
    with pytest.raises(ValueError, match=r"list\.txt names no image"):
        VOCTrainDataset(root, split_file=listing, labels_file=root / "cls_labels.json")
    listing.write_text("a\nb\na\n")
    with pytest.raises(ValueError, match=r"names 1 image\(s\) more than once \(e\.g\. \['a'\]\)"):
        VOCTrainDataset(root, split_file=listing, labels_file=root / "cls_labels.json")


def test_custom_eval_with_masks_but_no_masks_dir_folder(tmp_path):
    paths = write_custom_fixture(tmp_path, {"a.png": ["cat"]}, ["cat"], with_masks=False)
    with pytest.raises(FileNotFoundError, match=r"masks_dir .*nomasks not found"):
        CustomEvalDataset(paths["images_dir"], paths["labels_file"], ["cat"], masks_dir=tmp_path / "nomasks")


def test_malformed_labels_files(tmp_path):
    paths = write_custom_fixture(tmp_path, {"a.png": ["cat"]}, ["cat"], labels_format="json")
    paths["labels_file"].write_text("{not json")
    with pytest.raises(ValueError, match=r"labels\.json is not valid JSON"):
        CustomTrainDataset(paths["images_dir"], paths["labels_file"], ["cat"])
    csv_file = tmp_path / "bad.csv"
    csv_file.write_text("a.png,cat,extra\n")
    with pytest.raises(ValueError, match=r"bad\.csv, line 1: expected 'image,class1;class2'"):
        CustomTrainDataset(paths["images_dir"], csv_file, ["cat"])


def test_synthetic_eval_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "VOCdevkit" / "VOC2012").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not a synthetic benchmark"):
        SyntheticEvalDataset(tmp_path)

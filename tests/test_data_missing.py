"""Construction-time errors: a missing root, folder, split list or labels file, per layout
(raised by the index functions), and what a dataset needs of its index."""
from __future__ import annotations

import pytest

from afa.data import CropTrainDataset, FullImageEvalDataset, SyntheticIndex, coco_index, custom_index, voc_index
from tests.fixtures import write_custom_fixture, write_voc_fixture


@pytest.mark.parametrize("build, pattern", [
    (lambda p: voc_index(p / "none", "train_aug"), r"VOC root .*none not found: set dataset\.root"),
    (lambda p: voc_index(p / "none", "val", with_masks=True), r"VOC root .*none not found"),
    (lambda p: coco_index(p / "none", "train"), r"COCO root .*none not found: set dataset\.root"),
    (lambda p: coco_index(p / "none", "val", with_masks=True), r"COCO root .*none not found"),
    (lambda p: custom_index(p / "none", p / "labels.csv", ["cat"]), r"images_dir .*none not found"),
    (lambda p: custom_index(p, p / "none.csv", ["cat"]), r"labels file .*none\.csv not found"),
])
def test_missing_root_or_labels_is_named(tmp_path, build, pattern):
    with pytest.raises(FileNotFoundError, match=pattern):
        build(tmp_path)


def test_voc_root_without_images_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"JPEGImages not found: the VOC root must hold JPEGImages/"):
        voc_index(tmp_path, "train_aug")


def test_missing_explicit_split_file(tmp_path):
    root = write_voc_fixture(tmp_path, {"a": [1]})
    with pytest.raises(FileNotFoundError, match=r"split_file .*gone\.txt not found"):
        voc_index(root, "train_aug", split_file=tmp_path / "gone.txt", labels_file=root / "cls_labels.json")
    paths = write_custom_fixture(tmp_path / "custom", {"a.png": ["cat"]}, ["cat"])
    with pytest.raises(FileNotFoundError, match=r"split list .*gone\.txt not found"):
        custom_index(paths["images_dir"], paths["labels_file"], ["cat"], split_file=tmp_path / "gone.txt")


def test_empty_and_duplicated_split_lists(tmp_path):
    root = write_voc_fixture(tmp_path, {"a": [1], "b": [2]})
    listing = tmp_path / "list.txt"
    listing.write_text("\n# nothing\n")
    with pytest.raises(ValueError, match=r"list\.txt names no image"):
        voc_index(root, "train_aug", split_file=listing, labels_file=root / "cls_labels.json")
    listing.write_text("a\nb\na\n")
    with pytest.raises(ValueError, match=r"names 1 image\(s\) more than once \(e\.g\. \['a'\]\)"):
        voc_index(root, "train_aug", split_file=listing, labels_file=root / "cls_labels.json")


def test_custom_eval_with_masks_but_no_masks_dir_folder(tmp_path):
    paths = write_custom_fixture(tmp_path, {"a.png": ["cat"]}, ["cat"], with_masks=False)
    with pytest.raises(FileNotFoundError, match=r"masks_dir .*nomasks not found"):
        custom_index(paths["images_dir"], paths["labels_file"], ["cat"], masks_dir=tmp_path / "nomasks")


def test_malformed_labels_files(tmp_path):
    paths = write_custom_fixture(tmp_path, {"a.png": ["cat"]}, ["cat"], labels_format="json")
    paths["labels_file"].write_text("{not json")
    with pytest.raises(ValueError, match=r"labels\.json is not valid JSON"):
        custom_index(paths["images_dir"], paths["labels_file"], ["cat"])
    csv_file = tmp_path / "bad.csv"
    csv_file.write_text("a.png,cat,extra\n")
    with pytest.raises(ValueError, match=r"bad\.csv, line 1: expected 'image,class1;class2'"):
        custom_index(paths["images_dir"], csv_file, ["cat"])


def test_synthetic_eval_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "VOCdevkit" / "VOC2012").mkdir(parents=True)
    dataset = FullImageEvalDataset(SyntheticIndex(tmp_path))  # constructing writes nothing
    with pytest.raises(FileExistsError, match="not a synthetic benchmark"):
        dataset.prepare()


def test_train_dataset_needs_labels_and_masks_its_options_use(tmp_path):
    root = write_voc_fixture(tmp_path, {"a": [1]})
    labels = {"split": "all", "labels_file": root / "cls_labels.json", "image_ext": ".png"}
    with pytest.raises(ValueError, match=r"return_mask=True needs masks; .* build the index with with_masks=True"):
        CropTrainDataset(voc_index(root, **labels), return_mask=True)
    with pytest.raises(ValueError, match="training needs image labels"):
        CropTrainDataset(voc_index(root, "all", image_ext=".png", with_labels=False))
    with_masks = CropTrainDataset(voc_index(root, **labels, with_masks=True), crop_size=16, return_mask=True)
    assert "mask" in with_masks[(0, 1)]

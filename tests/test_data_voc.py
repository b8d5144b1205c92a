"""PASCAL VOC layout: split and label resolution, samples, errors, and the real voc-sample."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from afa.data import VOC_CLASSES, CropTrainDataset, FullImageEvalDataset, voc_index
from afa.data.__main__ import main as cli
from tests.fixtures import write_voc_fixture
from afa.data.layouts import packaged_split_dir, read_split_file
from afa.data.readers import DatasetError, write_index_mask

SAMPLES = {"img_a": [1, 15], "img_b": [7], "img_c": [12, 3, 20]}


@pytest.fixture
def voc_root(tmp_path) -> Path:
    return write_voc_fixture(tmp_path, SAMPLES, splits={"mine": list(SAMPLES)}, image_ext=".jpg")


def own_labels(root: Path) -> dict:
    return {"split": "mine", "labels_file": root / "cls_labels.json"}


def test_train_sample_keys_shapes_and_labels(voc_root):
    dataset = CropTrainDataset(voc_index(voc_root, **own_labels(voc_root)), crop_size=32)
    assert len(dataset) == 3 and dataset.num_classes == 20 and dataset.class_names == VOC_CLASSES
    sample = dataset[(2, 7)]
    assert sample["name"] == "img_c"
    assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.float32
    assert sample["valid_box"].shape == (4,) and sample["valid_box"].dtype == torch.int64
    assert sample["labels"].dtype == torch.float32
    assert torch.nonzero(sample["labels"]).flatten().tolist() == [2, 11, 19]  # classes 3, 12, 20
    assert "mask" not in sample
    assert isinstance(dataset[0]["image"], torch.Tensor)  # a plain index works too


def test_train_batches_collate(voc_root):
    dataset = CropTrainDataset(voc_index(voc_root, **own_labels(voc_root)), crop_size=24)
    batch = next(iter(DataLoader(dataset, batch_size=3)))
    assert batch["image"].shape == (3, 3, 24, 24) and batch["labels"].shape == (3, 20)
    assert batch["valid_box"].shape == (3, 4) and len(batch["name"]) == 3


def test_eval_sample_has_full_image_mask_and_labels(voc_root):
    dataset = FullImageEvalDataset(voc_index(voc_root, with_masks=True, **own_labels(voc_root)))
    sample = dataset[0]
    assert sample["image"].shape == (3, 48, 64)
    assert sample["mask"].dtype == torch.int64 and sample["mask"].shape == (48, 64)
    assert sorted(torch.unique(sample["mask"]).tolist()) == [0, 1, 15]
    assert torch.nonzero(sample["labels"]).flatten().tolist() == [0, 14]


def test_mask_folder_prefers_segmentation_class_aug(tmp_path):
    root = write_voc_fixture(tmp_path, {"x": [5]}, splits={"mine": ["x"]}, mask_folder="SegmentationClassAug")
    write_index_mask(root / "SegmentationClassAug" / "x.png", np.full((48, 64), 9, np.uint8))
    (root / "SegmentationClass").mkdir()
    write_index_mask(root / "SegmentationClass" / "x.png", np.full((48, 64), 5, np.uint8))
    dataset = FullImageEvalDataset(voc_index(root, image_ext=".png", with_masks=True, **own_labels(root)))
    assert int(dataset[0]["mask"][0, 0]) == 9


def test_falls_back_to_segmentation_class(voc_root):
    dataset = FullImageEvalDataset(voc_index(voc_root, with_masks=True, **own_labels(voc_root)))
    assert dataset.mask_path(0).parent.name == "SegmentationClass"


def test_standard_split_uses_packaged_lists_and_xml_labels(tmp_path):
    val_names = read_split_file(packaged_split_dir("voc") / "val.txt")
    assert len(val_names) == 1449
    assert len(read_split_file(packaged_split_dir("voc") / "train_aug.txt")) == 10582
    first = val_names[0]
    root = write_voc_fixture(tmp_path, {first: [1]}, image_ext=".jpg")
    dataset = FullImageEvalDataset(voc_index(root, split="val", with_masks=True))
    assert len(dataset) == 1449 and dataset.names[0] == first
    packaged = json.loads((packaged_split_dir("voc") / "cls_labels.json").read_text())
    sample = dataset[0]
    assert (torch.nonzero(sample["labels"]).flatten() + 1).tolist() == packaged[first]
    with pytest.raises(FileNotFoundError, match=val_names[1]):
        dataset[1]  # the fixture only holds the first image: the error names the missing file


def test_explicit_split_file(voc_root, tmp_path):
    listing = tmp_path / "two.txt"
    listing.write_text("# comment\nimg_b\n\n/JPEGImages/img_a.jpg\n")
    index = voc_index(voc_root, "val", split_file=listing, labels_file=voc_root / "cls_labels.json", with_masks=True)
    dataset = FullImageEvalDataset(index)
    assert dataset.names == ("img_b", "img_a")


def test_missing_root_says_what_to_set(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"VOC root .*nowhere not found: set dataset\.root"):
        CropTrainDataset(voc_index(tmp_path / "nowhere", "train_aug"))


def test_unknown_split_lists_what_exists(voc_root):
    with pytest.raises(FileNotFoundError, match=r"'nosuch'.*lists found there: \['mine'\]"):
        CropTrainDataset(voc_index(voc_root, split="nosuch"))


def test_missing_labels_file(voc_root):
    with pytest.raises(FileNotFoundError, match="labels file .*absent.json"):
        CropTrainDataset(voc_index(voc_root, split="mine", labels_file=voc_root / "absent.json"))


def test_images_without_labels_are_a_construction_error(voc_root):
    # The packaged labels know no "img_a": the error names the file and the fix.
    with pytest.raises(DatasetError, match=r"3 of 3 images have no entry in labels file .*cls_labels.json"):
        CropTrainDataset(voc_index(voc_root, split="mine"))


def test_image_without_foreground_label(voc_root):
    labels = json.loads((voc_root / "cls_labels.json").read_text())
    labels["img_b"] = []
    (voc_root / "cls_labels.json").write_text(json.dumps(labels))
    with pytest.raises(DatasetError, match=r"no foreground class .*\['img_b'\].*allow_background_only"):
        CropTrainDataset(voc_index(voc_root, **own_labels(voc_root)))
    dataset = CropTrainDataset(voc_index(voc_root, allow_background_only=True, **own_labels(voc_root)))
    assert dataset[1]["labels"].sum() == 0


def test_label_index_out_of_range(voc_root):
    (voc_root / "cls_labels.json").write_text(json.dumps({"img_a": [21], "img_b": [1], "img_c": [1]}))
    with pytest.raises(DatasetError, match=r"image 'img_a': class index 21 is outside 1\.\.20"):
        CropTrainDataset(voc_index(voc_root, **own_labels(voc_root)))


def test_test_split_needs_no_masks_or_labels(tmp_path):
    first = read_split_file(packaged_split_dir("voc") / "test.txt")[0]
    root = write_voc_fixture(tmp_path, {first: [1]}, image_ext=".jpg")
    with pytest.raises(DatasetError, match="with_labels=False"):
        FullImageEvalDataset(voc_index(root, split="test", with_masks=True))
    dataset = FullImageEvalDataset(voc_index(root, split="test", with_masks=False, with_labels=False))
    sample = dataset[0]
    assert set(sample) == {"name", "image"} and sample["image"].shape == (3, 48, 64)


def test_missing_mask_folder_says_how_to_infer_without(tmp_path):
    root = write_voc_fixture(tmp_path, {"x": [1]}, splits={"mine": ["x"]})
    for mask in (root / "SegmentationClass").iterdir():
        mask.unlink()
    (root / "SegmentationClass").rmdir()
    with pytest.raises(FileNotFoundError, match="with_masks=False"):
        FullImageEvalDataset(voc_index(root, image_ext=".png", with_masks=True, **own_labels(root)))


def test_missing_mask_file_at_load(voc_root):
    (voc_root / "SegmentationClass" / "img_b.png").unlink()
    dataset = FullImageEvalDataset(voc_index(voc_root, with_masks=True, **own_labels(voc_root)))
    dataset[0]
    with pytest.raises(FileNotFoundError, match=r"img_b\.png"):
        dataset[1]


def test_wrong_image_extension_hint(voc_root):
    dataset = FullImageEvalDataset(voc_index(voc_root, image_ext=".png", with_masks=True, **own_labels(voc_root)))
    with pytest.raises(FileNotFoundError, match=r"img_a\.jpg exists: set image_ext='\.jpg'"):
        dataset[0]


def test_mask_size_mismatch_at_load(voc_root):
    write_index_mask(voc_root / "SegmentationClass" / "img_a.png", np.zeros((10, 10), np.uint8))
    dataset = FullImageEvalDataset(voc_index(voc_root, with_masks=True, **own_labels(voc_root)))
    with pytest.raises(DatasetError, match=r"img_a\.png is 10x10 .* image is 48x64"):
        dataset[0]


def test_mask_values_out_of_range_at_load(voc_root):
    write_index_mask(voc_root / "SegmentationClass" / "img_b.png", np.full((48, 64), 33, np.uint8))
    dataset = FullImageEvalDataset(voc_index(voc_root, with_masks=True, **own_labels(voc_root)))
    with pytest.raises(DatasetError, match=r"img_b\.png holds values \[33\]"):
        dataset[1]


def test_corrupt_image_at_load(voc_root):
    (voc_root / "JPEGImages" / "img_c.jpg").write_bytes(b"\xff\xd8 garbage")
    dataset = CropTrainDataset(voc_index(voc_root, **own_labels(voc_root)), crop_size=16)
    with pytest.raises(DatasetError, match=r"img_c\.jpg cannot be decoded"):
        dataset[2]


def test_grayscale_image_loads_as_rgb(voc_root):
    Image.fromarray(np.full((48, 64), 77, np.uint8)).save(voc_root / "JPEGImages" / "img_b.jpg")
    image = FullImageEvalDataset(voc_index(voc_root, with_masks=True, **own_labels(voc_root)))[1]["image"]
    assert image.shape == (3, 48, 64)


def test_check_command_reports_counts_and_problems(voc_root, capsys):
    args = ["check", "--layout", "voc", "--root", str(voc_root), "--split", "mine",
            "--labels-file", str(voc_root / "cls_labels.json"), "--no-progress"]
    assert cli(args) == 0
    output = capsys.readouterr().out
    assert "problems: 0" in output
    person_row = next(line for line in output.splitlines() if " person " in line)
    assert person_row.split()[2:4] == ["1", "1"]  # labelled in 1 image, present in 1 mask
    write_index_mask(voc_root / "SegmentationClass" / "img_b.png", np.full((48, 64), 40, np.uint8))
    (voc_root / "JPEGImages" / "img_c.jpg").write_bytes(b"broken")
    assert cli(args) == 1
    output = capsys.readouterr().out
    assert "problems: 2" in output and "img_b.png holds values [40]" in output and "img_c.jpg cannot be decoded" in output
    assert cli(["check", "--layout", "voc", "--root", str(voc_root / "nope"), "--no-progress"]) == 2


def test_check_command_uses_the_root_labels_file_and_says_so(voc_root, capsys):
    # No --labels-file: the packaged labels know none of these images, <root>/cls_labels.json does.
    assert cli(["check", "--layout", "voc", "--root", str(voc_root), "--split", "mine", "--no-progress"]) == 0
    output = capsys.readouterr().out
    labels_lines = [line for line in output.splitlines() if line.startswith("labels file:")]
    assert len(labels_lines) == 1 and str(voc_root / "cls_labels.json") in labels_lines[0]
    assert "lack 3 of 3 images" in labels_lines[0] and "problems: 0" in output


def test_check_command_unlabelled_flag_and_error_names_it(voc_root, capsys):
    (voc_root / "cls_labels.json").unlink()
    args = ["check", "--layout", "voc", "--root", str(voc_root), "--split", "mine", "--no-progress"]
    assert cli(args) == 2
    output = capsys.readouterr().out
    assert "3 of 3 images have no entry in labels file" in output
    assert "pass --unlabelled" in output and "with_labels" not in output
    assert cli([*args, "--unlabelled"]) == 0
    output = capsys.readouterr().out
    assert "labels file: none (--unlabelled" in output and "problems: 0" in output
    person_row = next(line for line in output.splitlines() if " person " in line)
    assert person_row.split()[2:4] == ["-", "1"]  # no labels, present in 1 mask


def _voc_sample_root() -> Path | None:
    candidates = [os.environ.get("AFA_VOC_SAMPLE"), "/work/shared/data/voc-sample",
                  Path(__file__).resolve().parents[1].parent / "shared" / "data" / "voc-sample"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "VOCdevkit" / "VOC2012" / "JPEGImages").is_dir():
            return Path(candidate) / "VOCdevkit" / "VOC2012"
    return None


VOC_SAMPLE = _voc_sample_root()


@pytest.mark.skipif(VOC_SAMPLE is None, reason="voc-sample not found (set AFA_VOC_SAMPLE)")
def test_real_voc_sample_loads_with_right_labels_and_masks():
    labels_file = VOC_SAMPLE / "cls_labels.json"
    expected = json.loads(labels_file.read_text())
    dataset = FullImageEvalDataset(voc_index(VOC_SAMPLE, split="all", labels_file=labels_file, with_masks=True))
    assert len(dataset) == 103
    sizes = set()
    for position in range(len(dataset)):
        sample = dataset[position]
        classes = (torch.nonzero(sample["labels"]).flatten() + 1).tolist()
        assert classes == expected[sample["name"]]
        mask = sample["mask"]
        assert mask.shape == sample["image"].shape[1:]
        present = sorted(set(np.unique(mask.numpy()).tolist()) - {0, 255})
        assert present == classes  # this sample's labels were derived from its masks
        sizes.add(tuple(mask.shape))
    assert (281, 500) in sizes  # 2007_000032
    real = FullImageEvalDataset(voc_index(VOC_SAMPLE, split="voc_real", labels_file=labels_file, with_masks=True))
    assert len(real) == 6 and real.names[0] == "2007_000032"
    first = real[0]["mask"]
    assert np.unique(first.numpy()).tolist() == [0, 1, 15, 255]  # aeroplane, person, border
    train = CropTrainDataset(voc_index(VOC_SAMPLE, split="coco128_as_voc", labels_file=labels_file), crop_size=64)
    assert len(train) == 97 and train[(0, 1)]["image"].shape == (3, 64, 64)


@pytest.mark.skipif(VOC_SAMPLE is None, reason="voc-sample not found (set AFA_VOC_SAMPLE)")
def test_check_command_on_real_voc_sample_finds_its_labels_file(tmp_path, capsys):
    root = tmp_path / "VOC2012"
    shutil.copytree(VOC_SAMPLE, root)  # the shared folder is read-only
    assert cli(["check", "--layout", "voc", "--root", str(root), "--split", "all", "--no-progress"]) == 0
    output = capsys.readouterr().out
    assert f"labels file: {root / 'cls_labels.json'} (found in the dataset root" in output
    assert "images: 103" in output and "problems: 0" in output
    assert "note: labels differ" not in output  # these labels were derived from the masks
    # The 6 genuine VOC images are covered by the packaged standard labels, which stay the default.
    assert cli(["check", "--layout", "voc", "--root", str(root), "--split", "voc_real", "--no-progress"]) == 0
    output = capsys.readouterr().out
    assert f"labels file: {packaged_split_dir('voc') / 'cls_labels.json'}" in output and "images: 6" in output

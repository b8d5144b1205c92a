"""Custom datasets: a folder of images with CSV/JSON labels, masks optional."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from afa.data import CropTrainDataset, FullImageEvalDataset, custom_index
from afa.data.__main__ import main as cli
from tests.fixtures import write_custom_fixture
from afa.data.readers import DatasetError

CLASSES = ["cat", "dog", "kite"]
SAMPLES = {"one.png": ["dog"], "two.jpg": ["cat", "kite"], "three.png": ["kite"]}


@pytest.fixture(params=["csv", "json"])
def custom(request, tmp_path):
    return write_custom_fixture(tmp_path, SAMPLES, CLASSES, labels_format=request.param)


def test_train_and_eval_samples(custom):
    train = CropTrainDataset(custom_index(custom["images_dir"], custom["labels_file"], CLASSES), crop_size=24)
    assert train.class_names == ("background", *CLASSES) and train.num_classes == 3
    assert train.names == ("one", "two", "three")
    sample = train[(1, 3)]
    assert sample["image"].shape == (3, 24, 24) and sample["labels"].tolist() == [1.0, 0.0, 1.0]
    evaluation = FullImageEvalDataset(custom_index(**custom, class_names=CLASSES))
    first = evaluation[0]
    assert first["mask"].shape == (40, 56) and set(np.unique(first["mask"].numpy()).tolist()) == {0, 2}


def test_masks_are_optional(custom):
    evaluation = FullImageEvalDataset(custom_index(custom["images_dir"], custom["labels_file"], CLASSES))
    assert set(evaluation[2]) == {"name", "image", "labels"}


def test_class_list_with_background_first_is_accepted(custom):
    dataset = FullImageEvalDataset(custom_index(custom["images_dir"], custom["labels_file"], ["background", *CLASSES]))
    assert dataset.num_classes == 3


def test_unknown_class_in_csv_names_file_line_and_known_classes(tmp_path):
    paths = write_custom_fixture(tmp_path, SAMPLES, CLASSES, labels_format="csv")
    lines = paths["labels_file"].read_text().splitlines()
    lines[2] = "two.jpg,cat;zebra"
    paths["labels_file"].write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"labels\.csv, line 3 \(image 'two\.jpg'\): unknown class 'zebra'; known classes: \['cat', 'dog', 'kite'\]"):
        CropTrainDataset(custom_index(paths["images_dir"], paths["labels_file"], CLASSES))


def test_unknown_class_in_json_names_the_image(tmp_path):
    paths = write_custom_fixture(tmp_path, SAMPLES, CLASSES, labels_format="json")
    paths["labels_file"].write_text(json.dumps({"one.png": ["dgo"]}))
    with pytest.raises(DatasetError, match=r"labels\.json, image 'one\.png': unknown class 'dgo'"):
        CropTrainDataset(custom_index(paths["images_dir"], paths["labels_file"], CLASSES))


def test_image_missing_from_folder(custom):
    (custom["images_dir"] / "three.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 images named in .* are not in .*\['three'\]"):
        CropTrainDataset(custom_index(custom["images_dir"], custom["labels_file"], CLASSES))


def test_image_with_no_label_is_refused_unless_allowed(tmp_path):
    paths = write_custom_fixture(tmp_path, {"a.png": ["cat"], "b.png": []}, CLASSES)
    with pytest.raises(DatasetError, match=r"no foreground class .*\['b'\]"):
        CropTrainDataset(custom_index(paths["images_dir"], paths["labels_file"], CLASSES))
    dataset = CropTrainDataset(custom_index(paths["images_dir"], paths["labels_file"], CLASSES, allow_background_only=True))
    assert dataset[(1, 0)]["labels"].sum() == 0


def test_rgba_and_cmyk_images_load_as_rgb(tmp_path):
    paths = write_custom_fixture(tmp_path, {"a.png": ["cat"], "b.jpg": ["dog"]}, CLASSES)
    Image.new("RGBA", (56, 40), (10, 20, 30, 0)).save(paths["images_dir"] / "a.png")
    Image.new("CMYK", (56, 40), (0, 0, 0, 0)).save(paths["images_dir"] / "b.jpg")
    dataset = FullImageEvalDataset(custom_index(**paths, class_names=CLASSES))
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    rgba = dataset[0]["image"] * std + mean
    torch.testing.assert_close(rgba[:, 0, 0], torch.tensor([10.0, 20.0, 30.0]), atol=1e-3, rtol=0)
    cmyk = dataset[1]["image"] * std + mean  # CMYK (0,0,0,0) is white
    assert cmyk.min() > 250


def test_check_custom_layout(custom, capsys):
    names = ",".join(CLASSES)
    args = ["check", "--layout", "custom", "--root", str(custom["images_dir"]), "--labels-file",
            str(custom["labels_file"]), "--class-names", names, "--mask-dir", str(custom["masks_dir"]), "--no-progress"]
    assert cli(args) == 0
    output = capsys.readouterr().out
    kite_row = next(line for line in output.splitlines() if " kite " in line)
    assert kite_row.split()[2:4] == ["2", "2"]
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(custom["masks_dir"] / "two.png")
    assert cli(args) == 1
    assert "two.png is 5x5 (HxW) but its image is 40x56" in capsys.readouterr().out

"""The dataset configs (conf/dataset): nested index nodes, their errors, and prepare()."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from afa.data import CropTrainDataset, FullImageEvalDataset, SyntheticTrainDataset
from afa.engine.builders import build_datasets, prepare_datasets
from afa.engine.config import ConfigError, validate_config
from tests.fixtures import write_voc_fixture

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_dataset(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture
def voc_overrides(tmp_path) -> list[str]:
    root = write_voc_fixture(tmp_path, {"a": [1], "b": [2, 3]}, splits={"mine": ["a", "b"]})
    labels = f"+dataset.{{}}.index.labels_file={root / 'cls_labels.json'}"
    return [
        "dataset=voc", f"dataset.root={root}", "dataset.crop_size=16", "dataset.train.index.split=mine",
        "dataset.val.index.split=mine", "+dataset.train.index.image_ext=.png", "+dataset.val.index.image_ext=.png",
        labels.format("train"), labels.format("val"),
    ]


def test_voc_config_builds_the_generic_datasets_on_an_index(voc_overrides):
    train, val = build_datasets(compose_dataset(voc_overrides).dataset)
    assert isinstance(train, CropTrainDataset) and isinstance(val, FullImageEvalDataset)
    assert train.names == val.names == ("a", "b") and val.with_masks and "mask" not in train[(0, 1)]
    train, _ = build_datasets(compose_dataset([*voc_overrides, "dataset.train.return_mask=true"]).dataset)
    assert train.index.mask_paths is not None and train[(1, 2)]["mask"].shape == (16, 16)  # the index follows


@pytest.mark.parametrize(("override", "where", "target"), [
    ("+dataset.train.index.splt=val", "dataset.train.index", "afa.data.voc_index"),
    ("+dataset.val.index.with_mask=false", "dataset.val.index", "afa.data.voc_index"),
    ("+dataset.train.crop_sise=8", "dataset.train", "afa.data.CropTrainDataset"),
])
def test_a_misspelt_key_is_one_line_naming_it(voc_overrides, override, where, target):
    with pytest.raises(ConfigError) as error:
        build_datasets(compose_dataset([*voc_overrides, override]).dataset)
    message = str(error.value)
    key = override.split("=")[0].rsplit(".", 1)[1]
    assert "\n" not in message and message.startswith(f"{where}: ") and repr(key) in message
    assert message.endswith(f"(check the keys under {where} against {target})")


def test_an_unset_value_inside_the_index_is_reported(tmp_path):
    cfg = compose_dataset(["dataset=voc", f"dataset.root={tmp_path}", "dataset.train.index.split=???"])
    with pytest.raises(ConfigError, match=r"dataset\.train\.index\.split is required"):
        validate_config(cfg)


def test_synthetic_datasets_are_built_without_generating_then_prepared(tmp_path):
    sizes = ["dataset.num_train=3", "dataset.num_val=2", "dataset.num_test=1"]
    for name in ("synthetic", "synthetic_disk"):
        overrides = [f"dataset={name}", f"dataset.root={tmp_path / name}", *sizes]
        train, val = build_datasets(compose_dataset(overrides).dataset)
        assert not (tmp_path / name).exists() and val.num_classes == train.num_classes == 8
        with pytest.raises(RuntimeError, match="not prepared"):
            val[0]
        prepare_datasets(train, None, val)
        assert len(val) == 2 and val.image_sizes and val[1]["mask"].ndim == 2
        assert len(train) == (100000 if isinstance(train, SyntheticTrainDataset) else 3)
        train[(0, 1)]

"""The PSA two-stage mode end to end on a tiny synthetic benchmark (CPU): stages, skip, resume."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch.multiprocessing as mp

import pytest
import torch

from afa.data.readers import read_mask
from afa.engine import psa as psa_module
from afa.engine import stage_loop as stage_loop_module
from afa.engine.config import ConfigError
from afa.engine import run as run_module
from afa.engine.log import Logger
from afa.engine.trainer import train
from tests.test_dist import free_port
from tests.test_train import compose_config


def psa_overrides(root: Path, run_dir: Path, **extra: object) -> list[str]:
    values = {
        "method": "psa", "logger": "none", "run_dir": str(run_dir), "device": "cpu",
        "dataset.root": str(root), "dataset.num_train": 4, "dataset.num_val": 4, "dataset.num_test": 2,
        "dataset.crop_size": 64, "train.num_workers": 0, "train.log_every": 1, "eval.num_workers": 0,
        "eval.batch_size": 2, "optimizer.warmup_iters": 1,
        "method.cam.max_iters": 3, "method.cam.batch_size": 2, "method.cam.scales": "[1.0,0.5]", "method.cam.crf": False,
        "method.aff.max_iters": 3, "method.aff.batch_size": 2, "method.aff.crop_size": 64, "method.rw.logt": 3,
        "method.seg.max_iters": 3, "method.seg.batch_size": 2,
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


class StageRecorder(Logger):
    """Every scalar and picture the stages log, in order (one instance for all stage runs)."""

    def __init__(self) -> None:
        self.scalars: list[tuple[int, dict]] = []
        self.images: list[tuple[int, dict]] = []

    def log_scalars(self, scalars, step):
        self.scalars.append((step, dict(scalars)))

    def log_images(self, images, step):
        self.images.append((step, dict(images)))


@pytest.fixture(scope="module")
def recorded():
    return StageRecorder()


@pytest.fixture(scope="module")
def finished(tmp_path_factory, recorded):
    root, run_dir = tmp_path_factory.mktemp("psa-data"), tmp_path_factory.mktemp("psa-run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_module, "build_logger", lambda *args, **kwargs: recorded)
        results = train(compose_config(psa_overrides(root, run_dir)))
    return root, run_dir, results


def test_stages_run_in_order_and_write_their_outputs(finished):
    _, run_dir, results = finished
    for stage in ("cam", "aff", "rw", "seg"):
        assert (run_dir / stage / "stage.json").is_file() and (run_dir / stage / f"{stage}.log").is_file()
    assert 0 <= results["cam"]["cam_label_miou"] <= 1 and 0 <= results["rw"]["pseudo_label_miou"] <= 1
    assert 0 <= results["seg"]["segmentation_miou"] <= 1
    labels = sorted((run_dir / "rw" / "pseudo_labels").glob("*.png"))
    grid = sorted((run_dir / "cam" / "affinity_labels").glob("*.png"))
    assert len(labels) == len(grid) == 4
    image_label, grid_label = read_mask(labels[0]), read_mask(grid[0])
    assert grid_label.shape == tuple(-(-s // 8) for s in image_label.shape)
    assert torch.load(run_dir / "aff" / "checkpoints" / "last.pt", weights_only=True)["step"] == 3


def test_stages_log_pictures_and_results_after_their_training_steps(finished, recorded):
    pictures = {key: (step, value) for step, images in recorded.images for key, value in images.items()}
    assert set(pictures) == {"psa/cam/affinity_label", "psa/rw/pseudo_label", "psa/seg/val_prediction"}
    assert pictures["psa/cam/affinity_label"][0] == 3 and pictures["psa/rw/pseudo_label"][0] == 0
    for _, value in pictures.values():
        assert len(value) == 4
        for picture, caption in value:
            assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[-1] == 3 and caption
    results = {key: step for step, scalars in recorded.scalars for key in scalars if key.startswith("psa/")}
    assert results == {"psa/cam/cam_label_miou": 3, "psa/aff/final_loss": 3, "psa/rw/pseudo_label_miou": 0,
                       "psa/seg/segmentation_miou": 3}  # wandb drops a step that goes back


def test_a_corrupt_stage_record_is_a_one_line_error(finished, tmp_path):
    root, run_dir, _ = finished
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "cam" / "stage.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"cam/stage.json is not a readable stage record .*delete it to run stage cam"):
        train(compose_config(psa_overrides(root, copy)))


def psa_rank(rank: int, port: int, root: str, run_dir: str, queue) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    queue.put((rank, train(compose_config(psa_overrides(Path(root), Path(run_dir), **{"eval.batch_size": 1})))))


def test_two_gloo_processes_write_every_image_and_score_them_all(finished, tmp_path):
    from afa.engine.psa import train_split_index
    from afa.metrics import ConfusionMatrix

    root, _, _ = finished
    run_dir = tmp_path / "run"
    queue = mp.get_context("spawn").Queue()
    mp.start_processes(psa_rank, args=(free_port(), str(root), str(run_dir), queue), nprocs=2, join=True,
                       start_method="spawn")
    results = dict(queue.get(timeout=30) for _ in range(2))
    index = train_split_index(compose_config(psa_overrides(root, run_dir)))
    matrix = ConfusionMatrix(len(index.class_names))
    for name, mask_path in zip(index.names, index.mask_paths):
        assert (run_dir / "cam" / "affinity_labels" / f"{name}.png").is_file()
        pseudo = torch.from_numpy(read_mask(run_dir / "rw" / "pseudo_labels" / f"{name}.png").astype(np.int64))
        matrix.update(pseudo[None], torch.from_numpy(read_mask(mask_path).astype(np.int64))[None])
    for rank in (0, 1):  # both ranks report the mIoU over all four images, not their own two
        assert results[rank]["rw"]["pseudo_label_miou"] == pytest.approx(matrix.compute()["miou"], abs=1e-9)
        assert results[rank]["seg"]["segmentation_miou"] == results[0]["seg"]["segmentation_miou"]


def test_a_finished_run_is_skipped_and_a_changed_stage_reruns_alone(finished, monkeypatch):
    root, run_dir, results = finished
    ran = []
    for name, runner in list(psa_module.RUNNERS.items()):
        monkeypatch.setitem(psa_module.RUNNERS, name, lambda cfg, run, r, _n=name, _f=runner: ran.append(_n) or _f(cfg, run, r))
    again = train(compose_config(psa_overrides(root, run_dir, **{"method.cam.crf_workers": 3})))
    assert ran == [] and again["rw"] == results["rw"]  # crf_workers changes the speed, not the outputs
    train(compose_config(psa_overrides(root, run_dir, **{"method.seg.max_iters": 4})))
    assert ran == ["seg"]


def test_one_stage_needs_the_earlier_ones(tmp_path):
    with pytest.raises(ConfigError, match="run method.stage=cam"):
        train(compose_config(psa_overrides(tmp_path / "data", tmp_path / "run", **{"method.stage": "aff"})))


def test_an_interrupted_stage_resumes(finished, tmp_path, monkeypatch):
    root, _, _ = finished
    run_dir = tmp_path / "run"
    original = stage_loop_module.StageLoop.fit
    calls = {"n": 0}

    def crash_in_aff(self, extra_state=None):
        if self.desc == "psa-aff" and calls["n"] == 0:
            calls["n"] += 1
            self.options = type(self.options)(**{**self.options.__dict__, "max_iters": 2})
            original(self, extra_state)  # two iterations and their checkpoint, then the "crash"
            raise KeyboardInterrupt
        return original(self, extra_state)

    monkeypatch.setattr(stage_loop_module.StageLoop, "fit", crash_in_aff)
    with pytest.raises(KeyboardInterrupt):
        train(compose_config(psa_overrides(root, run_dir)))
    assert not (run_dir / "aff" / "stage.json").exists() and (run_dir / "cam" / "stage.json").exists()
    train(compose_config(psa_overrides(root, run_dir)))
    assert "psa-aff: resumed at iteration 2" in (run_dir / "aff" / "aff.log").read_text()
    assert torch.load(run_dir / "aff" / "checkpoints" / "last.pt", weights_only=True)["step"] == 3


def test_the_segmentation_checkpoint_evaluates_with_eval_py(finished, tmp_path):
    from tests.test_eval import run_eval

    import json

    _, run_dir, _ = finished
    recorded = json.loads((run_dir / "seg" / "stage.json").read_text())["results"]  # the last seg run's
    evaluated = run_eval(run_dir / "seg" / "checkpoints" / "last.pt", tmp_path / "eval", "eval=ss")
    assert evaluated["miou"] == pytest.approx(recorded["segmentation_miou"], abs=1e-6)
    with pytest.raises(ConfigError, match="use target=segmentation"):
        run_eval(run_dir / "seg" / "checkpoints" / "last.pt", tmp_path / "eval2", "target=propagated")


def test_presets_compose():
    voc = compose_config(["experiment=psa_voc", "dataset.root=/data/VOC2012"])
    assert voc.method.name == "psa" and voc.model.backbone == "b1" and voc.method.train_split == "train_aug"
    assert voc.method.cam.scales == [1.0, 0.5, 1.5, 2.0] and voc.method.aff.radius == 5
    synthetic = compose_config(["experiment=psa_synthetic"])
    assert synthetic.method.name == "psa" and synthetic.dataset.name == "synthetic"

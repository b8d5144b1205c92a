"""End-to-end tests of the AFA trainer on the synthetic benchmark (tiny model, CPU)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from afa.engine import afa_step as afa_step_module
from afa.engine import trainer as trainer_module
from afa.engine import run as run_module
from afa.engine.config import ConfigError, validate_config
from afa.engine.log import Logger
from afa.engine.trainer import NonFiniteLossError, train

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


def small_overrides(root: Path, run_dir: Path, **extra: object) -> list[str]:
    """A CPU-sized run: tiny model, 64-px crops, a 12-image val split, few iterations."""
    values = {
        "logger": "none",
        "run_dir": str(run_dir),
        "device": "cpu",
        "dataset.root": str(root),
        "dataset.num_train": 4,
        "dataset.num_val": 12,
        "dataset.num_test": 4,
        "dataset.crop_size": 64,
        "train.max_iters": 6,
        "train.batch_size": 2,
        "train.num_workers": 0,
        "train.log_every": 1,
        "train.image_log_every": 0,
        "train.eval_every": 0,
        "method.cam_iters": 2,
        "method.switch_iters": 4,
        "method.cam.scales": "[1.0,0.5]",
        "method.par.num_iterations": 2,
        "eval.num_workers": 0,
        "optimizer.warmup_iters": 2,
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


class RecordingLogger(Logger):
    """Keeps every scalar the trainer logs, by step."""

    def __init__(self) -> None:
        self.scalars: dict[int, dict[str, float]] = {}
        self.images: dict[int, dict] = {}

    def log_scalars(self, values, step):
        self.scalars.setdefault(step, {}).update(values)

    def log_images(self, images, step):
        self.images[step] = images


@pytest.fixture
def recorder(monkeypatch) -> RecordingLogger:
    logger = RecordingLogger()
    monkeypatch.setattr(run_module, "build_logger", lambda *args, **kwargs: logger)
    return logger


def test_end_to_end_run(synthetic_root, tmp_path, recorder):
    cfg = compose_config(small_overrides(synthetic_root, tmp_path / "run", **{"train.image_log_every": 3}))
    summary = train(cfg)
    assert summary["iterations"] == 6
    for key in ("cam_miou", "propagated_miou", "segmentation_miou", "cls_f1"):
        assert 0.0 <= summary[key] <= 1.0
    assert Path(summary["checkpoint"]).is_file()
    assert (tmp_path / "run" / "train.log").read_text().count("validation at 6") == 1
    # Every phase ran: classification only, then PAR labels, then propagated labels.
    assert set(recorder.scalars[1]) >= {"train/loss", "train/cls_loss", "train/lr"}
    # The reference's boundaries (0-based i): classification while i <= cam_iters (2), so i = 2 too.
    assert "train/seg_loss" not in recorder.scalars[3] and "train/seg_loss" in recorder.scalars[4]
    assert {"train/seg_loss", "train/aff_loss", "train/positive_pairs", "time/cam", "time/par"} <= set(recorder.scalars[5])
    assert {"val/cam_miou", "val/propagated_miou", "val/segmentation_miou", "val/cls_f1"} <= set(recorder.scalars[6])
    pictures = recorder.images[3]
    assert {"train/input", "train/cam", "train/refined_label", "train/propagated_label",
            "train/prediction_label", "train/attention_affinity"} <= set(pictures)
    input_size = pictures["train/input"][0][0].shape[:2]
    assert pictures["train/prediction_label"].shape[:2] == input_size == pictures["train/refined_label"].shape[:2]
    state = torch.load(summary["checkpoint"], weights_only=True)
    assert state["step"] == 6 and state["config"]["train"]["max_iters"] == 6


def _losses(recorder: RecordingLogger) -> dict[int, float]:
    return {step: values["train/loss"] for step, values in recorder.scalars.items() if "train/loss" in values}


def test_pictures_leave_training_unchanged(synthetic_root, tmp_path, monkeypatch):
    """The picture pass is its own no-grad eval pass: with or without it, the same losses."""
    losses = []
    for every in (0, 2):
        logger = RecordingLogger()
        monkeypatch.setattr(run_module, "build_logger", lambda *args, _l=logger, **kwargs: _l)
        train(compose_config(small_overrides(synthetic_root, tmp_path / f"run{every}", **{"train.image_log_every": every})))
        losses.append(_losses(logger))
        assert bool(logger.images) == (every > 0)
    assert losses[0] == losses[1]


@pytest.mark.parametrize("option", ["method.cam.reference_mode=true", "method.inactive_losses=skip", "train.amp=true"])
def test_fidelity_options_train(synthetic_root, tmp_path, recorder, option):
    key, value = option.split("=")
    summary = train(compose_config(small_overrides(synthetic_root, tmp_path / "run", **{key: value})))
    assert summary["iterations"] == 6
    assert all(torch.isfinite(torch.tensor(v)) for v in _losses(recorder).values())
    assert "train/seg_loss" in recorder.scalars[5]


def test_resume_reproduces_uninterrupted_losses(synthetic_root, tmp_path, monkeypatch, recorder):
    extra = {"train.checkpoint_every": 3, "train.max_iters": 7, "method.switch_iters": 5}
    train(compose_config(small_overrides(synthetic_root, tmp_path / "straight", **extra)))
    straight = _losses(recorder)
    recorder.scalars.clear()

    original_step = trainer_module.AFATrainer._train_step

    def crash_at_five(self, batch):
        if self.step == 4:
            raise KeyboardInterrupt("simulated crash")
        return original_step(self, batch)

    monkeypatch.setattr(trainer_module.AFATrainer, "_train_step", crash_at_five)
    interrupted = compose_config(small_overrides(synthetic_root, tmp_path / "interrupted", **extra))
    with pytest.raises(KeyboardInterrupt):
        train(interrupted)
    monkeypatch.setattr(trainer_module.AFATrainer, "_train_step", original_step)
    recorder.scalars.clear()
    resumed = compose_config(small_overrides(synthetic_root, tmp_path / "interrupted", **extra, **{"train.resume": "auto"}))
    train(resumed)
    after = _losses(recorder)
    assert sorted(after) == [4, 5, 6, 7]
    for step in after:
        assert after[step] == pytest.approx(straight[step], rel=1e-5, abs=1e-6), step


def test_all_ignore_labels_give_finite_losses(synthetic_root, tmp_path, monkeypatch, recorder):
    def all_ignored(first, *args, **kwargs):  # images or cams: (B, *, H, W)
        return torch.full((first.shape[0], *first.shape[-2:]), 255, dtype=torch.long)

    monkeypatch.setattr(afa_step_module, "refine_cams_with_par", all_ignored)
    monkeypatch.setattr(afa_step_module, "propagate_cams_with_affinity", all_ignored)
    train(compose_config(small_overrides(synthetic_root, tmp_path / "run", **{"train.max_iters": 5})))
    for step in (4, 5):  # iterations after the classification-only phase
        values = recorder.scalars[step]
        assert values["train/seg_loss"] == 0.0 and values["train/aff_loss"] == 0.0
        assert torch.isfinite(torch.tensor(values["train/loss"]))


def test_non_finite_loss_stops_with_iteration_and_names(synthetic_root, tmp_path, monkeypatch, recorder):
    original = afa_step_module.multilabel_soft_margin_loss
    calls = {"n": 0}

    def nan_on_third(logits, labels):
        calls["n"] += 1
        loss = original(logits, labels)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(afa_step_module, "multilabel_soft_margin_loss", nan_on_third)
    cfg = compose_config(small_overrides(synthetic_root, tmp_path / "run", **{"train.checkpoint_every": 1}))
    with pytest.raises(NonFiniteLossError, match=r"iteration 2 .*images: synth_train_"):
        train(cfg)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 2  # the good state before the NaN; nothing written after it
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_iters=-3", "train.max_iters must be an integer"),
        ("method.cam.low_thre=0.9", "low_thre"),
        ("model.backbone=b9", "model.backbone must be one of"),
        ("method.switch_iters=1", "switch_iters"),
        ("train.amp=maybe", "train.amp must be true or false"),
        ("model.pretrained=/nonexistent/mit_b1.pth", "does not exist"),
        ("dataset=voc", "dataset.root is required"),
        ("train.resume=/no/such/last.pt", "train.resume"),
    ],
)
def test_config_errors_fail_before_work(tmp_path, override, message):
    overrides = small_overrides(tmp_path / "never-created", tmp_path / "run")
    if override.startswith("dataset="):  # another dataset group: drop the synthetic-only keys
        overrides = [o for o in overrides if not o.startswith("dataset.")]
    cfg = compose_config(overrides + [override])
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)
    with pytest.raises(ConfigError):
        train(cfg)
    assert not (tmp_path / "run").exists() and not (tmp_path / "never-created").exists()


def test_unknown_key_is_rejected_by_composition(tmp_path):
    with pytest.raises(ConfigCompositionException, match="train.max_iter"):
        compose_config(["train.max_iter=5"])


def test_presets_compose():
    voc = compose_config(["experiment=afa_voc", "dataset.root=/data/VOC2012"])
    assert voc.model.backbone == "b1" and voc.train.max_iters == 20000 and voc.dataset.crop_size == 512
    assert voc.method.cam_iters == 2000 and voc.optimizer.lr == 6e-5 and voc.optimizer.warmup_iters == 1500
    coco = compose_config(["experiment=afa_coco", "dataset.root=/data/MSCOCO"])
    assert coco.method.par.num_iterations == 15 and coco.method.switch_iters == 15000
    for preset in (voc, coco):  # the synthetic experiment's CPU shortcuts must not leak
        assert list(preset.model.strides) == [4, 2, 2, 1] and list(preset.method.cam.scales) == [1.0, 0.5, 1.5]


def test_wandb_offline_run_is_written(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run_dir = tmp_path / "run"
    # Also AFA's own strides (the synthetic experiment uses a 1/8 last stage), validated on
    # the val split's non-square images.
    extra = {"train.max_iters": 3, "method.switch_iters": 3, "model.strides": "[4,2,2,1]"}
    cfg = compose_config(small_overrides(synthetic_root, run_dir, logger="wandb", **extra))
    train(cfg)
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb"))


@pytest.mark.slow
@pytest.mark.timeout(400)  # two torchrun processes on 2 cores
def test_torchrun_two_processes_gloo(synthetic_root, tmp_path):
    run_dir = tmp_path / "ddp"
    overrides = small_overrides(synthetic_root, run_dir, **{"train.max_iters": 4, "method.cam_iters": 1, "method.switch_iters": 3,
                                                        "method.inactive_losses": "skip"})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         str(REPO / "train.py"), *overrides],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "val mIoU" in result.stdout
    # "skip" leaves the seg and affinity parameters without gradients in the classification
    # phase (DDP searches for unused ones); past cam_iters every parameter gets one, so the
    # per-step search must end. The default "zero" gives every parameter a gradient throughout.
    assert "DDP re-wrapped without find_unused_parameters" in (run_dir / "train.log").read_text()
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 4 and len(state["sampler"]) == 2  # one data position per rank

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import wandb

from afa.engine.log import (
    NullLogger,
    Progress,
    WandbLogger,
    build_logger,
    has_wandb_api_key,
    resolve_wandb_mode,
    setup_console_logging,
)


@pytest.fixture(autouse=True)
def restore_package_logger():
    """Gives the "afa" logger back as found, so other tests' caplog still sees its records."""
    logger = logging.getLogger("afa")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    for handler in logger.handlers:
        if handler not in saved[0]:
            handler.close()
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """Offline wandb with every wandb directory inside tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for variable in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home" / variable.lower()))
    return tmp_path / "run"


def test_offline_wandb_run_writes_scalars_images_table_under_run_dir(wandb_offline):
    run_dir = wandb_offline
    logger = build_logger("wandb", rank=0, project="afa-tests", run_dir=run_dir, name="unit",
                          config={"model": {"backbone": "mit_b1"}, "lr": 6e-5})
    assert isinstance(logger, WandbLogger) and logger.mode == "offline" and logger.run_id
    image = np.zeros((8, 12, 3), dtype=np.uint8)
    image[:, :6, 0] = 255
    with logger:
        logger.log_scalars({"train/loss_cls": 0.6931, "train/lr": 6e-5}, step=10)
        logger.log_images({"val/panel": image, "val/cams": [(image, "first"), image[..., 0]]}, step=10)
        logger.log_table("val/iou", ["index", "class", "iou"], [[0, "background", 0.8], [1, "aeroplane", 0.25]], step=20)
        logger.log_config({"resumed_from": "none"})
        with pytest.raises(ValueError, match="val/bad"):
            logger.log_images({"val/bad": image.astype(np.float32)}, step=20)
    logger.finish()  # idempotent after the context exit
    # finish() returns once wandb's service has the run; its writer flushes the record log
    # when the service stops (at exit, or here), so reading the file earlier races it.
    wandb.teardown()

    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = runs[0] / "files"
    assert len(list((files / "media" / "images").rglob("*.png"))) == 3
    tables = list((files / "media" / "table").rglob("*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text().replace("NaN", "null"))
    assert table["columns"] == ["index", "class", "iou"] and table["data"][1] == [1, "aeroplane", 0.25]
    history = (runs[0] / f"run-{logger.run_id}.wandb").read_bytes()  # wandb's record log
    for token in (b"train/loss_cls", b"0.6931", b"mit_b1", b"resumed_from"):
        assert token in history, token


def test_other_ranks_and_none_get_null_logger(tmp_path):
    assert isinstance(build_logger("none", rank=0), NullLogger)
    assert isinstance(build_logger(None, rank=0), NullLogger)
    # rank 1 never starts wandb, whatever the kwargs
    assert isinstance(build_logger("wandb", rank=1, project="x", run_dir=tmp_path), NullLogger)
    with pytest.raises(ValueError, match="tensorboard"):
        build_logger("tensorboard", rank=0)
    logger = NullLogger()
    logger.log_scalars({"a": 1.0}, step=0)
    logger.log_images({"a": np.zeros((2, 2, 3), np.uint8)}, step=0)
    logger.log_table("t", ["a"], [[1]], step=0)
    logger.log_config({})
    logger.finish()
    assert logger.run_id is None


def test_none_logger_never_imports_wandb(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from afa.engine.log import build_logger, setup_console_logging, Progress
        logger = build_logger("none", rank=0)
        logger.log_scalars({{"a": 1.0}}, step=1)
        build_logger("wandb", rank=3, project="p", run_dir={str(tmp_path)!r})
        setup_console_logging({str(tmp_path)!r}, rank=0)
        assert "wandb" not in sys.modules, sorted(m for m in sys.modules if "wandb" in m)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def write_netrc(path, host: str, password: str = "secret-key"):
    path.write_text(f"machine {host}\n  login user\n  password {password}\n")
    path.chmod(0o600)
    return str(path)


def test_mode_decision(tmp_path):
    no_netrc = str(tmp_path / "absent")
    assert resolve_wandb_mode(None, {"NETRC": no_netrc}) == "offline"
    assert resolve_wandb_mode(None, {"NETRC": no_netrc, "WANDB_API_KEY": "k" * 40}) == "online"
    assert resolve_wandb_mode(None, {"NETRC": write_netrc(tmp_path / "a", "api.wandb.ai")}) == "online"
    assert resolve_wandb_mode(None, {"NETRC": write_netrc(tmp_path / "b", "example.com")}) == "offline"
    self_hosted = {"NETRC": write_netrc(tmp_path / "c", "wandb.lab.internal"),
                   "WANDB_BASE_URL": "https://wandb.lab.internal:8080"}
    assert resolve_wandb_mode(None, self_hosted) == "online"
    broken = tmp_path / "broken"
    broken.write_text("machine\n")
    assert not has_wandb_api_key({"NETRC": str(broken)})
    # environment and explicit overrides, explicit first
    assert resolve_wandb_mode(None, {"NETRC": no_netrc, "WANDB_API_KEY": "k", "WANDB_MODE": "offline"}) == "offline"
    assert resolve_wandb_mode(None, {"NETRC": no_netrc, "WANDB_MODE": "dryrun"}) == "offline"
    assert resolve_wandb_mode(None, {"NETRC": no_netrc, "WANDB_DISABLED": "true"}) == "disabled"
    assert resolve_wandb_mode("disabled", {"WANDB_API_KEY": "k"}) == "disabled"
    assert resolve_wandb_mode("ONLINE", {"WANDB_MODE": "disabled"}) == "online"
    with pytest.raises(ValueError, match="'sometimes'.*online, offline, disabled"):
        resolve_wandb_mode("sometimes", {})
    with pytest.raises(ValueError, match="WANDB_MODE"):
        resolve_wandb_mode(None, {"WANDB_MODE": "loud"})


def test_console_logging_file_on_rank_zero_only(tmp_path, capsys):
    logger = setup_console_logging(tmp_path / "r0", rank=0)
    logger = setup_console_logging(tmp_path / "r0", rank=0)  # again: no duplicate handlers
    logging.getLogger("afa.engine.trainer").info("step 10 loss 0.5")
    logger.debug("hidden")
    for handler in logger.handlers:
        handler.flush()
    lines = (tmp_path / "r0" / "train.log").read_text().splitlines()
    assert len(lines) == 1 and lines[0].endswith("| INFO | step 10 loss 0.5")
    assert capsys.readouterr().out.count("step 10 loss 0.5") == 1

    other = setup_console_logging(tmp_path / "r1", rank=1)
    other.info("quiet on rank 1")
    other.warning("loud on rank 1")
    assert not (tmp_path / "r1").exists()
    out = capsys.readouterr().out
    assert "quiet" not in out and "[rank 1]" in out and "loud on rank 1" in out


def test_progress_emits_periodic_lines_without_a_tty(tmp_path):
    logger = setup_console_logging(tmp_path, rank=0)
    with Progress(total=10, initial=2, desc="train", log_every=4, logger=logger, bar=False) as progress:
        for _ in range(8):
            progress.update(loss=0.25)
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert len(lines) == 2  # steps 4 and 8
    assert "train 4/10 (40.0%)" in lines[0] and "it/s" in lines[0] and "ETA" in lines[0] and "loss=0.25" in lines[0]
    assert "train 8/10" in lines[1]
    assert progress.n == 10 and progress.eta_seconds == 0.0

    with Progress(total=10, enabled=False, log_every=1, logger=logger) as silent:
        silent.update(5)
    assert len((tmp_path / "train.log").read_text().splitlines()) == 2

"""Command-line mistakes print one line and exit 2; HYDRA_FULL_ERROR=1 keeps the traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_train(tmp_path, *overrides, **env):
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), f"run_dir={tmp_path / 'run'}", *overrides],
        capture_output=True, text=True, timeout=100, cwd=tmp_path,
        env={**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO), **env},
    )


@pytest.mark.parametrize("overrides, words", [
    (["train.max_iters=-3"], "train.max_iters"),
    (["dataset=voc", "dataset.root=/nonexistent/VOC2012"], "/nonexistent/VOC2012"),
    (["model.pretrained=/nonexistent/mit_b1.pth", "train.max_iters=1"], "/nonexistent/mit_b1.pth"),
])
def test_user_error_is_one_line_exit_2(tmp_path, overrides, words):
    result = run_train(tmp_path, *overrides)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.stderr


def test_full_error_keeps_the_traceback(tmp_path):
    result = run_train(tmp_path, "train.max_iters=-3", HYDRA_FULL_ERROR="1")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_a_loader_worker_error_is_its_own_line():
    from torch._utils import ExceptionWrapper

    from afa.data.readers import DatasetError
    from afa.engine.cli import user_message

    try:
        raise DatasetError("image /data/x.jpg cannot be read (truncated): the file is corrupt")
    except DatasetError:
        wrapper = ExceptionWrapper(sys.exc_info(), where="in DataLoader worker process 0")
    with pytest.raises(DatasetError) as raised:
        wrapper.reraise()  # what a DataLoader does in the main process
    assert "Traceback" in str(raised.value)
    assert user_message(raised.value) == "image /data/x.jpg cannot be read (truncated): the file is corrupt"

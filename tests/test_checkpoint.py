import os
import random

import numpy as np
import pytest
import torch

from afa.engine import checkpoint as checkpoint_module
from afa.engine.checkpoint import (
    CheckpointManager,
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
)


def small_state(value: float) -> dict:
    model = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(model.weight, value)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": {"lr": 1e-3, "crop": [512]}}


def test_save_and_load_round_trip_weights_only(tmp_path):
    state = small_state(0.5)
    state["rng"] = capture_rng_state()
    path = save_checkpoint(tmp_path / "sub" / "last.pt", state)
    loaded = load_checkpoint(path)
    torch.testing.assert_close(loaded["model"]["weight"], state["model"]["weight"])
    assert loaded["optimizer"]["state"][0]["step"] == 1
    assert loaded["config"] == {"lr": 1e-3, "crop": [512]}
    assert os.listdir(tmp_path / "sub") == ["last.pt"]


def test_crash_mid_write_keeps_old_checkpoint_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {**small_state(1.0), "tag": "old"})
    before = path.read_bytes()

    def crashing_save(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a checkpoint")  # some bytes reach the temp file
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, small_state(2.0))
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]
    monkeypatch.undo()
    assert load_checkpoint(path)["tag"] == "old"


def test_interrupt_mid_write_also_cleans_up(tmp_path, monkeypatch):
    def interrupted_save(obj, handle, *args, **kwargs):
        handle.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "last.pt", {"step": 1})
    assert os.listdir(tmp_path) == []


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    good = save_checkpoint(tmp_path / "good.pt", small_state(1.0))
    data = good.read_bytes()
    for name, content in [("truncated.pt", data[: len(data) // 2]), ("tail.pt", data[:-20]),
                          ("empty.pt", b""), ("garbage.pt", b"not a checkpoint at all" * 10)]:
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(RuntimeError, match="is not a readable checkpoint \\(truncated or corrupt\\?\\)") as info:
            load_checkpoint(bad)
        message = str(info.value)
        assert str(bad) in message and "delete it or point train.resume to another file" in message


def test_load_explains_weights_only_refusal(tmp_path):
    path = save_checkpoint(tmp_path / "odd.pt", {"thing": np.zeros(3)})  # numpy arrays are not allow-listed
    with pytest.raises(RuntimeError, match="weights_only=False"):
        load_checkpoint(path)
    assert load_checkpoint(path, weights_only=False)["thing"].shape == (3,)


def test_manager_last_best_and_resume(tmp_path):
    manager = CheckpointManager(tmp_path)
    assert manager.latest() is None
    assert manager.save(100, {"value": 1}, metric=0.40) is True
    assert manager.save(200, {"value": 2}, metric=0.35) is False
    assert manager.save(300, {"value": 3}) is False  # no evaluation this time
    assert manager.save(400, {"value": 4}, metric=float("nan")) is False
    assert load_checkpoint(manager.latest())["value"] == 4
    best = load_checkpoint(manager.best_path)
    assert best["value"] == 1 and best["step"] == 100 and best["best_metric"] == 0.40
    last = load_checkpoint(manager.last_path)
    assert last["step"] == 400 and last["best_metric"] == 0.40
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "last.pt"]

    # a resumed run keeps the best so far instead of overwriting best.pt with a worse state
    resumed = CheckpointManager(tmp_path)
    resumed.restore(last)
    assert resumed.save(500, {"value": 5}, metric=0.39) is False
    assert resumed.save(600, {"value": 6}, metric=0.45) is True
    assert load_checkpoint(resumed.best_path)["value"] == 6
    assert load_checkpoint(resumed.last_path)["best_metric"] == 0.45


def test_manager_lower_is_better_and_keep_last(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step, loss in [(1, 3.0), (2, 2.0), (3, 2.5), (4, 1.0)]:
        manager.save(step, {"loss": loss}, metric=loss, higher_is_better=False)
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "last.pt", "step_00000003.pt", "step_00000004.pt"]
    assert load_checkpoint(tmp_path / "step_00000003.pt")["loss"] == 2.5
    assert load_checkpoint(manager.best_path)["loss"] == 1.0
    (tmp_path / "last.pt").unlink()
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000004.pt"
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


def test_manager_removes_stale_temp_files(tmp_path):
    (tmp_path / ".last.pt.1234.abcd.tmp").write_bytes(b"killed mid-write")
    (tmp_path / "notes.txt").write_text("keep me")
    CheckpointManager(tmp_path)
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_link_falls_back_to_copy(tmp_path, monkeypatch):
    def no_links(*args, **kwargs):
        raise OSError("hard links not supported")

    monkeypatch.setattr(checkpoint_module.os, "link", no_links)
    manager = CheckpointManager(tmp_path)
    manager.save(1, {"value": 1}, metric=1.0)
    assert load_checkpoint(manager.best_path)["value"] == 1
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "last.pt"]


def test_resolve_resume(tmp_path):
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("", tmp_path) is None
    assert resolve_resume("auto", tmp_path / "not-yet") is None
    CheckpointManager(tmp_path).save(1, {})
    assert resolve_resume("auto", tmp_path) == tmp_path / "last.pt"
    assert resolve_resume(str(tmp_path / "last.pt"), "elsewhere") == tmp_path / "last.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        resolve_resume(tmp_path / "nope.pt", tmp_path)


def draw_all() -> tuple:
    return random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3).tolist()


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's legacy state
    save_checkpoint(tmp_path / "rng.pt", {"rng": capture_rng_state()})
    expected = draw_all()
    draw_all()  # move every generator on
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])  # weights_only=True
    assert draw_all() == expected

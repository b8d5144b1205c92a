"""The run context (afa/engine/run.py): one setup shared by training, evaluation and PSA stages."""
from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from afa.engine import dist as dist_module
from afa.engine.checkpoint import capture_rng_state
from afa.engine.log import NullLogger
from afa.engine.run import RunContext
from tests.test_dist import free_port


def make_cfg(run_dir, **train):
    return OmegaConf.create({
        "run_name": "ctx", "run_dir": str(run_dir), "seed": 3, "device": "cpu",
        "logger": {"name": "none"}, "train": {"backend": None, "keep_last": 1, **train},
    })


class CountingDataset:
    def __init__(self, marker):
        self.marker = marker

    def prepare(self):
        with open(self.marker, "a") as handle:
            handle.write(f"{os.environ.get('RANK', '0')}\n")


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def test_single_process_context(tmp_path):
    with RunContext(make_cfg(tmp_path / "run"), job="eval") as run:
        assert run.is_main and run.world_size == 1 and run.device == torch.device("cpu")
        assert isinstance(run.experiment, NullLogger) and run.resumed is None
        assert (tmp_path / "run" / "eval.log").exists()
        assert torch.rand(1).item() == torch.rand(1, generator=torch.Generator().manual_seed(3)).item()  # seeded
        tensor = torch.tensor([2.0])
        assert run.reduce_sum_(tensor) is tensor and tensor.item() == 2.0
        assert run.gather_objects({"a": 1}) == [{"a": 1}]
        run.prepare_datasets(CountingDataset(tmp_path / "marker"), None, object())
        assert (tmp_path / "marker").read_text() == "0\n"
        network = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
        assert run.place(network) is network and run.wrap(network) is network  # nothing to convert or wrap alone
    assert not dist_module.is_distributed()


def test_resume_loads_state_and_best_metric(tmp_path):
    with RunContext(make_cfg(tmp_path)) as run:
        run.save_checkpoint(7, {"model": {}, "rng": capture_rng_state(), "wandb_run_id": None}, metric=0.5)
        assert run.checkpoints.last_path.exists()
    with RunContext(make_cfg(tmp_path), resume="auto") as run:
        assert run.resumed["step"] == 7 and run.checkpoints.best_metric == 0.5
    with RunContext(make_cfg(tmp_path / "fresh"), resume="auto") as run:
        assert run.resumed is None


def test_bad_resume_fails_naming_the_path(tmp_path):
    with pytest.raises(Exception, match="missing.pt"):
        RunContext(make_cfg(tmp_path), resume=str(tmp_path / "missing.pt"))
    assert not dist_module.is_distributed()


def worker(rank: int, world_size: int, port: int, root: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with RunContext(make_cfg(os.path.join(root, "run"))) as run:
        assert run.world_size == world_size and run.is_main == (rank == 0)
        marker = os.path.join(root, "marker")
        run.prepare_datasets(CountingDataset(marker))
        with open(marker) as handle:  # after the barrier: rank 0 has prepared, alone
            assert handle.read() == "0\n"
        assert run.reduce_sum_(torch.tensor([rank + 1.0])).item() == 3.0
        assert run.gather_objects(f"rank{rank}") == ["rank0", "rank1"]
        model = run.wrap(torch.nn.Linear(2, 2))
        assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
    assert not dist_module.is_distributed()


def test_two_process_context(tmp_path):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)

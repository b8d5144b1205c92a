"""The stage training loop (afa/engine/stage_loop.py): trains, checkpoints, resumes exactly."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from afa.engine.run import RunContext
from afa.engine.stage_loop import StageLoop, StageLoopOptions, StageLossError
from tests.test_run import make_cfg, single_process  # noqa: F401  (fixture: no torchrun variables)


class PointDataset(torch.utils.data.Dataset):
    def __init__(self, count: int = 10) -> None:
        generator = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(count, 3, generator=generator), torch.randn(count, 1, generator=generator)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, item: tuple[int, int]) -> dict:  # (index, sample seed), as the training datasets take
        index = item[0]
        return {"name": f"p{index}", "image": self.x[index], "target": self.y[index]}


def squared_error(model, batch):
    prediction = model(batch["image"])
    loss = ((prediction - batch["target"]) ** 2).mean()
    return {"loss": loss, "abs_error": (prediction - batch["target"]).abs().mean()}


def train(run_dir, loss_fn=squared_error, resume=None, **options):
    with RunContext(make_cfg(run_dir), resume=resume, job="stage") as run:
        network = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 1))  # dropout: the RNG must resume too
        optimizer = torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / 8)
        loop = StageLoop(run, network, optimizer, scheduler, PointDataset(),
                         loss_fn, StageLoopOptions(max_iters=8, batch_size=3, log_every=2, **options), desc="toy")
        means = loop.fit({"config": {"stage": "toy"}})
        return network, means, run.checkpoints.last_path


def test_trains_and_writes_the_last_checkpoint(tmp_path):
    network, means, last = train(tmp_path / "run")
    assert set(means) == {"loss", "abs_error"} and means["loss"] >= 0
    state = torch.load(last, weights_only=True)
    assert state["step"] == 8 and state["config"] == {"stage": "toy"}
    torch.testing.assert_close(state["model"]["0.weight"], network[0].weight)


def test_an_interrupted_stage_resumes_to_the_same_weights(tmp_path):
    straight, _, _ = train(tmp_path / "straight", checkpoint_every=2)
    calls = {"n": 0}

    def crash_after_five(model, batch):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return squared_error(model, batch)

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "interrupted", loss_fn=crash_after_five, checkpoint_every=2)
    assert torch.load(tmp_path / "interrupted" / "checkpoints" / "last.pt", weights_only=True)["step"] == 4
    resumed, _, _ = train(tmp_path / "interrupted", resume="auto", checkpoint_every=2)
    for mine, theirs in zip(resumed.parameters(), straight.parameters()):
        torch.testing.assert_close(mine, theirs, atol=0, rtol=0)


def test_non_finite_loss_stops_with_the_iteration_and_images(tmp_path):
    def nan_loss(model, batch):
        return {"loss": model(batch["image"]).sum() * float("nan")}

    with pytest.raises(StageLossError, match=r"iteration 0 \(images: p"):
        train(tmp_path / "run", loss_fn=nan_loss)

"""A training loop for the stages that are not AFA's single-stage method (the PSA mode's
AffinityNet and segmentation stages): one loss function per batch, on a run context.

It owns what every stage needs and nothing a stage decides: the endless resumable data
order, the optimiser and schedule steps, the finite-loss check, progress and log lines,
atomic checkpoints (every ``checkpoint_every`` iterations and at the end) and resuming from
the run context's checkpoint with the same data order and random state.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from afa.data import ResumableSampler, build_loader
from afa.engine.evaluator import autocast_context
from afa.engine.run import RunContext

LOG = logging.getLogger("afa")
LossFunction = Callable[[nn.Module, dict], dict[str, Tensor]]


class StageLossError(RuntimeError):
    """A stage's loss became NaN or infinite."""


@dataclass(frozen=True)
class StageLoopOptions:
    """How long and how a stage trains (its config's ``train`` node)."""

    max_iters: int
    batch_size: int
    num_workers: int = 0
    log_every: int = 50
    checkpoint_every: int = 0  # 0: at the end only
    amp: bool = False
    seed: int = 0
    find_unused_parameters: bool = False  # DDP: a network part the loss leaves out (the classifier stage's decoder)


class StageLoop:
    """Trains ``network`` by ``loss_fn`` over ``dataset`` on ``run``.

    Args:
        run: the stage's run context (its directory, checkpoints, logger, device).
        network: the module to train, on the run's device.
        optimizer, scheduler: stepped once per iteration (scheduler after optimizer).
        dataset: training samples indexed by ``(index, sample_seed)`` from `ResumableSampler`, as the
            training datasets (``CropTrainDataset``, ``AffinityCropDataset``); default collate.
        loss_fn: ``(model, batch) -> {"loss": scalar, other scalars...}``; batch tensors on the CPU.
        options: iterations, batch size, logging and checkpoint intervals.
        desc: the progress bar's and log lines' label.
    """

    def __init__(self, run: RunContext, network: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 dataset: Dataset, loss_fn: LossFunction, options: StageLoopOptions, desc: str = "train") -> None:
        self.run, self.network, self.optimizer, self.scheduler = run, network, optimizer, scheduler
        self.dataset, self.loss_fn, self.options, self.desc = dataset, loss_fn, options, desc
        self.sampler = ResumableSampler(len(dataset), seed=options.seed, rank=run.dist.rank, world_size=run.world_size)
        self.step = 0
        if run.resumed is not None:
            self._restore(run.resumed)
        self.model = run.wrap(network, options.find_unused_parameters)

    def _restore(self, state: dict[str, Any]) -> None:
        self.step = self.run.restore_training(state, self.network, self.optimizer, self.scheduler, self.sampler)
        LOG.info("%s: resumed at iteration %d", self.desc, self.step)

    def _save(self, consumed: int, extra: dict[str, Any]) -> None:
        state = self.run.training_state(self.network, self.optimizer, self.scheduler, self.sampler, consumed)
        self.run.save_checkpoint(self.step, {**state, **extra})

    def fit(self, extra_state: dict[str, Any] | None = None) -> dict[str, float]:
        """Trains to ``max_iters``; returns the mean of each logged value over the last window.

        Args:
            extra_state: stored in every checkpoint besides the training state (e.g. the config).
        """
        options, device = self.options, self.run.device
        amp = options.amp
        loader = build_loader(
            self.dataset, batch_size=options.batch_size, sampler=self.sampler, num_workers=options.num_workers,
            pin_memory=device.type == "cuda", drop_last=True, generator=torch.Generator().manual_seed(options.seed),
        )
        batches = iter(loader)
        progress = self.run.progress(options.max_iters, self.desc, initial=self.step)
        window: dict[str, list[Tensor]] = {}
        consumed, started = 0, time.perf_counter()
        self.network.train()
        while self.step < options.max_iters:
            batch = next(batches)
            consumed += options.batch_size
            with autocast_context(device, amp):
                values = self.loss_fn(self.model, batch)
            loss = values["loss"]
            if not torch.isfinite(loss.detach()).item():  # one sync per step: a NaN must stop the run here
                raise StageLossError(f"{self.desc}: non-finite loss at iteration {self.step} (images: "
                                     f"{', '.join(batch.get('name', []))}); the last good checkpoint is in "
                                     f"{self.run.checkpoints.run_dir}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            for key, value in values.items():  # kept on the device: read back only when logged
                window.setdefault(key, []).append(value.detach().float())
            progress.update(1)
            if options.log_every and self.step % options.log_every == 0:
                means = _means(window)
                self.run.experiment.log_scalars({f"{self.desc}/{k}": v for k, v in means.items()}, step=self.step)
                LOG.info(progress.summary(**means))
                if self.step < options.max_iters:
                    window = {}
            if (options.checkpoint_every and self.step % options.checkpoint_every == 0) or self.step == options.max_iters:
                self._save(consumed, extra_state or {})
        progress.close()
        LOG.info("%s: %d iterations in %.1f s", self.desc, self.step, time.perf_counter() - started)
        return _means(window)


def _means(window: dict[str, list[Tensor]]) -> dict[str, float]:
    """Each logged value's mean over the window (one device-to-host copy per key)."""
    return {key: float(torch.stack(values).mean()) for key, values in window.items() if values}

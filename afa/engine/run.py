"""The run context: everything a training run, an evaluation or a PSA stage shares.

Built once from the config: the process group and device, the run directory and its log
file, the seeds, the checkpoint manager and what a resume restores, the experiment logger,
progress bars, and the rank-0 rule for files. The loops (AFA training, evaluation, PSA
stages) receive it and never set any of these up themselves.
"""
from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from afa.engine.builders import prepare_datasets
from afa.engine.checkpoint import (
    CheckpointManager, capture_rng_state, load_checkpoint, resolve_resume, restore_rng_state,
)
from afa.engine.dist import DistributedContext, all_reduce_sum_, barrier, cleanup, init_distributed
from afa.engine.log import Logger, Progress, build_logger, setup_console_logging

LOG = logging.getLogger("afa")


def seed_everything(seed: int) -> None:
    """Seeds Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_run_dir(cfg: DictConfig) -> Path:
    """``cfg.run_dir``, else hydra's output directory, else ``runs/<run_name>``."""
    if cfg.get("run_dir") is not None:
        return Path(cfg.run_dir)
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path("runs") / str(cfg.run_name)


def _logger_options(cfg: DictConfig, run_dir: Path, run_id: str | None, job_type: str) -> dict[str, Any]:
    if cfg.logger.name != "wandb":
        return {}
    options = OmegaConf.to_container(cfg.logger, resolve=True)
    options.pop("name")
    options.setdefault("job_type", job_type)
    return {**options, "name": str(cfg.run_name), "run_dir": run_dir,
            "config": OmegaConf.to_container(cfg, resolve=True), "run_id": run_id}


class RunContext:
    """One process's view of a run; a context manager that leaves the process group on exit.

    Args:
        cfg: the composed, validated config (``run_name``, ``run_dir``, ``seed``, ``device``,
            ``logger``; ``train.backend`` and ``train.keep_last`` when present).
        resume: ``None``, ``"auto"`` (this run directory's last checkpoint) or a checkpoint
            path; its state is loaded on the CPU into :attr:`resumed` (the loop restores it,
            the RNG state last, after building everything that draws from the generators).
        job: ``train``, ``eval`` or a PSA stage name: the log file ``<job>.log`` and wandb's job type.

    Attributes:
        dist: rank, world size and device of this process.
        run_dir: where every file of the run goes (written by rank 0 only).
        checkpoints: the run's checkpoint manager (``run_dir/checkpoints``).
        resumed: the checkpoint state to restore, or None for a fresh start.
        experiment: the experiment logger (a no-op on ranks other than 0).
    """

    def __init__(self, cfg: DictConfig, resume: str | None = None, job: str = "train") -> None:
        train = cfg.get("train") or {}
        self.dist: DistributedContext = init_distributed(backend=train.get("backend"), device=cfg.device)
        try:
            self.run_dir = resolve_run_dir(cfg)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            setup_console_logging(self.run_dir, self.dist.rank, file_name=f"{job}.log")
            seed_everything(int(cfg.seed))
            self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", keep_last=int(train.get("keep_last", 1)))
            self.resumed = self._load_resume(resume)
            run_id = None if self.resumed is None else self.resumed.get("wandb_run_id")
            self.experiment: Logger = build_logger(
                cfg.logger.name, rank=self.dist.rank, **_logger_options(cfg, self.run_dir, run_id, job)
            )
        except BaseException:
            cleanup()
            raise

    # ---------------------------------------------------------------- process
    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and logs."""
        return self.dist.is_main

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    def barrier(self) -> None:
        """Waits for every rank; a no-op alone."""
        barrier()

    def reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums ``tensor`` over ranks in place (the reducer metrics take) and returns it."""
        return all_reduce_sum_(tensor)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` alone."""
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(gathered, obj)
        return gathered

    def prepare_datasets(self, *datasets: Any) -> None:
        """Rank 0 writes what the datasets cache (the synthetic benchmark), then all ranks meet."""
        if self.is_main:
            prepare_datasets(*datasets)
        self.barrier()

    def place(self, network: nn.Module) -> nn.Module:
        """``network`` on this device; BatchNorm as SyncBatchNorm when several GPUs train together."""
        if self.world_size > 1 and self.device.type == "cuda":
            network = nn.SyncBatchNorm.convert_sync_batchnorm(network)
        return network.to(self.device)

    def wrap(self, network: nn.Module, find_unused_parameters: bool = False, compile: bool = False) -> nn.Module:
        """``network`` as the loop calls it: DDP across ranks, then ``torch.compile`` if asked."""
        model = network
        if self.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)
        if compile:
            model = torch.compile(model)  # after DDP, as torch's DDP + compile notes advise
        return model

    # ---------------------------------------------------------------- files
    def _load_resume(self, resume: str | None) -> dict[str, Any] | None:
        path = resolve_resume(resume, self.checkpoints.run_dir)
        if path is None:
            if resume == "auto":
                LOG.info("train.resume=auto: no checkpoint in %s, starting fresh", self.checkpoints.run_dir)
            return None
        state = load_checkpoint(path, map_location="cpu")
        self.checkpoints.restore(state)
        LOG.info("resumed from %s at iteration %d", path, int(state["step"]))
        return state

    def save_checkpoint(self, step: int, state: dict[str, Any], metric: float | None = None) -> None:
        """Writes ``state`` atomically on rank 0 (build ``state`` on every rank: it may gather)."""
        if self.is_main:
            is_best = self.checkpoints.save(step, state, metric=metric)
            LOG.info("checkpoint %s%s", self.checkpoints.last_path, " (best)" if is_best else "")

    def training_state(self, network: nn.Module, optimizer: Any, scheduler: Any, sampler: Any,
                       consumed: int) -> dict[str, Any]:
        """What a resumable training checkpoint holds besides a loop's own keys (collective under
        DDP: every rank's data position is gathered)."""
        return {
            "model": network.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "sampler": self.gather_objects(sampler.state_dict(num_consumed=consumed)), "rng": capture_rng_state(),
        }

    def restore_training(self, state: dict[str, Any], network: nn.Module, optimizer: Any, scheduler: Any,
                         sampler: Any) -> int:
        """Loads :meth:`training_state` back; returns the step to continue from."""
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(restore_rank_state(state["sampler"], self.dist.rank))
        restore_rng_state(state["rng"])  # last: building the network drew from the generators
        return int(state["step"])

    def progress(self, total: int, desc: str, initial: int = 0, **options: Any) -> Progress:
        """A progress bar and periodic log lines, shown by rank 0 only."""
        return Progress(total, initial=initial, desc=desc, enabled=self.is_main, **options)

    # ---------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Finishes the logger and leaves the process group."""
        try:
            self.experiment.finish()
        finally:
            cleanup()

    def __enter__(self) -> RunContext:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.close()


def restore_rank_state(states: Sequence[Any], rank: int) -> Any:
    """This rank's entry of a per-rank list saved by :meth:`RunContext.gather_objects`
    (rank 0's when the run resumes on more ranks than it saved)."""
    return states[rank] if rank < len(states) else states[0]

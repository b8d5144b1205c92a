"""Crash-safe checkpoints: atomic writes, clear load errors, last/best bookkeeping, RNG state.

A checkpoint is one dict (model, optimizer, step, best metric, config, RNG state; see
nanoGPT). Files are written to a temporary name in the same directory, fsynced and then
renamed over the target, so a crash or a full disk never leaves a partial ``last.pt``.
Only rank 0 should call anything that writes here.
"""
from __future__ import annotations

import math
import os
import pickle
import random
import re
import secrets
import shutil
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from afa.models.weights import error_summary

_TEMP_SUFFIX = ".tmp"
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def _fsync_directory(directory: Path) -> None:
    """Persists a rename in ``directory``; silently skipped where directories cannot be opened."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some filesystems (and Windows) refuse fsync on directories
    finally:
        os.close(descriptor)


def _temp_path(path: Path) -> Path:
    """A unique hidden sibling of ``path`` for writing before the rename."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{_TEMP_SUFFIX}")


def _write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Runs ``write`` on a temp file beside ``path``, fsyncs it and renames it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_path(path)
    try:
        # O_EXCL: never clobber a stranger's file; 0o666 lets the umask decide permissions.
        descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Writes ``state`` with ``torch.save`` atomically: ``path`` is either old or complete.

    Args:
        path: Destination file; parent directories are created.
        state: The checkpoint dict.

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    _write_atomically(path, lambda handle: torch.save(dict(state), handle))
    return path


def _link_atomically(source: Path, destination: Path) -> None:
    """Makes ``destination`` a hard link to ``source`` (a copy where links fail), atomically."""
    temp = _temp_path(destination)
    try:
        os.link(source, temp)
    except OSError:  # filesystems without hard links
        with source.open("rb") as reader:
            _write_atomically(destination, lambda handle: shutil.copyfileobj(reader, handle))
        return
    try:
        os.replace(temp, destination)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_directory(destination.parent)


def load_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device | None = "cpu",
    weights_only: bool = True,
) -> dict[str, Any]:
    """Loads a checkpoint dict, with errors that name the file and the way out.

    Args:
        path: The checkpoint file.
        map_location: Passed to ``torch.load``; CPU by default so loading never needs a GPU.
        weights_only: Use torch's restricted unpickler. Checkpoints written by this
            package load with it; pass False only for files you trust that hold other objects.

    Returns:
        The checkpoint dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; check train.resume (or use train.resume=auto "
            "to pick the run directory's last.pt)"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as error:
        # torch falls back to its restricted unpickler for non-zip files too, so only a
        # complete zip archive means "readable but holds disallowed objects".
        if weights_only and "Weights only load failed" in str(error) and zipfile.is_zipfile(path):
            raise RuntimeError(
                f"checkpoint {path} holds objects outside torch's weights-only allow-list ({error}); "
                "load it with weights_only=False if you trust the file"
            ) from error
        raise _unreadable(path, error) from error
    except Exception as error:
        raise _unreadable(path, error) from error
    if not isinstance(state, dict):
        raise TypeError(f"checkpoint {path} holds a {type(state).__name__}, expected the dict save_checkpoint writes")
    return state


def _unreadable(path: Path, error: Exception) -> RuntimeError:
    """The error for a checkpoint that exists but cannot be read."""
    return RuntimeError(
        f"{path} is not a readable checkpoint (truncated or corrupt?): {error_summary(error)}: "
        "delete it or point train.resume to another file"
    )


class CheckpointManager:
    """Keeps ``last.pt`` (and optionally older snapshots) and ``best.pt`` in a run directory.

    Every save rewrites ``last.pt`` atomically and records ``step`` and ``best_metric`` in
    the state, so a resumed run knows the best value so far (call :meth:`restore`).
    ``best.pt`` is a hard link to (or copy of) the ``last.pt`` that improved the metric,
    so the state is serialised once. Use it on rank 0 only.

    Args:
        run_dir: Directory of the run.
        keep_last: How many recent checkpoints stay on disk. 1 keeps only ``last.pt``;
            k > 1 also links each save as ``step_XXXXXXXX.pt`` and keeps the k newest of those.
        best_metric: Best value so far, e.g. from a resumed checkpoint.
    """

    last_name = "last.pt"
    best_name = "best.pt"

    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 1, best_metric: float | None = None) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.run_dir = Path(run_dir)
        self.keep_last = keep_last
        self.best_metric = best_metric
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # temp files of a process killed mid-write are garbage; nothing else writes here.
        for stale in self.run_dir.glob(f".*.pt.*{_TEMP_SUFFIX}"):
            stale.unlink(missing_ok=True)

    @property
    def last_path(self) -> Path:
        """Path of the newest checkpoint."""
        return self.run_dir / self.last_name

    @property
    def best_path(self) -> Path:
        """Path of the checkpoint with the best metric."""
        return self.run_dir / self.best_name

    def restore(self, state: Mapping[str, Any]) -> None:
        """Takes the best metric from a loaded checkpoint so ``best.pt`` is not overwritten by worse."""
        self.best_metric = state.get("best_metric", self.best_metric)

    def _improves(self, metric: float, higher_is_better: bool) -> bool:
        """Whether ``metric`` beats the best so far (NaN never does)."""
        if math.isnan(metric):
            return False
        if self.best_metric is None or math.isnan(self.best_metric):
            return True
        return metric > self.best_metric if higher_is_better else metric < self.best_metric

    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        metric: float | None = None,
        higher_is_better: bool = True,
    ) -> bool:
        """Writes ``last.pt``, and ``best.pt`` when ``metric`` improves on the best so far.

        Args:
            step: The training step the state belongs to (stored as ``state["step"]``).
            state: The checkpoint dict; not modified.
            metric: Validation metric of this state, if one was computed.
            higher_is_better: Direction of the metric (mIoU: True, loss: False).

        Returns:
            True when this state became ``best.pt``.
        """
        is_best = metric is not None and self._improves(float(metric), higher_is_better)
        if is_best:
            self.best_metric = float(metric)
        save_checkpoint(self.last_path, {**state, "step": step, "best_metric": self.best_metric})
        if is_best:
            _link_atomically(self.last_path, self.best_path)
        if self.keep_last > 1:
            _link_atomically(self.last_path, self.run_dir / f"step_{step:08d}.pt")
            for old in _step_files(self.run_dir)[: -self.keep_last]:
                old.unlink(missing_ok=True)
        return is_best

    def latest(self) -> Path | None:
        """The checkpoint to resume from: ``last.pt``, else the newest snapshot, else None."""
        return latest_checkpoint(self.run_dir)


def _step_files(run_dir: Path) -> list[Path]:
    """The ``step_*.pt`` snapshots in ``run_dir``, oldest first."""
    files = [(int(match[1]), path) for path in run_dir.iterdir() if (match := _STEP_FILE.match(path.name))]
    return [path for _, path in sorted(files)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """``run_dir/last.pt``, else the newest ``step_*.pt``, else None (also for a missing directory)."""
    run_dir = Path(run_dir)
    if (run_dir / CheckpointManager.last_name).is_file():
        return run_dir / CheckpointManager.last_name
    snapshots = _step_files(run_dir) if run_dir.is_dir() else []
    return snapshots[-1] if snapshots else None


def resolve_resume(resume: str | os.PathLike | None, run_dir: str | os.PathLike) -> Path | None:
    """Turns ``train.resume`` into a file: None/"" → fresh start, "auto" → newest in ``run_dir``.

    "auto" with nothing to resume from starts fresh; an explicit path must exist.
    """
    if resume is None or str(resume) == "":
        return None
    if str(resume) == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"train.resume={resume} does not exist; pass an existing checkpoint or 'auto'")
    return path


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy (global), torch CPU and all CUDA generators, as weights-only-loadable values."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        # numpy's uint32 key array as int64 tensor: loadable with weights_only=True
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restores what :func:`capture_rng_state` captured; CUDA only where devices exist."""
    random.setstate(_as_tuples(state["python"]))
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda")
    if cuda_states is not None and torch.cuda.is_available():
        if len(cuda_states) != torch.cuda.device_count():
            warnings.warn(
                f"checkpoint has CUDA RNG states for {len(cuda_states)} devices, this process sees "
                f"{torch.cuda.device_count()}; restoring the first {min(len(cuda_states), torch.cuda.device_count())}",
                stacklevel=2,
            )
        for device, cuda_state in zip(range(torch.cuda.device_count()), cuda_states):
            torch.cuda.set_rng_state(cuda_state.cpu(), device)


def _as_tuples(value: Any) -> Any:
    """Lists back to tuples (random.setstate needs tuples; some serialisers return lists)."""
    return tuple(_as_tuples(item) for item in value) if isinstance(value, (list, tuple)) else value

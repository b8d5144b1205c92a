"""Worker processes that are safe to start from a process that already ran work.

A forked child inherits the parent's OpenMP/OpenCV thread pools in whatever state
they were; touching them in the child (``torch.set_num_threads``, ``cv2`` calls)
can deadlock, which hung the test suite. Every loader and process pool here starts
its workers from a ``forkserver``: a clean process that imported the data modules
once, before any thread pool existed, so each worker forks from it in milliseconds.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

import torch
from torch.utils.data import DataLoader

# The forkserver imports these once; workers then fork from it with them loaded.
_PRELOAD = ["torch", "cv2", "numpy", "afa.data"]


def worker_context() -> multiprocessing.context.BaseContext:
    """The multiprocessing context for data workers (forkserver; spawn where absent)."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(_PRELOAD)
        return context
    return multiprocessing.get_context("spawn")


def _one_thread_per_worker(worker_id: int) -> None:
    """``worker_init_fn``: each worker is a process, so its own pools stay at one thread."""
    import cv2

    cv2.setNumThreads(1)  # safe here: the worker came from a clean forkserver, not a fork of the trainer


def build_loader(dataset: Any, *, num_workers: int = 0, **options: Any) -> DataLoader:
    """A ``DataLoader`` whose workers (if any) start safely; ``options`` as DataLoader's.

    With ``num_workers > 0`` the workers start from the forkserver, keep one thread
    each, and persist across epochs unless ``persistent_workers=False`` is given.
    """
    if num_workers > 0:
        options.setdefault("multiprocessing_context", worker_context())
        options.setdefault("worker_init_fn", _one_thread_per_worker)
        options.setdefault("persistent_workers", True)
    return DataLoader(dataset, num_workers=num_workers, **options)

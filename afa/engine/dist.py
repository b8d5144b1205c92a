"""Process and device setup, decided once at the top of a run (as in nanoGPT).

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; with them the process
joins a process group, without them it runs alone. The helpers below are no-ops when
no process group exists, so single-process code calls them unconditionally.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands.

    Attributes:
        rank: Global rank, 0..world_size-1.
        local_rank: Rank on this machine; indexes the GPU.
        world_size: Number of processes.
        device: The device this process computes on.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and logs."""
        return self.rank == 0


def is_distributed() -> bool:
    """Whether a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def _pick_device(device: str | torch.device, local_rank: int) -> torch.device:
    """Resolves "auto"/"cuda"/"cpu"/"cuda:N" for this process."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={device} requested but CUDA is not available; use device=cpu or auto")
        if device.index is None:
            device = torch.device("cuda", local_rank)  # one GPU per local process
    return device


def _torchrun_environment() -> tuple[int, int, int] | None:
    """(rank, local_rank, world_size) from torchrun's variables, None when absent."""
    present = [name for name in _TORCHRUN_VARIABLES if name in os.environ]
    if not present:
        return None
    if len(present) != len(_TORCHRUN_VARIABLES):
        missing = sorted(set(_TORCHRUN_VARIABLES) - set(present))
        raise RuntimeError(
            f"found {', '.join(present)} but not {', '.join(missing)} in the environment; "
            "launch with torchrun (which sets all three) or unset them for a single process"
        )
    return int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])


def init_distributed(
    backend: str | None = None,
    device: str | torch.device = "auto",
    timeout_minutes: float = 30.0,
) -> DistributedContext:
    """Joins the process group that torchrun describes, or sets up a single process.

    Args:
        backend: "nccl", "gloo", ...; None picks nccl on CUDA and gloo on CPU.
        device: "auto" (CUDA if available), "cpu", "cuda" (GPU ``local_rank``) or "cuda:N".
        timeout_minutes: How long collectives wait for slow ranks (evaluation runs long).

    Returns:
        The context of this process.
    """
    environment = _torchrun_environment()
    if environment is None:
        return DistributedContext(device=_pick_device(device, 0))
    rank, local_rank, world_size = environment
    device = _pick_device(device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the group, so NCCL binds the right GPU
    if not is_distributed():
        dist.init_process_group(
            backend=backend or ("nccl" if device.type == "cuda" else "gloo"),
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=device if device.type == "cuda" else None,
        )
    return DistributedContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def cleanup() -> None:
    """Leaves the process group, if any."""
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    """Waits for every rank; a no-op alone."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sums ``tensor`` over ranks in place (a no-op alone) and returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Returns rank ``src``'s ``obj`` on every rank (picklable objects); ``obj`` alone.

    Uses the current CUDA device under NCCL, so call it after :func:`init_distributed`.
    """
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]

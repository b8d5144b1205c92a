"""Samplers: a resumable, sharded training order and same-size evaluation batches.

:class:`ResumableSampler` yields ``(index, sample_seed)`` pairs. Epoch ``e`` is the
permutation drawn from ``default_rng([seed, e])``; rank ``r`` of ``w`` takes positions
``r, r + w, …`` of it (truncated to a multiple of ``w`` so every rank takes as many steps).
Each position of an epoch also has a fixed sample seed, so the augmentation a sample gets
is decided by the order, not by which worker loads it. The data position is
``(epoch, position)``: how far this rank has got in the stream; a sampler restored from
``state_dict()`` yields exactly the remaining pairs.

:class:`SameSizeBatchSampler` batches evaluation images of identical (H, W), so a batch
needs no padding and gives the results of batch size 1.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

_SEED_HIGH = 2**63 - 1


class ResumableSampler:
    """Seeded, sharded, resumable sample order yielding ``(index, sample_seed)``.

    Args:
        dataset_length: number of samples N in the dataset.
        seed: seed of every epoch's permutation and sample seeds.
        rank: this process's rank.
        world_size: number of processes sharing the stream.
        shuffle: permute each epoch (False: 0..N-1 in order).
        endless: iterate forever across epochs (True) or stop at the end of each epoch.
    """

    def __init__(
        self,
        dataset_length: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        endless: bool = True,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if dataset_length < world_size:
            raise ValueError(f"{dataset_length} samples cannot be shared by {world_size} ranks")
        self.dataset_length = int(dataset_length)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shuffle = bool(shuffle)
        self.endless = bool(endless)
        self.epoch = 0
        self.position = 0  # samples of the current epoch this rank has already yielded
        self._iteration_start = (0, 0)

    @property
    def samples_per_epoch(self) -> int:
        """Samples one rank takes per epoch (the tail of an epoch's permutation is dropped)."""
        return self.dataset_length // self.world_size

    def __len__(self) -> int:
        """Samples per epoch for this rank (the length of one pass, also when endless)."""
        return self.samples_per_epoch

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's (indices, sample seeds) of an epoch, each (samples_per_epoch,) int64."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.dataset_length) if self.shuffle else np.arange(self.dataset_length)
        sample_seeds = rng.integers(0, _SEED_HIGH, self.dataset_length, dtype=np.int64)
        used = self.samples_per_epoch * self.world_size
        return order[:used][self.rank :: self.world_size], sample_seeds[:used][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        self._iteration_start = (self.epoch, self.position)
        return self._stream()

    def _stream(self) -> Iterator[tuple[int, int]]:
        while True:
            indices, sample_seeds = self.epoch_order(self.epoch)
            while self.position < len(indices):
                position = self.position
                self.position += 1
                yield int(indices[position]), int(sample_seeds[position])
            self.epoch, self.position = self.epoch + 1, 0
            if not self.endless:
                return

    def _moved(self, epoch: int, position: int, num_samples: int) -> tuple[int, int]:
        total = position + int(num_samples)
        return epoch + total // self.samples_per_epoch, total % self.samples_per_epoch

    def advance(self, num_samples: int) -> None:
        """Move the data position forward by ``num_samples`` without yielding them."""
        self.epoch, self.position = self._moved(self.epoch, self.position, num_samples)

    def state_dict(self, num_consumed: int | None = None) -> dict[str, int]:
        """The data position, plus the parameters that must match on restore.

        Args:
            num_consumed: samples the training loop has consumed since the current
                iteration began (``iter(sampler)``). DataLoader workers prefetch, so the
                sampler itself runs ahead of the loop; pass this to checkpoint what was
                really consumed. None: the sampler's own position (exact without workers).
        """
        epoch, position = self.epoch, self.position
        if num_consumed is not None:
            epoch, position = self._moved(*self._iteration_start, num_consumed)
        return {
            "epoch": epoch,
            "position": position,
            "seed": self.seed,
            "world_size": self.world_size,
            "dataset_length": self.dataset_length,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a data position; the seed, world size and dataset length must match."""
        for key in ("seed", "world_size", "dataset_length"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]} but this sampler has "
                    f"{getattr(self, key)}: resuming would change the data order; keep the "
                    f"run's {key} or start a fresh run"
                )
        if not 0 <= int(state["position"]) < self.samples_per_epoch:
            raise ValueError(f"sampler state position {state['position']} out of range")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class SameSizeBatchSampler:
    """Batches of evaluation images with identical (H, W), sharded across ranks.

    Images are grouped by exact size (in order of first appearance, indices ascending
    within a size), each group cut into batches of at most ``batch_size``, and batch ``b``
    goes to rank ``b % world_size``: ranks get disjoint batches whose union is the dataset.
    Sizes are read lazily on first iteration (from image headers, no decoding).

    Args:
        sizes: a sequence of (H, W) per image, or a callable returning it (e.g. a bound
            ``dataset.image_sizes`` getter), or a dataset with an ``image_sizes`` attribute.
        batch_size: maximum images per batch.
        rank: this process's rank.
        world_size: number of processes.
    """

    def __init__(
        self,
        sizes: Sequence[tuple[int, int]] | Callable[[], Sequence[tuple[int, int]]] | Any,
        batch_size: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self._sizes_source = sizes
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self._batches: list[list[int]] | None = None

    def _read_sizes(self) -> Sequence[tuple[int, int]]:
        source = self._sizes_source
        if hasattr(source, "image_sizes"):
            return source.image_sizes
        return source() if callable(source) else source

    def all_batches(self) -> list[list[int]]:
        """Every rank's batches, in global order (computed once)."""
        if self._batches is None:
            groups: dict[tuple[int, int], list[int]] = defaultdict(list)
            for index, size in enumerate(self._read_sizes()):
                groups[(int(size[0]), int(size[1]))].append(index)
            self._batches = [
                members[start : start + self.batch_size]
                for members in groups.values()
                for start in range(0, len(members), self.batch_size)
            ]
        return self._batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.all_batches()[self.rank :: self.world_size]

    def __len__(self) -> int:
        return len(self.all_batches()[self.rank :: self.world_size])

"""Datasets for training (augmented crops) and evaluation (full images with masks).

Two generic datasets do the work on the index of any layout: each takes an ``index``, an
:class:`~afa.data.layouts.ImageIndex` (from :func:`~afa.data.layouts.voc_index`,
:func:`~afa.data.layouts.coco_index` or :func:`~afa.data.layouts.custom_index`, which
hold the per-layout arguments) or a :class:`~afa.data.layouts.PendingIndex` whose files
``prepare()`` writes (:class:`~afa.data.synthetic.SyntheticIndex`). Hydra builds both
from one node, the index as a nested ``_target_``::

    train:
      _target_: afa.data.CropTrainDataset
      index: {_target_: afa.data.voc_index, root: ..., split: train_aug, with_masks: false}
      crop_size: 512

Every dataset has ``prepare()``: a no-op on an ``ImageIndex``; on a pending index it
writes the files (idempotent). Constructing a dataset never writes anything.

Samples (AFA.md §9):

- train: ``name`` str; ``image`` (3, S, S) float32 normalised; ``labels`` (C,) float32
  multi-hot (index c-1 for class c); ``valid_box`` (4,) int64 (top, bottom, left, right),
  half-open; ``mask`` (S, S) int64 only with ``return_mask=True``.
- eval: ``name``; ``image`` (3, H, W) float32 normalised; ``mask`` (H, W) int64 with 255
  ignore (absent with ``with_masks=False``); ``labels`` (C,) float32 (absent with
  ``with_labels=False``).

A train dataset's ``__getitem__`` takes an index or an ``(index, sample_seed)`` pair (as
yielded by :class:`~afa.data.samplers.ResumableSampler`); with a pair, the augmentation
is drawn from ``numpy.random.default_rng(sample_seed)`` and so does not depend on worker
count or scheduling.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from afa.data.classes import IGNORE_INDEX
from afa.data.layouts import IMAGE_EXTENSIONS, ImageIndex, PendingIndex
from afa.data.readers import image_size, read_image, read_mask, validate_mask
from afa.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TrainAugmentation,
    mask_to_tensor,
    normalize_to_tensor,
)

SampleItem = int | tuple[int, int]


def split_item(item: Any) -> tuple[int, int | None]:
    """Accept ``index`` or ``(index, sample_seed)`` (ints, numpy or 0-d tensors)."""
    if isinstance(item, (tuple, list)) or (isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim == 1):
        if len(item) != 2:
            raise TypeError(f"expected an index or an (index, sample_seed) pair, got {item!r}")
        return int(item[0]), int(item[1])
    return int(item), None


def labels_to_multi_hot(classes: Sequence[int], num_classes: int) -> torch.Tensor:
    """Foreground class indices (1..C) → (C,) float32 multi-hot (index c-1 for class c)."""
    multi_hot = torch.zeros(num_classes, dtype=torch.float32)
    if len(classes):
        multi_hot[torch.as_tensor(list(classes), dtype=torch.long) - 1] = 1.0
    return multi_hot


class IndexedImageDataset(Dataset):
    """Shared file access for one index: names, classes, images, masks.

    Args:
        index: the resolved split (:class:`ImageIndex`), or a :class:`PendingIndex` whose
            files :meth:`prepare` writes. A pending index is resolved on first use, which
            reads the prepared files and never writes them: before ``prepare()`` has run
            (in any process), first use raises a ``RuntimeError`` that says so. Nothing
            prepares lazily, so under torchrun only the process that calls ``prepare()``
            (rank 0, before a barrier) ever writes.
        ignore_index: value of ignored mask pixels.
    """

    def __init__(self, index: ImageIndex | PendingIndex, ignore_index: int = IGNORE_INDEX) -> None:
        self.ignore_index = int(ignore_index)
        self._pending = None if isinstance(index, ImageIndex) else index
        self._index = index if isinstance(index, ImageIndex) else None
        if self._index is not None:
            self.check_index(self._index)

    def check_index(self, index: ImageIndex) -> None:
        """Raise if this dataset cannot use ``index`` (run once the index is resolved)."""

    def prepare(self) -> None:
        """Write the files the index needs (idempotent); a no-op for an on-disk layout."""
        if self._pending is not None:
            self._pending.prepare()

    @property
    def index(self) -> ImageIndex:
        """The resolved split (a pending index is resolved, and checked, on first use)."""
        if self._index is None:
            index = self._pending.resolve()
            self.check_index(index)
            self._index = index
        return self._index

    @property
    def class_names(self) -> tuple[str, ...]:
        """K = C + 1 class names, background first (known before ``prepare()``)."""
        return self.index.class_names if self._pending is None else self._pending.class_names

    @property
    def num_classes(self) -> int:
        """C, the number of foreground classes."""
        return len(self.class_names) - 1

    @property
    def names(self) -> tuple[str, ...]:
        return self.index.names

    def __len__(self) -> int:
        return len(self.index.names)

    def image_path(self, position: int) -> Path:
        return self.index.image_paths[position]

    def mask_path(self, position: int) -> Path | None:
        return None if self.index.mask_paths is None else self.index.mask_paths[position]

    def image_hw(self, position: int) -> tuple[int, int]:
        """(H, W) of an image from its file header (no decoding)."""
        return image_size(self._existing_image_path(position))

    def image_classes(self, position: int) -> tuple[int, ...]:
        """Foreground class indices (1..C) of an image; empty if labels are unknown."""
        return () if self.index.labels is None else self.index.labels[position]

    def labels(self, position: int) -> torch.Tensor:
        """(C,) float32 multi-hot image labels."""
        return labels_to_multi_hot(self.image_classes(position), self.num_classes)

    def _existing_image_path(self, position: int) -> Path:
        path = self.image_path(position)
        if not path.is_file():
            siblings = [path.with_suffix(ext) for ext in IMAGE_EXTENSIONS if ext != path.suffix]
            found = next((sibling for sibling in siblings if sibling.is_file()), None)
            if found is not None:
                raise FileNotFoundError(
                    f"image {path} not found but {found.name} exists: set image_ext="
                    f"{found.suffix!r} for this dataset"
                )
        return path

    def load_image(self, position: int) -> np.ndarray:
        """(H, W, 3) uint8 RGB image."""
        return read_image(self._existing_image_path(position))

    def load_mask(self, position: int, image_hw: tuple[int, int]) -> np.ndarray:
        """(H, W) uint8 mask, validated against the image size and the class range."""
        path = self.mask_path(position)
        if path is None:
            raise ValueError(f"{self.index.description} was built without masks")
        mask = read_mask(path)
        validate_mask(mask, self.num_classes, image_hw, path, self.ignore_index)
        return mask


class CropTrainDataset(IndexedImageDataset):
    """Augmented S×S training crops of an indexed split (AFA.md §9).

    Args:
        index: the split (labels required; masks too with ``return_mask``).
        crop_size: S.
        scale_range: uniform rescale range; None: no rescale (PSA.md §4, AffinityNet).
        flip_prob: horizontal flip probability.
        ignore_index: mask value outside the image (only with ``return_mask``).
        return_mask: also return the crop of the ground-truth mask (for monitoring;
            weakly-supervised training never needs it).
        color_jitter: strengths ``{brightness, contrast, saturation, hue}`` of a colour
            jitter (PSA.md §4: 0.3, 0.3, 0.3, 0.1), or None (off, AFA's default).
        pad_after_normalize: pad the crop with 0 after normalisation (PSA's reference)
            instead of RGB 0 before it (AFA's).
    """

    def __init__(
        self,
        index: ImageIndex | PendingIndex,
        crop_size: int = 512,
        scale_range: Sequence[float] | None = (0.5, 2.0),
        flip_prob: float = 0.5,
        ignore_index: int = IGNORE_INDEX,
        return_mask: bool = False,
        color_jitter: Mapping[str, float] | None = None,
        pad_after_normalize: bool = False,
    ) -> None:
        self.augmentation = TrainAugmentation(
            crop_size, scale_range, flip_prob, ignore_index,
            color_jitter=color_jitter, pad_after_normalize=pad_after_normalize,
        )
        self.return_mask = bool(return_mask)
        super().__init__(index, ignore_index)

    def check_index(self, index: ImageIndex) -> None:
        if index.labels is None:
            raise ValueError(f"training needs image labels; {index.description} has none")
        if self.return_mask and index.mask_paths is None:
            raise ValueError(
                f"return_mask=True needs masks; {index.description} was built without them: "
                "build the index with with_masks=True"
            )

    def __getitem__(self, item: SampleItem) -> dict[str, Any]:
        position, sample_seed = split_item(item)
        if sample_seed is None:
            # Plain indices: seed from torch so DataLoader worker seeding applies as usual.
            sample_seed = int(torch.randint(0, 2**62, ()).item())
        rng = np.random.default_rng(sample_seed)
        image = self.load_image(position)
        mask = self.load_mask(position, image.shape[:2]) if self.return_mask else None
        sample = self.augmentation(image, rng, mask)
        return {"name": self.names[position], "labels": self.labels(position), **sample}


class FullImageEvalDataset(IndexedImageDataset):
    """Full images without augmentation, with masks and labels (AFA.md §10).

    Args:
        index: the split; samples carry masks and labels when it has them.
        ignore_index: value of ignored mask pixels.
        mean, std: normalisation constants.
    """

    def __init__(
        self,
        index: ImageIndex | PendingIndex,
        ignore_index: int = IGNORE_INDEX,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__(index, ignore_index)
        self.mean, self.std = tuple(mean), tuple(std)

    @property
    def with_masks(self) -> bool:
        return self.index.mask_paths is not None

    @property
    def with_labels(self) -> bool:
        return self.index.labels is not None

    @cached_property
    def image_sizes(self) -> list[tuple[int, int]]:
        """(H, W) of every image, read lazily from the file headers on first use."""
        return [self.image_hw(position) for position in range(len(self))]

    def __getitem__(self, item: SampleItem) -> dict[str, Any]:
        position, _ = split_item(item)
        image = self.load_image(position)
        sample: dict[str, Any] = {
            "name": self.names[position],
            "image": normalize_to_tensor(image, self.mean, self.std),
        }
        if self.with_masks:
            sample["mask"] = mask_to_tensor(self.load_mask(position, image.shape[:2]))
        if self.with_labels:
            sample["labels"] = self.labels(position)
        return sample

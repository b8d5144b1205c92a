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
- affinity (PSA.md §4, :class:`AffinityCropDataset`): ``name``; ``image`` (3, S, S) float32
  normalised, 0 outside the image; ``grid_label`` (S/8, S/8) int64, the window of the CAM
  stage's grid label; ``crop_box``, ``valid_box`` (4,) int64; ``flipped`` bool.
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
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from afa.data.classes import IGNORE_INDEX
from afa.data.layouts import IMAGE_EXTENSIONS, ImageIndex, PendingIndex
from afa.data.readers import DatasetError, image_size, read_image, read_mask, validate_mask
from afa.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ColorJitter,
    TrainAugmentation,
    mask_to_tensor,
    normalize_to_tensor,
)

SampleItem = int | tuple[int, int]
# PSA.md §4: AffinityNet's colour jitter strengths.
PSA_COLOR_JITTER: Mapping[str, float] = MappingProxyType(
    {"brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "hue": 0.1}
)


def split_item(item: Any) -> tuple[int, int | None]:
    """Accept ``index`` or ``(index, sample_seed)`` (ints, numpy or 0-d tensors)."""
    if isinstance(item, (tuple, list)) or (isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim == 1):
        if len(item) != 2:
            raise TypeError(f"expected an index or an (index, sample_seed) pair, got {item!r}")
        return int(item[0]), int(item[1])
    return int(item), None


def sample_rng(item: Any) -> tuple[np.random.Generator, int]:
    """The sample's generator and position for ``index`` or ``(index, sample_seed)``."""
    position, sample_seed = split_item(item)
    if sample_seed is None:
        # Plain indices: seed from torch so DataLoader worker seeding applies as usual.
        sample_seed = int(torch.randint(0, 2**62, ()).item())
    return np.random.default_rng(sample_seed), position


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
        rng, position = sample_rng(item)
        image = self.load_image(position)
        mask = self.load_mask(position, image.shape[:2]) if self.return_mask else None
        sample = self.augmentation(image, rng, mask)
        return {"name": self.names[position], "labels": self.labels(position), **sample}


def grid_crop_window(size: int, crop_size: int, stride: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """Place one axis of a crop at a multiple of ``stride`` (``size`` and ``crop_size`` are multiples of it).

    The semantics of :func:`afa.data.transforms._crop_window`, quantised: a crop smaller
    than the extent lies inside it, uniformly among the stride-aligned offsets; a larger
    crop holds the whole extent at a uniformly drawn stride-aligned offset.

    Returns:
        (source_start, target_start, length) in pixels, each a multiple of ``stride``.
    """
    if size >= crop_size:
        return stride * int(rng.integers(0, (size - crop_size) // stride + 1)), 0, crop_size
    return 0, stride * int(rng.integers(0, (crop_size - size) // stride + 1)), size


class AffinityCropDataset(IndexedImageDataset):
    """AffinityNet's training crops with their window of the CAM stage's grid label (PSA.md §4).

    Augmentation: no rescale; horizontal flip with ``flip_prob``; colour jitter of the whole
    image; an S×S crop at a multiple of ``stride``; 0 after normalisation outside the image.
    The CAM stage saved ``<label_dir>/<name>.png``, the (⌈H/8⌉, ⌈W/8⌉) confident-region
    label of the whole image (PSA.md §2), so the label of a stride-aligned crop is a window
    of it (``afa/engine/psa_cam.py``):

    1. The image is padded at bottom/right to the grid's extent (8⌈H/8⌉, 8⌈W/8⌉), the
       canvas; its padding pixels are outside the image, and their partial cells keep the
       saved label (the CAM stage pooled them zero-padded, as the reference does).
    2. A flip mirrors the canvas and the grid label together, so cells stay aligned. The
       reference flips the image before cropping too; with a width that is not a multiple
       of 8 the flip moves the padding to the left, which changes nothing of the labels.
    3. Per axis (rows, then columns), :func:`grid_crop_window` on the canvas: a crop smaller
       than the canvas lies inside it at a uniformly drawn multiple of 8; a larger crop
       holds the canvas at such an offset.
    4. ``grid_label`` is the window of the (flipped) grid label at offset / 8, ``ignore_index``
       where the crop extends beyond the canvas; ``image`` is 0 wherever it is not the image.

    Randomness comes from the sample's generator (see the module docstring), drawn in the
    order flip, jitter, crop rows, crop columns.

    Sample keys besides ``name``, ``image`` (3, S, S) and ``grid_label`` (S/8, S/8) int64:
    ``crop_box`` (4,) int64 (top, bottom, left, right), half-open, the crop in the (flipped)
    canvas's pixel coordinates (negative or past the canvas where the crop holds padding);
    ``valid_box`` (4,) int64, the crop region covered by real image pixels (as
    :class:`CropTrainDataset`); ``flipped`` 0-d bool tensor.

    Args:
        index: the split the CAM stage ran on (labels and masks are not read).
        label_dir: the folder of the grid labels (``<cam stage>/affinity_labels``).
        crop_size: S, a multiple of ``stride`` (PSA: 448).
        stride: the grid stride (8).
        flip_prob: horizontal flip probability.
        color_jitter: strengths ``{brightness, contrast, saturation, hue}`` (PSA: 0.3, 0.3,
            0.3, 0.1), or None (off).
        ignore_index: label of cells outside the saved grid (the CAM stage's IGN).
        mean, std: normalisation constants.
    """

    def __init__(
        self,
        index: ImageIndex | PendingIndex,
        label_dir: str | Path,
        crop_size: int = 448,
        stride: int = 8,
        flip_prob: float = 0.5,
        color_jitter: Mapping[str, float] | None = PSA_COLOR_JITTER,
        ignore_index: int = IGNORE_INDEX,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if int(stride) <= 0:
            raise ValueError(f"stride must be positive, got {stride}")
        if int(crop_size) <= 0 or int(crop_size) % int(stride):
            raise ValueError(
                f"crop_size must be a positive multiple of stride={stride} (the crop's label is a window "
                f"of the stride-{stride} grid), got crop_size={crop_size}: use e.g. "
                f"{max(int(stride), int(crop_size) // int(stride) * int(stride))}"
            )
        self.label_dir = Path(label_dir)
        self.crop_size, self.stride = int(crop_size), int(stride)
        self.flip_prob = float(flip_prob)
        self.color_jitter = ColorJitter.from_options(color_jitter)
        self.mean, self.std = tuple(mean), tuple(std)
        super().__init__(index, ignore_index)

    def label_path(self, position: int) -> Path:
        return self.label_dir / f"{self.names[position]}.png"

    def load_grid_label(self, position: int, image_hw: tuple[int, int]) -> np.ndarray:
        """(⌈H/8⌉, ⌈W/8⌉) uint8 grid label of an image, checked against its size and the classes."""
        path = self.label_path(position)
        if not path.is_file():
            raise DatasetError(f"affinity label {path} not found: run the CAM stage first (it writes "
                               f"{self.label_dir}/<name>.png for every training image)")
        grid = read_mask(path)
        expected = tuple(-(-side // self.stride) for side in image_hw)
        if grid.shape != expected:
            raise DatasetError(
                f"affinity label {path} is {grid.shape[0]}x{grid.shape[1]} but its {image_hw[0]}x{image_hw[1]} "
                f"image needs {expected[0]}x{expected[1]} (stride {self.stride}): re-run the CAM stage"
            )
        validate_mask(grid, self.num_classes, expected, path, self.ignore_index)
        return grid

    def __getitem__(self, item: SampleItem) -> dict[str, Any]:
        rng, position = sample_rng(item)
        image = self.load_image(position)
        height, width = image.shape[:2]
        grid = self.load_grid_label(position, (height, width))
        flipped = bool(rng.random() < self.flip_prob)
        if self.color_jitter is not None:
            image = self.color_jitter(image, rng)  # per pixel except contrast's image mean: flip-invariant

        stride, size = self.stride, self.crop_size
        canvas = torch.zeros((3, grid.shape[0] * stride, grid.shape[1] * stride), dtype=torch.float32)
        canvas[:, :height, :width] = normalize_to_tensor(image, self.mean, self.std)
        image_cols = (0, width)
        if flipped:
            canvas, grid = canvas.flip(-1), grid[:, ::-1]
            image_cols = (canvas.shape[-1] - width, canvas.shape[-1])

        rows = grid_crop_window(canvas.shape[1], size, stride, rng)
        cols = grid_crop_window(canvas.shape[2], size, stride, rng)
        source = (slice(rows[0], rows[0] + rows[2]), slice(cols[0], cols[0] + cols[2]))
        target = (slice(rows[1], rows[1] + rows[2]), slice(cols[1], cols[1] + cols[2]))
        crop = torch.zeros((3, size, size), dtype=torch.float32)
        crop[:, target[0], target[1]] = canvas[:, source[0], source[1]]
        grid_crop = np.full((size // stride, size // stride), self.ignore_index, np.int64)
        grid_crop[tuple(slice(s.start // stride, s.stop // stride) for s in target)] = \
            grid[tuple(slice(s.start // stride, s.stop // stride) for s in source)]

        top, left = rows[0] - rows[1], cols[0] - cols[1]  # the crop's origin in canvas coordinates
        crop_box = np.array([top, top + size, left, left + size], np.int64)
        valid_box = np.array([
            max(0, -top), min(size, height - top),
            max(0, image_cols[0] - left), min(size, image_cols[1] - left),
        ], np.int64)
        return {
            "name": self.names[position],
            "image": crop,
            "grid_label": torch.from_numpy(grid_crop),
            "crop_box": torch.from_numpy(crop_box),
            "valid_box": torch.from_numpy(valid_box),
            "flipped": torch.tensor(flipped),
        }


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

"""Datasets for training (augmented crops) and evaluation (full images with masks).

Two generic datasets do the work on any :class:`~afa.data.layouts.ImageIndex`;
each layout (VOC, COCO, custom folder) has a thin train and eval subclass whose typed
keyword arguments hydra instantiates directly.

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

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from afa.data.classes import IGNORE_INDEX
from afa.data.layouts import (
    IMAGE_EXTENSIONS,
    ImageIndex,
    coco_index,
    custom_index,
    voc_index,
)
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
    """Shared file access for one :class:`ImageIndex`: names, classes, images, masks.

    Args:
        index: the resolved split.
        ignore_index: value of ignored mask pixels.
    """

    def __init__(self, index: ImageIndex, ignore_index: int = IGNORE_INDEX) -> None:
        self.index = index
        self.ignore_index = int(ignore_index)

    @property
    def class_names(self) -> tuple[str, ...]:
        """K = C + 1 class names, background first."""
        return self.index.class_names

    @property
    def num_classes(self) -> int:
        """C, the number of foreground classes."""
        return len(self.index.class_names) - 1

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
        index: the resolved split (labels required).
        crop_size: S.
        scale_range: uniform rescale range.
        flip_prob: horizontal flip probability.
        ignore_index: mask value outside the image (only with ``return_mask``).
        return_mask: also return the crop of the ground-truth mask (for monitoring;
            weakly-supervised training never needs it).
    """

    def __init__(
        self,
        index: ImageIndex,
        crop_size: int = 512,
        scale_range: Sequence[float] = (0.5, 2.0),
        flip_prob: float = 0.5,
        ignore_index: int = IGNORE_INDEX,
        return_mask: bool = False,
    ) -> None:
        super().__init__(index, ignore_index)
        if index.labels is None:
            raise ValueError(f"training needs image labels; {index.description} has none")
        if return_mask and index.mask_paths is None:
            raise ValueError(f"return_mask=True needs masks; {index.description} has none")
        self.augmentation = TrainAugmentation(crop_size, scale_range, flip_prob, ignore_index)
        self.return_mask = bool(return_mask)

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
        index: the resolved split.
        ignore_index: value of ignored mask pixels.
        mean, std: normalisation constants.
    """

    def __init__(
        self,
        index: ImageIndex,
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


class VOCTrainDataset(CropTrainDataset):
    """PASCAL VOC 2012 (+ SBD) training crops.

    Args:
        root: the folder holding ``JPEGImages/`` (``.../VOCdevkit/VOC2012``).
        split: a standard split (packaged list) or a list under ``ImageSets/Segmentation``.
        split_file: explicit list file (overrides ``split``).
        labels_file: image-level labels (default: the packaged standard XML labels).
        class_names: K names, background first (default: VOC's 21).
        image_ext: image file extension.
        crop_size, scale_range, flip_prob, ignore_index, return_mask: see
            :class:`CropTrainDataset`.
        mask_dir: mask folder override (only with ``return_mask``).
        allow_background_only: accept images whose label list is empty.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train_aug",
        split_file: str | Path | None = None,
        labels_file: str | Path | None = None,
        class_names: Sequence[str] | None = None,
        image_ext: str = ".jpg",
        crop_size: int = 512,
        scale_range: Sequence[float] = (0.5, 2.0),
        flip_prob: float = 0.5,
        ignore_index: int = IGNORE_INDEX,
        return_mask: bool = False,
        mask_dir: str | Path | None = None,
        allow_background_only: bool = False,
    ) -> None:
        index = voc_index(
            root, split, split_file, labels_file, class_names, image_ext, mask_dir,
            with_masks=return_mask, with_labels=True, allow_background_only=allow_background_only,
        )
        super().__init__(index, crop_size, scale_range, flip_prob, ignore_index, return_mask)


class VOCEvalDataset(FullImageEvalDataset):
    """PASCAL VOC 2012 full images with masks (val by default).

    The VOC test split has neither masks nor labels: use ``with_masks=False,
    with_labels=False`` for inference on it. Other arguments as :class:`VOCTrainDataset`.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        split_file: str | Path | None = None,
        labels_file: str | Path | None = None,
        class_names: Sequence[str] | None = None,
        image_ext: str = ".jpg",
        mask_dir: str | Path | None = None,
        with_masks: bool = True,
        with_labels: bool = True,
        ignore_index: int = IGNORE_INDEX,
        allow_background_only: bool = False,
    ) -> None:
        index = voc_index(
            root, split, split_file, labels_file, class_names, image_ext, mask_dir,
            with_masks=with_masks, with_labels=with_labels,
            allow_background_only=allow_background_only,
        )
        super().__init__(index, ignore_index)


class COCOTrainDataset(CropTrainDataset):
    """MS COCO 2014 training crops in the VOC-style layout (see :func:`coco_index`)."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        split_file: str | Path | None = None,
        labels_file: str | Path | None = None,
        subset: str | None = None,
        image_ext: str = ".jpg",
        crop_size: int = 512,
        scale_range: Sequence[float] = (0.5, 2.0),
        flip_prob: float = 0.5,
        ignore_index: int = IGNORE_INDEX,
        return_mask: bool = False,
        allow_background_only: bool = False,
    ) -> None:
        index = coco_index(
            root, split, split_file, labels_file, subset, image_ext, with_masks=return_mask,
            with_labels=True, allow_background_only=allow_background_only,
        )
        super().__init__(index, crop_size, scale_range, flip_prob, ignore_index, return_mask)


class COCOEvalDataset(FullImageEvalDataset):
    """MS COCO 2014 full images with masks (val by default)."""

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        split_file: str | Path | None = None,
        labels_file: str | Path | None = None,
        subset: str | None = None,
        image_ext: str = ".jpg",
        with_masks: bool = True,
        with_labels: bool = True,
        ignore_index: int = IGNORE_INDEX,
        allow_background_only: bool = False,
    ) -> None:
        index = coco_index(
            root, split, split_file, labels_file, subset, image_ext, with_masks=with_masks,
            with_labels=with_labels, allow_background_only=allow_background_only,
        )
        super().__init__(index, ignore_index)


class CustomTrainDataset(CropTrainDataset):
    """Training crops from a folder of images and a labels file (see :func:`custom_index`).

    Args:
        images_dir: folder of images.
        labels_file: CSV ``image,class1;class2`` or JSON ``{image: [class names]}``.
        class_names: foreground class names (background prepended if absent).
        split_file: optional list restricting the images.
        masks_dir: folder of ``<image>.png`` masks (only with ``return_mask``).
    """

    def __init__(
        self,
        images_dir: str | Path,
        labels_file: str | Path,
        class_names: Sequence[str],
        split_file: str | Path | None = None,
        masks_dir: str | Path | None = None,
        crop_size: int = 512,
        scale_range: Sequence[float] = (0.5, 2.0),
        flip_prob: float = 0.5,
        ignore_index: int = IGNORE_INDEX,
        return_mask: bool = False,
        allow_background_only: bool = False,
    ) -> None:
        index = custom_index(
            images_dir, labels_file, class_names, masks_dir, split_file,
            with_masks=return_mask, allow_background_only=allow_background_only,
        )
        super().__init__(index, crop_size, scale_range, flip_prob, ignore_index, return_mask)


class CustomEvalDataset(FullImageEvalDataset):
    """Full images from a custom folder; masks only when ``masks_dir`` is given.

    Without ``masks_dir`` samples carry no ``mask`` key (inference only).
    """

    def __init__(
        self,
        images_dir: str | Path,
        labels_file: str | Path,
        class_names: Sequence[str],
        split_file: str | Path | None = None,
        masks_dir: str | Path | None = None,
        ignore_index: int = IGNORE_INDEX,
        allow_background_only: bool = False,
    ) -> None:
        index = custom_index(
            images_dir, labels_file, class_names, masks_dir, split_file,
            with_masks=masks_dir is not None, allow_background_only=allow_background_only,
        )
        super().__init__(index, ignore_index)

"""Training augmentation and normalisation (AFA.md §9).

Train: random rescale by u ~ U[scale_range] (PIL bilinear, antialiased when shrinking, new
size ``int(u * side)``: the reference's resize), horizontal flip with probability
``flip_prob``, a random S×S crop; where the (rescaled) image is smaller than S it is
placed at a random offset on an RGB-0 canvas, and the crop's valid box (the part covered
by the image) is returned. Normalisation with the ImageNet mean/std happens after padding,
so padding pixels are RGB 0 before normalisation. All randomness comes from the
``numpy.random.Generator`` passed in, so a sample's augmentation is a function of its seed.
"""
from __future__ import annotations

from collections.abc import Sequence

import mmcv
import numpy as np
import torch
from PIL import Image

from afa.data.classes import IGNORE_INDEX

IMAGENET_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
IMAGENET_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)


def normalize_to_tensor(
    image: np.ndarray,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Normalise an RGB image and lay it out channels-first.

    Args:
        image: (H, W, 3) RGB, values 0–255 (any dtype).

    Returns:
        (3, H, W) float32 tensor, ``(image - mean) / std``.
    """
    normalized = mmcv.imnormalize(
        image.astype(np.float32), np.asarray(mean, np.float64), np.asarray(std, np.float64),
        to_rgb=False,
    )
    return torch.from_numpy(np.ascontiguousarray(normalized.transpose(2, 0, 1)))


def mask_to_tensor(mask: np.ndarray) -> torch.Tensor:
    """(H, W) class indices → contiguous int64 tensor."""
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int64))


def rescale(image: np.ndarray, scale: float, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize by ``scale`` as the reference does (AFA.md §9): PIL bilinear for the image
    (antialiased when shrinking, unlike OpenCV's), PIL nearest for the mask, sides ``int(scale * side)``.

    Args:
        image: (H, W, 3) uint8 RGB.
        mask: optional (H, W) uint8.

    Returns:
        (h, w, 3) uint8 and (h, w) uint8 or None, with h = max(1, int(scale·H)), w likewise.
    """
    height, width = image.shape[:2]
    size = (max(1, int(width * scale)), max(1, int(height * scale)))  # PIL takes (width, height)
    resized = np.asarray(Image.fromarray(image).resize(size, resample=Image.Resampling.BILINEAR))
    if mask is not None:
        mask = np.asarray(Image.fromarray(mask).resize(size, resample=Image.Resampling.NEAREST))
    return resized, mask


def _crop_window(size: int, crop_size: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """Place one axis of the crop.

    Returns:
        (source_start, target_start, length): copy ``length`` pixels of the image starting
        at ``source_start`` to the crop starting at ``target_start``.
    """
    if size >= crop_size:
        return int(rng.integers(0, size - crop_size + 1)), 0, crop_size
    return 0, int(rng.integers(0, crop_size - size + 1)), size


class TrainAugmentation:
    """Random rescale, horizontal flip and S×S crop with zero padding (AFA.md §9).

    Args:
        crop_size: S, the side of the square crop.
        scale_range: (low, high) of the uniform rescale factor.
        flip_prob: probability of a horizontal flip.
        ignore_index: fill value of the mask outside the image.
        mean, std: normalisation constants on the 0–255 RGB scale.
    """

    def __init__(
        self,
        crop_size: int = 512,
        scale_range: Sequence[float] = (0.5, 2.0),
        flip_prob: float = 0.5,
        ignore_index: int = IGNORE_INDEX,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        low, high = (float(value) for value in scale_range)
        if not 0 < low <= high:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        if crop_size <= 0:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        self.crop_size = int(crop_size)
        self.scale_range = (low, high)
        self.flip_prob = float(flip_prob)
        self.ignore_index = int(ignore_index)
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(
        self, image: np.ndarray, rng: np.random.Generator, mask: np.ndarray | None = None
    ) -> dict[str, torch.Tensor]:
        """Augment one image (and optionally its mask with the same geometry).

        Args:
            image: (H, W, 3) uint8 RGB.
            rng: the sample's random generator; the only source of randomness.
            mask: optional (H, W) uint8 class indices.

        Returns:
            ``image``: (3, S, S) float32 normalised; ``valid_box``: (4,) int64
            (top, bottom, left, right), half-open, the crop region covered by the image;
            ``mask``: (S, S) int64 with ``ignore_index`` outside the image (if a mask was given).
        """
        image, mask = rescale(image, rng.uniform(*self.scale_range), mask)
        if rng.random() < self.flip_prob:
            image = mmcv.imflip(image, "horizontal")
            mask = None if mask is None else mmcv.imflip(mask, "horizontal")

        rows = _crop_window(image.shape[0], self.crop_size, rng)
        cols = _crop_window(image.shape[1], self.crop_size, rng)
        source = (slice(rows[0], rows[0] + rows[2]), slice(cols[0], cols[0] + cols[2]))
        target = (slice(rows[1], rows[1] + rows[2]), slice(cols[1], cols[1] + cols[2]))
        crop = np.zeros((self.crop_size, self.crop_size, 3), np.uint8)  # RGB-0 padding (§9)
        crop[target] = image[source]
        valid_box = np.array([rows[1], rows[1] + rows[2], cols[1], cols[1] + cols[2]], np.int64)
        sample = {
            "image": normalize_to_tensor(crop, self.mean, self.std),
            "valid_box": torch.from_numpy(valid_box),
        }
        if mask is not None:
            mask_crop = np.full((self.crop_size, self.crop_size), self.ignore_index, np.uint8)
            mask_crop[target] = mask[source]
            sample["mask"] = mask_to_tensor(mask_crop)
        return sample

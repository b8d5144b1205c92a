"""Training augmentation and normalisation (AFA.md §9, PSA.md §4).

Train: random rescale by u ~ U[scale_range] (PIL bilinear, antialiased when shrinking, new
size ``int(u * side)``: the reference's resize; ``scale_range=None``: no rescale), horizontal
flip with probability ``flip_prob``, optionally a colour jitter (PSA.md §4, off by default),
a random S×S crop; where the (rescaled) image is smaller than S it is placed at a random
offset on an RGB-0 canvas, and the crop's valid box (the part covered by the image) is
returned. Normalisation with the ImageNet mean/std happens after padding, so padding pixels
are RGB 0 before normalisation (AFA); with ``pad_after_normalize`` they are 0 after it, the
mean colour (PSA's reference). All randomness comes from the ``numpy.random.Generator``
passed in, so a sample's augmentation is a function of its seed.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import mmcv
import numpy as np
import torch
from PIL import Image

from afa.data.classes import IGNORE_INDEX

IMAGENET_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
IMAGENET_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)
# torchvision's ``rgb_to_grayscale`` weights (ITU-R 601-2 luma), used by contrast and saturation.
GRAY_WEIGHTS: tuple[float, float, float] = (0.2989, 0.587, 0.114)


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


def _grayscale(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 RGB -> (H, W) float32 luma."""
    return image @ np.asarray(GRAY_WEIGHTS, np.float32)


def _blend(image: np.ndarray, other: np.ndarray | float, factor: float) -> np.ndarray:
    """``factor·image + (1 − factor)·other``, clipped to [0, 255] (torchvision's ``_blend``)."""
    return np.clip(factor * image + (1.0 - factor) * other, 0.0, 255.0).astype(np.float32, copy=False)


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with black: (H, W, 3) float32 on 0–255 -> same, clipped."""
    return _blend(image, 0.0, factor)


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the image's mean grey level (one scalar per image)."""
    return _blend(image, float(_grayscale(image).mean()), factor)


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the image's own greyscale."""
    return _blend(image, _grayscale(image)[..., None], factor)


def rgb_to_hsv(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H, W, 3) float RGB on 0–255 -> hue in [0, 1), saturation in [0, 1], value on 0–255.

    torchvision's ``_rgb2hsv``; greys (max = min) get hue 0 and saturation 0.
    """
    # Contiguous channel planes: reductions over a last axis of 3 are slow in numpy.
    red, green, blue = np.ascontiguousarray(np.moveaxis(image, -1, 0))
    value = np.maximum(np.maximum(red, green), blue)
    chroma = value - np.minimum(np.minimum(red, green), blue)
    grey = chroma == 0
    saturation = chroma / np.where(grey, 1.0, value)
    divisor = np.where(grey, 1.0, chroma)
    red_c, green_c, blue_c = (value - red) / divisor, (value - green) / divisor, (value - blue) / divisor
    hue = np.where(
        value == red, blue_c - green_c, np.where(value == green, 2.0 + red_c - blue_c, 4.0 + green_c - red_c)
    )
    return (hue / 6.0) % 1.0, saturation, value


def hsv_to_rgb(hue: np.ndarray, saturation: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_hsv`: (H, W) each -> (H, W, 3) float32.

    The closed form ``c_n = v − v·s·clip(min(k, 4 − k), 0, 1)``, ``k = (n + 6h) mod 6`` with
    n = 5, 3, 1 for red, green, blue: the same values as torchvision's per-sector ``_hsv2rgb``
    without building its six-way selection.
    """
    chroma = value * saturation
    hue6 = hue * 6.0
    channels = []
    for offset in (5.0, 3.0, 1.0):
        k = (offset + hue6) % 6.0
        channels.append(value - chroma * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))
    return np.clip(np.stack(channels, axis=-1), 0.0, 255.0).astype(np.float32, copy=False)


def adjust_hue(image: np.ndarray, shift: float) -> np.ndarray:
    """Rotate the hue by ``shift`` turns (−0.5…0.5) in HSV, saturation and value kept."""
    hue, saturation, value = rgb_to_hsv(image)
    return hsv_to_rgb((hue + shift) % 1.0, saturation, value)


class ColorJitter:
    """PSA's colour jitter (PSA.md §4) with torchvision ``ColorJitter``'s definitions, in numpy.

    Factors are drawn as torchvision draws them: brightness, contrast and saturation from
    U[max(0, 1 − s), 1 + s], the hue shift from U[−h, h]. Unlike torchvision the order is
    fixed: brightness, contrast, saturation, hue (torchvision, which the reference uses,
    permutes it per call). A strength of 0 skips that step and its draw.
    The image stays float32 between steps (each clipped to [0, 255]) and is rounded to
    uint8 once at the end; PIL, which the reference jitters with, rounds after each step.

    Args:
        brightness, contrast, saturation: strengths s ≥ 0 (PSA: 0.3 each).
        hue: strength h in [0, 0.5] (PSA: 0.1).
    """

    STEPS = ("brightness", "contrast", "saturation", "hue")

    def __init__(
        self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0, hue: float = 0.0
    ) -> None:
        self.strengths = {"brightness": float(brightness), "contrast": float(contrast),
                          "saturation": float(saturation), "hue": float(hue)}
        if any(value < 0 for value in self.strengths.values()) or self.strengths["hue"] > 0.5:
            raise ValueError(f"color_jitter strengths must be >= 0 and hue <= 0.5, got {self.strengths}")

    @classmethod
    def from_options(cls, options: ColorJitter | Mapping[str, float] | None) -> ColorJitter | None:
        """Accept a ColorJitter, a mapping of strengths (a config node) or None (no jitter)."""
        if options is None or isinstance(options, ColorJitter):
            return options
        unknown = sorted(set(options) - set(cls.STEPS))
        if unknown:
            raise ValueError(f"color_jitter has unknown keys {unknown}; use {list(cls.STEPS)}")
        return cls(**options)

    def sample_factors(self, rng: np.random.Generator) -> dict[str, float]:
        """Draw the factors of the steps with a non-zero strength, in the fixed order."""
        factors = {}
        for step in self.STEPS:
            strength = self.strengths[step]
            if strength > 0:
                low, high = (-strength, strength) if step == "hue" else (max(0.0, 1.0 - strength), 1.0 + strength)
                factors[step] = float(rng.uniform(low, high))
        return factors

    def apply(self, image: np.ndarray, factors: Mapping[str, float]) -> np.ndarray:
        """(H, W, 3) RGB on 0–255 -> (H, W, 3) float32 in [0, 255], the steps of ``factors`` in order."""
        adjust = {"brightness": adjust_brightness, "contrast": adjust_contrast,
                  "saturation": adjust_saturation, "hue": adjust_hue}
        result = image.astype(np.float32)
        for step in self.STEPS:
            if step in factors:
                result = adjust[step](result, factors[step])
        return result

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (H, W, 3) uint8, factors drawn from ``rng``."""
        return np.rint(self.apply(image, self.sample_factors(rng))).astype(np.uint8)


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
    """Random rescale, horizontal flip, optional colour jitter and S×S crop with padding
    (AFA.md §9, PSA.md §4).

    Randomness is drawn in the order rescale, flip, jitter, crop; the rescale and jitter
    draw nothing when off, so the defaults give AFA's samples unchanged.

    Args:
        crop_size: S, the side of the square crop.
        scale_range: (low, high) of the uniform rescale factor; None: no rescale (PSA §4).
        flip_prob: probability of a horizontal flip.
        ignore_index: fill value of the mask outside the image.
        mean, std: normalisation constants on the 0–255 RGB scale.
        color_jitter: a :class:`ColorJitter`, a mapping of its strengths, or None (off).
            It is applied to the whole (rescaled, flipped) image before the crop, so the
            contrast step's mean grey is the image's, never the padding's.
        pad_after_normalize: pad with 0 after normalisation (the mean colour: PSA's
            reference) instead of RGB 0 before it (AFA's reference).
    """

    def __init__(
        self,
        crop_size: int = 512,
        scale_range: Sequence[float] | None = (0.5, 2.0),
        flip_prob: float = 0.5,
        ignore_index: int = IGNORE_INDEX,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        color_jitter: ColorJitter | Mapping[str, float] | None = None,
        pad_after_normalize: bool = False,
    ) -> None:
        if scale_range is not None:
            low, high = (float(value) for value in scale_range)
            if not 0 < low <= high:
                raise ValueError(f"scale_range must satisfy 0 < low <= high (or be None), got {scale_range}")
            scale_range = (low, high)
        if crop_size <= 0:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        self.crop_size = int(crop_size)
        self.scale_range = scale_range
        self.flip_prob = float(flip_prob)
        self.ignore_index = int(ignore_index)
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.color_jitter = ColorJitter.from_options(color_jitter)
        self.pad_after_normalize = bool(pad_after_normalize)

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
        if self.scale_range is not None:
            image, mask = rescale(image, rng.uniform(*self.scale_range), mask)
        if rng.random() < self.flip_prob:
            image = mmcv.imflip(image, "horizontal")
            mask = None if mask is None else mmcv.imflip(mask, "horizontal")
        if self.color_jitter is not None:
            image = self.color_jitter(image, rng)

        rows = _crop_window(image.shape[0], self.crop_size, rng)
        cols = _crop_window(image.shape[1], self.crop_size, rng)
        source = (slice(rows[0], rows[0] + rows[2]), slice(cols[0], cols[0] + cols[2]))
        target = (slice(rows[1], rows[1] + rows[2]), slice(cols[1], cols[1] + cols[2]))
        crop = np.zeros((self.crop_size, self.crop_size, 3), np.uint8)  # RGB-0 padding (§9)
        crop[target] = image[source]
        valid_box = np.array([rows[1], rows[1] + rows[2], cols[1], cols[1] + cols[2]], np.int64)
        normalized = normalize_to_tensor(crop, self.mean, self.std)
        if self.pad_after_normalize:
            inside = normalized[:, target[0], target[1]]
            normalized = torch.zeros_like(normalized)
            normalized[:, target[0], target[1]] = inside
        sample = {"image": normalized, "valid_box": torch.from_numpy(valid_box)}
        if mask is not None:
            mask_crop = np.full((self.crop_size, self.crop_size), self.ignore_index, np.uint8)
            mask_crop[target] = mask[source]
            sample["mask"] = mask_to_tensor(mask_crop)
        return sample

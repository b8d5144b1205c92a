"""A pretraining distribution for the tiny MiT, disjoint from the synthetic benchmark.

AFA learns its affinity from the attention of an ImageNet-pretrained MiT, whose attention
already groups an object's parts. The synthetic benchmark has no such prior for its tiny
MiT, so this module stands in for ImageNet: fully-supervised segmentation of *shape
families* (ellipse, box, triangle, flower, ring, cross) painted with body-like or
textured appearances on backgrounds like the benchmark's. It shares the benchmark's
backgrounds and shading (its "photographic domain") but none of its classes, marks, masks
or images:

- its own seed space: image ``i`` is a pure function of ``default_rng(prior_seed(i))``, a
  four-word key that no three-word benchmark key ``[seed, split, index]`` equals;
- its own classes (shape families; the benchmark's classes are mark hues, and its bodies
  are superellipses of any class);
- no marks. In the ``plain`` style nothing is saturated: colours stay at most
  ``PRIOR_MAX_SATURATION`` from grey, while every benchmark mark has saturation 0.8-1. The
  ``parts`` style paints shapes as objects of differently coloured parts (a shape cut in two
  by a line, each side its own appearance, some saturated), so that what groups a
  multi-coloured object is learned as ImageNet teaches it; its saturated colours take hues
  halfway between the benchmark's mark hues (``PRIOR_PART_HUES``), never a class's hue, and
  a part is a side of a cut, never a small shape inside another (the hues are tested).
  AFA starts worse from a parts-style prior than from the plain one (docs/synthetic.md).

Used by ``benchmarks/pretrain_tiny.py``, which writes the shipped
``weights/mit_tiny_synthetic_prior.pth`` (docs/synthetic.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from afa.data.classes import IGNORE_INDEX
from afa.data.synthetic import (
    DEFAULT_SPEC,
    _background,
    _body_value,
    _class_boundaries,
    _neutral,
    _smooth_noise,
    hsv_to_rgb,
)
from afa.data.transforms import normalize_to_tensor

PRIOR_CLASSES: tuple[str, ...] = ("background", "ellipse", "box", "triangle", "flower", "ring", "cross")
NUM_PRIOR_CLASSES = len(PRIOR_CLASSES) - 1
# "PRIO" in ASCII: the first three words of every prior key (benchmark keys have three words).
_PRIOR_WORD = 0x5052494F
PRIOR_VAL_OFFSET = 1 << 30  # validation images: indices from here, never drawn for training
PRIOR_MAX_SATURATION = 0.35
PRIOR_IMAGE_SIZE = 128
PRIOR_STYLES = ("plain", "parts")
# Saturated part colours of the parts style: halfway between the benchmark's mark hues (k/8),
# jittered by at most PRIOR_PART_HUE_JITTER, so 1/16 - 0.02 = 0.0425 of the circle from any
# class hue (a mark's own jitter is 0.015).
PRIOR_PART_HUES = (np.arange(8, dtype=np.float32) + 0.5) / 8
PRIOR_PART_HUE_JITTER = 0.02


def prior_seed(index: int) -> list[int]:
    """Entropy of prior image ``index`` (training: 0, 1, …; validation: from PRIOR_VAL_OFFSET)."""
    return [_PRIOR_WORD, _PRIOR_WORD, _PRIOR_WORD, int(index)]


@dataclass(frozen=True)
class PriorImage:
    """``image`` (H, W, 3) uint8 RGB; ``mask`` (H, W) uint8 shape-family ids with 255
    boundaries; ``classes`` the sorted families present (1..NUM_PRIOR_CLASSES)."""

    image: np.ndarray
    mask: np.ndarray
    classes: tuple[int, ...]


def _family_shape(family: int, u: np.ndarray, v: np.ndarray, major: float, minor: float,
                  rng: np.random.Generator) -> np.ndarray:
    """Boolean shape of ``family`` (1..6) on rotated coordinates ``u``, ``v`` (pixels)."""
    x, y = u / major, v / minor
    if family == 1:  # ellipse
        return x * x + y * y <= 1
    if family == 2:  # box
        return np.maximum(np.abs(x), np.abs(y)) <= 1
    if family == 3:  # triangle: three half-planes around the centre
        return (y <= 0.5) & (math.sqrt(3) * x - y <= 1) & (-math.sqrt(3) * x - y <= 1)
    radius, angle = np.hypot(x, y), np.arctan2(y, x)
    if family == 4:  # flower: 4-6 rounded lobes
        lobes = int(rng.integers(4, 7))
        return radius <= 0.62 + 0.38 * np.cos(lobes * angle)
    if family == 5:  # ring: an ellipse with an elliptic hole (the hole is background)
        return (radius <= 1) & (radius >= rng.uniform(0.4, 0.6))
    arm = rng.uniform(0.28, 0.42)  # cross: two bars
    return ((np.abs(x) <= 1) & (np.abs(y) <= arm)) | ((np.abs(y) <= 1) & (np.abs(x) <= arm))


def _linear_ramp(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """(rows, cols, angle, ramp): pixel coordinates, a random direction and the position along
    it in units of the region's larger side (a shading ramp)."""
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    return rows, cols, angle, (cols * np.cos(angle) + rows * np.sin(angle)) / max(height, width)


def _appearance(rng: np.random.Generator, shape: tuple[int, int], background_value: float) -> np.ndarray:
    """A region's colour (H, W, 3): smooth shaded like a benchmark body, or textured."""
    height, width = shape
    value = _body_value(rng, background_value, 0.15)
    base = hsv_to_rgb(np.array([rng.random(), rng.uniform(0, PRIOR_MAX_SATURATION - 0.05), value], np.float32))
    base = base * _neutral(DEFAULT_SPEC)
    rows, cols, angle, ramp = _linear_ramp(rng, height, width)
    luminance = rng.uniform(0.02, 0.15) * ramp[..., None]
    kind = int(rng.integers(0, 4))  # 0-1 smooth (as bodies), 2 stripes, 3 blotches
    if kind == 2:
        period = rng.uniform(4, 12)
        luminance = luminance + rng.uniform(0.04, 0.1) * np.sin(2 * np.pi * (cols * np.sin(angle) - rows * np.cos(angle)) / period)[..., None]
    elif kind == 3:
        luminance = luminance + rng.uniform(0.04, 0.1) * _smooth_noise(rng, height, width, rng.uniform(3, 8), 1)
    grain = rng.normal(0.0, 0.012, (height, width, 1)).astype(np.float32)
    return base + luminance + grain


def _saturated_appearance(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A saturated region's colour (H, W, 3) at a hue between the mark hues, shaded, grained."""
    height, width = shape
    hue = PRIOR_PART_HUES[int(rng.integers(0, len(PRIOR_PART_HUES)))] + rng.uniform(
        -PRIOR_PART_HUE_JITTER, PRIOR_PART_HUE_JITTER)
    base = hsv_to_rgb(np.array([hue, rng.uniform(0.5, 0.95), rng.uniform(0.55, 0.9)], np.float32))
    ramp = _linear_ramp(rng, height, width)[3]
    # Shading scales the colour (not added grey), so the hue stays where it was drawn.
    shade = 1.0 + rng.uniform(-0.1, 0.1) * ramp[..., None] + rng.normal(0.0, 0.01, (height, width, 1))
    return base * shade.astype(np.float32)


def _parts_fill(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, minor: float,
                background_value: float) -> np.ndarray:
    """The parts style's fill (H, W, 3): saturated or plain, and in 70 % of shapes cut by a
    line near the centre into two sides of different appearance. The cut is sharp: a blend
    of two saturated hues would pass through the mark hue between them."""
    shape = u.shape

    def appearance(saturated_share: float) -> np.ndarray:
        if rng.random() < saturated_share:
            return _saturated_appearance(rng, shape)
        return _appearance(rng, shape, background_value)

    fill = appearance(0.3)
    if rng.random() < 0.7:
        angle = rng.uniform(0, np.pi)
        side = u * np.cos(angle) + v * np.sin(angle) > rng.uniform(-0.3, 0.3) * minor
        fill = np.where(side[..., None], appearance(0.6), fill)
    return fill


def generate_prior_image(index: int, size: int = PRIOR_IMAGE_SIZE, style: str = "plain") -> PriorImage:
    """Prior image ``index``: 1-4 shapes (later ones on top, each earlier one at least 40 %
    visible), a benchmark-like background, ignore boundaries as VOC. ``style``: ``plain``
    (one low-saturation appearance per shape, the shipped prior's) or ``parts`` (objects of
    two differently coloured sides, some saturated; the module's docstring)."""
    if style not in PRIOR_STYLES:
        raise ValueError(f"prior style {style!r}: one of {', '.join(PRIOR_STYLES)}")
    rng = np.random.default_rng(prior_seed(index))
    canvas, background_value = _background(rng, size, size, DEFAULT_SPEC)
    family_map = np.zeros((size, size), np.uint8)
    instance_map = np.zeros((size, size), np.int16)
    areas: list[int] = []
    for _ in range(int(rng.choice(4, p=(0.3, 0.3, 0.25, 0.15))) + 1):
        for _try in range(20):
            family = int(rng.integers(1, NUM_PRIOR_CLASSES + 1))
            major = float(np.exp(rng.uniform(np.log(0.12), np.log(0.45)))) * size
            minor = max(major * rng.uniform(0.5, 1.0), 10.0)
            centre = rng.uniform(0.1 * size, 0.9 * size, 2)
            rotation = rng.uniform(0, np.pi)
            rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
            drow, dcol = rows - centre[0], cols - centre[1]
            u = dcol * np.cos(rotation) + drow * np.sin(rotation)
            v = -dcol * np.sin(rotation) + drow * np.cos(rotation)
            shape = _family_shape(family, u, v, max(major, minor), minor, rng)
            if shape.sum() < 60:
                continue
            covered = np.bincount(instance_map[shape], minlength=len(areas) + 1)[1:]
            visible = np.bincount(instance_map.ravel(), minlength=len(areas) + 1)[1:] - covered
            if (visible < 0.4 * np.asarray(areas, float)).any():
                continue
            fill = (_appearance(rng, (size, size), background_value) if style == "plain"
                    else _parts_fill(rng, u, v, minor, background_value))
            canvas[shape] = fill[shape]
            family_map[shape] = family
            areas.append(int(shape.sum()))
            instance_map[shape] = len(areas)
            break
    # Objects of one family touching each other stay one region, as in a semantic mask.
    mask = family_map.copy()
    mask[_class_boundaries(family_map)] = IGNORE_INDEX
    image = np.clip(np.rint(canvas * 255.0), 0, 255).astype(np.uint8)
    classes = tuple(int(c) for c in np.unique(family_map) if c > 0)
    return PriorImage(image=image, mask=mask, classes=classes)


def max_saturation(image: np.ndarray) -> float:
    """Largest HSV saturation (0-1) of an RGB uint8 image, over pixels brighter than 0.15."""
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    bright = hsv[..., 2] > 0.15 * 255
    return float(hsv[..., 1][bright].max()) / 255.0 if bright.any() else 0.0


class SyntheticPriorDataset(Dataset):
    """Prior images as ``image`` (3, S, S) normalised, ``mask`` (S, S) int64 and ``labels``
    (C,) multi-hot; every image is fresh (generated when loaded), so no augmentation.

    Args:
        start: index of the first image (0 for training, PRIOR_VAL_OFFSET for validation).
        length: number of images.
        style: ``plain`` or ``parts`` (:func:`generate_prior_image`).
    """

    def __init__(self, start: int = 0, length: int = 1_000_000, style: str = "plain") -> None:
        self.start, self.length, self.style = start, length, style

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        sample = generate_prior_image(self.start + item, style=self.style)
        labels = torch.zeros(NUM_PRIOR_CLASSES)
        labels[[c - 1 for c in sample.classes]] = 1.0
        return {"image": normalize_to_tensor(sample.image), "mask": torch.from_numpy(sample.mask.astype(np.int64)),
                "labels": labels}

"""A synthetic weakly-supervised segmentation benchmark in the VOC layout.

Each object is a large *body* whose appearance is drawn independently of its class (a
low-saturation colour with smooth shading, random superellipse-like shape, size and
rotation) carrying a small, solid, saturated *mark* whose hue identifies the class; the
mark's hue tints the body around it, fading into the body's colour with no step. A
classifier only needs the mark, so its CAM sits on the mark and its tint and misses most
of the body; bodies are smooth and distinct from the textured background. Greys are
balanced to the ImageNet mean colour so that every mark hue is equally far from them once
normalised. Images hold 1–3 objects with varied scale, overlap (marks are never occluded)
and class co-occurrence (each class has a partner it often appears with). What the CAM and
AFA's refinements reach on it is measured in docs/synthetic.md.

Every image is a pure function of ``(seed, split, index)``: the on-disk train split holds
exactly the first ``num_train`` images of the on-the-fly train stream, and val/test are
fixed on disk. Generation is vectorised numpy (plus OpenCV resizes/erosions).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from afa.data.classes import IGNORE_INDEX
from afa.data.datasets import labels_to_multi_hot, split_item
from afa.data.layouts import ImageIndex, voc_index
from afa.data.readers import write_index_mask
from afa.data.loaders import worker_context
from afa.data.transforms import TrainAugmentation

GENERATOR_VERSION = 5
MANIFEST_NAME = "synthetic_manifest.json"
SYNTHETIC_CLASSES: tuple[str, ...] = (
    "background", "anvil", "bucket", "candle", "dagger", "easel", "funnel", "goblet", "harp",
)
NUM_SYNTHETIC_CLASSES = len(SYNTHETIC_CLASSES) - 1
# Mark hue of class c (1..8): evenly spaced around the hue circle, 45 degrees apart.
MARK_HUES = np.arange(NUM_SYNTHETIC_CLASSES, dtype=np.float32) / NUM_SYNTHETIC_CLASSES
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class SyntheticSpec:
    """Generator parameters (recorded in the manifest; a change regenerates the cache).

    Attributes:
        image_sizes: (H, W) choices; a small set so evaluation batches by size.
        object_count_probs: probability of 1, 2, 3, … objects.
        co_occurrence_prob: chance an added object takes the partner class of an earlier one.
        body_radius_range: body major radius as a fraction of min(H, W), drawn
            log-uniformly: small objects, which a CAM covers whole, and large ones, whose
            body it misses.
        body_aspect_range: minor / major radius.
        min_body_minor_radius: in pixels.
        mark_fraction_range: mark radius as a fraction of the body's minor radius.
        min_mark_radius: in pixels (smaller marks were not learnable).
        mark_halo: width of the mark's soft edge, blending into the body, as a fraction
            of the mark radius (0: a hard edge).
        mark_tint: (used instead of the halo when > 0) the class hue tints the body around
            the mark, fading along a raised cosine over this many mark radii: the mark's
            surroundings are continuous with the body, with no step anywhere.
        neutral_rgb: the RGB balance of the greys of backgrounds and bodies. The ImageNet
            mean colour (the default) is the networks' input zero: greys balanced to it
            sit equally far from every mark hue once normalised. Pure greys (1, 1, 1) lie
            towards blue from that zero, and the cyan/azure/violet classes were then
            learned far more slowly (docs/synthetic.md).
        min_visible_fraction: share of an earlier body a later one may leave visible, at least.
        min_inside_fraction: share of a body that must lie inside the image.
        body_saturation_max, background_saturation_max: keep both far from the mark hues.
        min_body_background_contrast: |value(body) - value(background)| at least.
        ignore_border: mark class boundaries with 255, 1 px on each side, as VOC does.
        max_placement_tries: attempts per object before it is dropped.
    """

    image_sizes: tuple[tuple[int, int], ...] = (
        (128, 128), (160, 160), (192, 192), (128, 192), (192, 128), (160, 192),
    )
    object_count_probs: tuple[float, ...] = (0.45, 0.35, 0.20)
    co_occurrence_prob: float = 0.5
    body_radius_range: tuple[float, float] = (0.1, 0.45)
    body_aspect_range: tuple[float, float] = (0.55, 1.0)
    min_body_minor_radius: float = 12.0
    mark_fraction_range: tuple[float, float] = (0.36, 0.5)
    min_mark_radius: float = 5.0
    mark_halo: float = 0.0
    mark_tint: float = 2.0
    neutral_rgb: tuple[float, float, float] = (0.485, 0.456, 0.406)
    min_visible_fraction: float = 0.45
    min_inside_fraction: float = 0.7
    body_saturation_max: float = 0.25
    background_saturation_max: float = 0.2
    min_body_background_contrast: float = 0.2
    ignore_border: bool = True
    max_placement_tries: int = 30


DEFAULT_SPEC = SyntheticSpec()


@dataclass(frozen=True)
class SyntheticImage:
    """One generated sample: ``image`` (H, W, 3) uint8 RGB, ``mask`` (H, W) uint8 with
    255 boundaries, ``classes`` the sorted foreground classes (1..C) present."""

    image: np.ndarray
    mask: np.ndarray
    classes: tuple[int, ...]


def as_spec(spec: SyntheticSpec | Mapping[str, Any] | None) -> SyntheticSpec:
    """A spec from a ``SyntheticSpec``, a mapping of overrides of the defaults (e.g. from a
    config file; lists become tuples), or None (the defaults)."""
    if spec is None:
        return DEFAULT_SPEC
    if isinstance(spec, SyntheticSpec):
        return spec
    def frozen(value: Any) -> Any:
        return tuple(frozen(item) for item in value) if isinstance(value, (list, tuple)) else value
    return replace(DEFAULT_SPEC, **{key: frozen(value) for key, value in spec.items()})


def partner_class(class_index: int) -> int:
    """The class that class ``class_index`` (1..C) co-occurs with: pairs (1,2), (3,4), …"""
    return ((class_index - 1) ^ 1) + 1


def image_seed(seed: int, split: str, index: int) -> list[int]:
    """Entropy for image ``index`` of ``split`` (a ``default_rng`` seed sequence)."""
    return [int(seed), SPLIT_CODES[split], int(index)]


def image_name(split: str, index: int) -> str:
    return f"synth_{split}_{index:06d}"


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """HSV in [0, 1] → RGB in [0, 1], for arrays of shape (..., 3)."""
    hue, saturation, value = hsv[..., 0] % 1.0, hsv[..., 1], hsv[..., 2]
    sector = np.floor(hue * 6.0)
    fraction = hue * 6.0 - sector
    p = value * (1 - saturation)
    q = value * (1 - saturation * fraction)
    t = value * (1 - saturation * (1 - fraction))
    sector = sector.astype(np.int64) % 6
    sextants = ((value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q))
    choices = [np.stack(channels, axis=-1) for channels in sextants]
    return np.choose(sector[..., None], choices)


def _neutral(spec: SyntheticSpec) -> np.ndarray:
    """The RGB balance of grey (mean 1)."""
    neutral = np.asarray(spec.neutral_rgb, np.float32)
    return neutral / neutral.mean()


def _smooth_noise(
    rng: np.random.Generator, height: int, width: int, cell: float, channels: int
) -> np.ndarray:
    """Band-limited noise: a coarse normal grid upsampled bicubically, (H, W, channels)."""
    grid = rng.standard_normal(
        (max(2, math.ceil(height / cell) + 1), max(2, math.ceil(width / cell) + 1), channels)
    ).astype(np.float32)
    smooth = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    return smooth.reshape(height, width, channels)


def _background(
    rng: np.random.Generator, height: int, width: int, spec: SyntheticSpec
) -> tuple[np.ndarray, float]:
    """Textured, low-saturation background. Returns (H, W, 3) float RGB and its base value."""
    base_value = float(rng.uniform(0.3, 0.75))
    hue, saturation = rng.random(), rng.uniform(0, spec.background_saturation_max)
    base = hsv_to_rgb(np.array([hue, saturation, base_value], np.float32)) * _neutral(spec)
    noise = _smooth_noise(rng, height, width, rng.uniform(6, 28), 3)
    luminance = noise[..., :1] * rng.uniform(0.04, 0.1)
    chroma = noise * rng.uniform(0.0, 0.03)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(5, 22)
    phase = (cols * np.cos(angle) + rows * np.sin(angle)) * (2 * np.pi / period)
    pattern = int(rng.integers(0, 3))  # 0 plain, 1 stripes, 2 checks
    if pattern == 1:
        luminance = luminance + rng.uniform(0.03, 0.09) * np.sin(phase)[..., None]
    elif pattern == 2:
        across = (-cols * np.sin(angle) + rows * np.cos(angle)) * (2 * np.pi / period)
        checks = np.sign(np.sin(phase) * np.sin(across))
        luminance = luminance + rng.uniform(0.03, 0.08) * checks[..., None]
    grain = rng.normal(0.0, 0.02, (height, width, 1)).astype(np.float32)
    return base + luminance + chroma + grain, base_value


def _body_value(rng: np.random.Generator, background_value: float, contrast: float) -> float:
    """A body brightness in [0.15, 0.95] at least ``contrast`` away from the background's."""
    low_span = max(0.0, background_value - contrast - 0.15)
    high_span = max(0.0, 0.95 - background_value - contrast)
    draw = rng.uniform(0, low_span + high_span)
    return 0.15 + draw if draw < low_span else background_value + contrast + (draw - low_span)


def _object_geometry(
    rng: np.random.Generator, height: int, width: int, spec: SyntheticSpec
) -> dict[str, Any] | None:
    """Draw one object's body and mark on its bounding box (which may leave the image).

    Returns:
        dict with ``top``, ``left`` (box origin, may be negative), ``body``, ``mark``
        (bool (h, w) arrays over the box), the rotated coordinates ``u`` and ``v`` and
        the major radius ``a``; None when the mark does not fit inside the body.
    """
    short_side = min(height, width)
    low, high = np.log(spec.body_radius_range)
    major = float(np.exp(rng.uniform(low, high))) * short_side
    minor = max(major * rng.uniform(*spec.body_aspect_range), spec.min_body_minor_radius)
    major = max(major, minor)
    exponent = rng.uniform(1.7, 4.0)  # superellipse: diamond-ish (<2) to boxy (>2)
    wobble, lobes, lobe_phase = rng.uniform(0, 0.12), int(rng.integers(2, 6)), rng.uniform(0, 2 * np.pi)
    rotation = rng.uniform(0, np.pi)
    center_row = rng.uniform(0.1 * height, 0.9 * height)
    center_col = rng.uniform(0.1 * width, 0.9 * width)

    extent = int(math.ceil(major * (1 + wobble))) + 2
    top, left = int(round(center_row)) - extent, int(round(center_col)) - extent
    rows, cols = np.mgrid[top : top + 2 * extent + 1, left : left + 2 * extent + 1].astype(np.float32)
    drow, dcol = rows - center_row, cols - center_col
    u = dcol * np.cos(rotation) + drow * np.sin(rotation)
    v = -dcol * np.sin(rotation) + drow * np.cos(rotation)
    radius = (np.abs(u / major) ** exponent + np.abs(v / minor) ** exponent) ** (1 / exponent)
    boundary = 1 + wobble * np.sin(lobes * np.arctan2(v / minor, u / major) + lobe_phase)
    body = radius <= boundary

    mark_radius = max(rng.uniform(*spec.mark_fraction_range) * minor, spec.min_mark_radius)
    offset_u = rng.uniform(-1, 1) * max(0.0, 0.55 * (major - mark_radius))
    offset_v = rng.uniform(-1, 1) * max(0.0, 0.55 * (minor - mark_radius))
    mark_angle = rng.uniform(0, 2 * np.pi)
    mu, mv = u - offset_u, v - offset_v
    x = mu * np.cos(mark_angle) + mv * np.sin(mark_angle)
    y = -mu * np.sin(mark_angle) + mv * np.cos(mark_angle)
    shape = int(rng.integers(0, 4))  # disc, square, diamond, triangle (all of similar area)
    if shape == 0:
        mark = x * x + y * y <= mark_radius**2
    elif shape == 1:
        mark = np.maximum(np.abs(x), np.abs(y)) <= 0.886 * mark_radius
    elif shape == 2:
        mark = np.abs(x) + np.abs(y) <= 1.25 * mark_radius
    else:
        side = 1.35 * mark_radius  # inradius-based equilateral triangle
        mark = (y <= 0.5 * side) & (np.sqrt(3) * x - y <= side) & (-np.sqrt(3) * x - y <= side)
    # A ring of body must surround the mark, so the mark never touches the background.
    inner_body = cv2.erode(body.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=2).astype(bool)
    if not mark.any() or (mark & ~inner_body).any():
        return None
    return {
        "top": top, "left": left, "body": body, "mark": mark, "u": u, "v": v, "a": major,
        "mark_radius": mark_radius,
    }


def _clip_to_image(
    geometry: dict[str, Any], height: int, width: int
) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """(image slices, box slices) of the part of an object's box inside the image."""
    box_h, box_w = geometry["body"].shape
    top, left = geometry["top"], geometry["left"]
    row0, col0 = max(top, 0), max(left, 0)
    row1, col1 = min(top + box_h, height), min(left + box_w, width)
    image_slices = (slice(row0, row1), slice(col0, col1))
    box_slices = (slice(row0 - top, row1 - top), slice(col0 - left, col1 - left))
    return image_slices, box_slices


def _choose_classes(rng: np.random.Generator, spec: SyntheticSpec) -> list[int]:
    """Classes (1..C) of the objects to place, with partner co-occurrence."""
    probabilities = np.asarray(spec.object_count_probs) / sum(spec.object_count_probs)
    count = int(rng.choice(len(probabilities), p=probabilities)) + 1
    classes = [int(rng.integers(1, NUM_SYNTHETIC_CLASSES + 1))]
    while len(classes) < count:
        if rng.random() < spec.co_occurrence_prob:
            classes.append(partner_class(classes[int(rng.integers(len(classes)))]))
        else:
            classes.append(int(rng.integers(1, NUM_SYNTHETIC_CLASSES + 1)))
    return classes


def _paint_object(
    rng: np.random.Generator,
    canvas: np.ndarray,
    geometry: dict[str, Any],
    class_index: int,
    slices: tuple[tuple[slice, slice], tuple[slice, slice]],
    background_value: float,
    spec: SyntheticSpec,
) -> None:
    """Paint a body (class-independent appearance) and its class-coloured mark in place."""
    image_slices, box_slices = slices
    body = geometry["body"][box_slices]
    mark = geometry["mark"][box_slices]
    value = _body_value(rng, background_value, spec.min_body_background_contrast)
    hue, saturation = rng.random(), rng.uniform(0, spec.body_saturation_max)
    base = hsv_to_rgb(np.array([hue, saturation, value], np.float32)) * _neutral(spec)
    angle = rng.uniform(0, 2 * np.pi)
    gradient = (geometry["u"] * np.cos(angle) + geometry["v"] * np.sin(angle)) / geometry["a"]
    shading = rng.uniform(0.02, 0.1) * gradient[box_slices][..., None]
    grain = rng.normal(0.0, 0.012, body.shape + (1,)).astype(np.float32)
    region = canvas[image_slices]
    region[body] = (base + shading + grain)[body]
    hue = MARK_HUES[class_index - 1] + rng.uniform(-0.015, 0.015)
    mark_rgb = hsv_to_rgb(np.array([hue, rng.uniform(0.8, 1.0), rng.uniform(0.8, 1.0)], np.float32))
    mark_pixels = mark_rgb + rng.normal(0.0, 0.01, body.shape + (3,)).astype(np.float32)
    if spec.mark_tint > 0:
        # The class hue tints the body around the core: opacity 1 at the core's edge, falling
        # to 0 along a raised cosine over mark_tint × the mark radius; no step anywhere.
        reach = spec.mark_tint * geometry["mark_radius"]
        outside = (~geometry["mark"]).astype(np.uint8)
        distance = cv2.distanceTransform(outside, cv2.DIST_L2, 5)[box_slices]
        opacity = 0.5 * (1 + np.cos(np.pi * np.clip(distance / reach, 0.0, 1.0)))
        opacity = (opacity * body)[..., None]
        region[:] = region * (1 - opacity) + mark_pixels * opacity
    elif spec.mark_halo > 0:
        # Soft edge: opacity 1 on the mark, falling off over the halo, only on the body.
        sigma = spec.mark_halo * geometry["mark_radius"]
        opacity = np.clip(2.0 * cv2.GaussianBlur(mark.astype(np.float32), (0, 0), sigma), 0.0, 1.0)
        opacity = np.where(mark, 1.0, opacity * body)[..., None]
        region[:] = region * (1 - opacity) + mark_pixels * opacity
    else:
        region[mark] = mark_pixels[mark]


def _class_boundaries(class_map: np.ndarray) -> np.ndarray:
    """Pixels whose 4-neighbour has a different class (both sides of every boundary)."""
    boundary = np.zeros(class_map.shape, bool)
    vertical = class_map[1:, :] != class_map[:-1, :]
    horizontal = class_map[:, 1:] != class_map[:, :-1]
    boundary[1:, :] |= vertical
    boundary[:-1, :] |= vertical
    boundary[:, 1:] |= horizontal
    boundary[:, :-1] |= horizontal
    return boundary


def generate_image(seed: Sequence[int] | int, spec: SyntheticSpec = DEFAULT_SPEC) -> SyntheticImage:
    """Generate one image, its mask and its labels, deterministically from ``seed``."""
    return _render(seed, spec)[0]


def _render(seed: Sequence[int] | int, spec: SyntheticSpec) -> tuple[SyntheticImage, dict[str, Any]]:
    """:func:`generate_image` plus the scene's parts, for analysis (never in dataset samples).

    Returns:
        the image and ``{"instances": (H, W) int8 top-most object (0: background),
        "marks": (H, W) int8 object whose mark core covers the pixel, "classes": class
        of object i + 1}``.
    """
    rng = np.random.default_rng(seed)
    height, width = spec.image_sizes[int(rng.integers(len(spec.image_sizes)))]
    while True:  # redraw in the (rare) case no object could be placed
        canvas, background_value = _background(rng, height, width, spec)
        instance_map = np.zeros((height, width), np.int8)  # 0 = background, i = object i
        mark_map = np.zeros((height, width), np.int8)
        protected = np.zeros((height, width), bool)  # marks (dilated): nothing may cover them
        placed_classes: list[int] = []
        placed_areas: list[int] = []
        for class_index in _choose_classes(rng, spec):
            for _ in range(spec.max_placement_tries):
                geometry = _object_geometry(rng, height, width, spec)
                if geometry is None:
                    continue
                slices = _clip_to_image(geometry, height, width)
                image_slices, box_slices = slices
                body = geometry["body"][box_slices]
                mark = geometry["mark"][box_slices]
                if mark.sum() != geometry["mark"].sum():
                    continue  # the mark must lie wholly inside the image
                if body.sum() < spec.min_inside_fraction * geometry["body"].sum():
                    continue
                if (protected[image_slices] & body).any():
                    continue
                slots = len(placed_areas) + 1
                covered = np.bincount(instance_map[image_slices][body], minlength=slots)[1:]
                visible = np.bincount(instance_map.ravel(), minlength=slots)[1:] - covered
                if (visible < spec.min_visible_fraction * np.asarray(placed_areas, float)).any():
                    continue
                _paint_object(rng, canvas, geometry, class_index, slices, background_value, spec)
                instance_map[image_slices][body] = len(placed_classes) + 1
                mark_map[image_slices][mark] = len(placed_classes) + 1
                dilated = cv2.dilate(mark.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
                protected[image_slices] |= dilated
                placed_classes.append(class_index)
                placed_areas.append(int(body.sum()))
                break
        if placed_classes:
            break
    class_map = np.asarray([0, *placed_classes], np.uint8)[instance_map]
    mask = class_map.copy()
    if spec.ignore_border:
        mask[_class_boundaries(class_map)] = IGNORE_INDEX
    image = np.clip(np.rint(canvas * 255.0), 0, 255).astype(np.uint8)
    parts = {"instances": instance_map, "marks": mark_map, "classes": placed_classes}
    return SyntheticImage(image=image, mask=mask, classes=tuple(sorted(set(placed_classes)))), parts


def generate_split_image(
    seed: int, split: str, index: int, spec: SyntheticSpec = DEFAULT_SPEC
) -> SyntheticImage:
    """Image ``index`` of ``split`` for a benchmark seed."""
    return generate_image(image_seed(seed, split, index), spec)


def _write_chunk(
    folder: str, seed: int, split: str, indices: list[int], spec: SyntheticSpec
) -> dict[str, list[int]]:
    """Generate and write a run of images (one worker's job). Returns name → classes."""
    from PIL import Image

    root = Path(folder)
    labels = {}
    for index in indices:
        sample = generate_split_image(seed, split, index, spec)
        name = image_name(split, index)
        Image.fromarray(sample.image).save(root / "JPEGImages" / f"{name}.png", compress_level=1)
        write_index_mask(root / "SegmentationClass" / f"{name}.png", sample.mask)
        labels[name] = list(sample.classes)
    return labels


def _manifest(seed: int, split_sizes: dict[str, int], spec: SyntheticSpec) -> dict[str, Any]:
    return {
        "generator": "afa.data.synthetic",
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "splits": {split: int(count) for split, count in split_sizes.items()},
        "spec": json.loads(json.dumps(asdict(spec))),  # tuples → lists, as read back
    }


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def prepare_synthetic(
    root: str | Path,
    seed: int = 0,
    num_train: int = 2000,
    num_val: int = 500,
    num_test: int = 500,
    workers: int | None = None,
    spec: SyntheticSpec = DEFAULT_SPEC,
) -> Path:
    """Write (or find cached) the synthetic benchmark in the VOC layout.

    Layout under ``root/VOCdevkit/VOC2012``: ``JPEGImages/<name>.png`` (lossless),
    ``SegmentationClass/<name>.png`` (palette masks), ``ImageSets/Segmentation/{train,
    val,test}.txt``, ``cls_labels.json`` (name → class indices 1..8) and
    ``synthetic_manifest.json`` (generator version, seed, split sizes, parameters). A
    second call with the same manifest returns at once; any difference regenerates into
    a temporary folder that then replaces the old one.

    Args:
        root: cache folder.
        seed: benchmark seed.
        num_train, num_val, num_test: images per split.
        workers: generator processes (default: up to 2, the CPUs available).
        spec: generator parameters.

    Returns:
        The VOC2012-style folder (what :class:`SyntheticIndex` reads).
    """
    destination = Path(root).expanduser() / "VOCdevkit" / "VOC2012"
    split_sizes = {"train": num_train, "val": num_val, "test": num_test}
    wanted = _manifest(seed, split_sizes, spec)
    if _read_manifest(destination) == wanted:
        return destination
    if destination.exists() and _read_manifest(destination) is None:
        raise FileExistsError(
            f"{destination} exists and is not a synthetic benchmark (no {MANIFEST_NAME}): "
            "choose another root for the synthetic data; nothing was overwritten"
        )
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.parent / f".VOC2012.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _generate_into(staging, seed, split_sizes, spec, workers)
        (staging / MANIFEST_NAME).write_text(json.dumps(wanted, indent=1))
        _replace_folder(staging, destination, wanted)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination


def _generate_into(
    folder: Path, seed: int, split_sizes: dict[str, int], spec: SyntheticSpec, workers: int | None
) -> None:
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    workers = workers or max(1, min(2, available))
    jobs = [
        (split, list(range(start, min(start + 100, count))))
        for split, count in split_sizes.items()
        for start in range(0, count, 100)
    ]
    labels: dict[str, list[int]] = {}
    if workers == 1:
        for split, indices in jobs:
            labels.update(_write_chunk(str(folder), seed, split, indices, spec))
    else:
        with ProcessPoolExecutor(workers, mp_context=worker_context()) as pool:
            futures = [
                pool.submit(_write_chunk, str(folder), seed, split, indices, spec)
                for split, indices in jobs
            ]
            for future in futures:
                labels.update(future.result())
    for split, count in split_sizes.items():
        names = [image_name(split, index) for index in range(count)]
        listing = folder / "ImageSets" / "Segmentation" / f"{split}.txt"
        listing.write_text("".join(f"{name}\n" for name in names))
    (folder / "cls_labels.json").write_text(json.dumps(labels, sort_keys=True))


def _replace_folder(staging: Path, destination: Path, wanted: dict[str, Any]) -> None:
    """Move ``staging`` to ``destination``; tolerate a concurrent writer of the same data."""
    retired = None
    if destination.exists():
        retired = destination.parent / f".VOC2012.old-{uuid.uuid4().hex[:8]}"
        try:
            destination.rename(retired)
        except FileNotFoundError:
            retired = None  # another process moved it first
    try:
        staging.rename(destination)
    except OSError:
        if _read_manifest(destination) != wanted:  # someone else wrote different data
            raise
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


class SyntheticTrainDataset(Dataset):
    """On-the-fly synthetic training crops: image ``index`` of the train stream, augmented.

    Image ``index`` is :func:`generate_split_image` ``(seed, "train", index)`` (so indices
    below ``num_train`` are the on-disk train images); the augmentation comes from the
    sample seed of an ``(index, sample_seed)`` item. Samples as
    :class:`~afa.data.datasets.CropTrainDataset`.

    Args:
        seed: benchmark seed.
        length: virtual number of distinct training images.
        crop_size, scale_range, flip_prob, ignore_index: augmentation (AFA.md §9).
        return_mask: also return the crop's ground-truth mask.
        spec: generator parameters (a ``SyntheticSpec`` or a mapping of overrides).
    """

    class_names = SYNTHETIC_CLASSES
    num_classes = NUM_SYNTHETIC_CLASSES

    def __init__(
        self,
        seed: int = 0,
        length: int = 100_000,
        crop_size: int = 192,
        scale_range: Sequence[float] = (0.75, 1.5),
        flip_prob: float = 0.5,
        ignore_index: int = IGNORE_INDEX,
        return_mask: bool = False,
        spec: SyntheticSpec | Mapping[str, Any] | None = None,
    ) -> None:
        self.seed = int(seed)
        self.spec = as_spec(spec)
        self.length = int(length)
        self.augmentation = TrainAugmentation(crop_size, scale_range, flip_prob, ignore_index)
        self.return_mask = bool(return_mask)

    def prepare(self) -> None:
        """Nothing to write: every image is generated when it is loaded."""

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        index, sample_seed = split_item(item)
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} outside the synthetic train set of {self.length}")
        if sample_seed is None:
            sample_seed = int(torch.randint(0, 2**62, ()).item())
        sample = generate_split_image(self.seed, "train", index, self.spec)
        augmented = self.augmentation(
            sample.image, np.random.default_rng(sample_seed), sample.mask if self.return_mask else None
        )
        return {
            "name": image_name("train", index),
            "labels": labels_to_multi_hot(sample.classes, self.num_classes),
            **augmented,
        }


class SyntheticIndex:
    """The on-disk synthetic benchmark's split, as a :class:`~afa.data.layouts.PendingIndex`.

    Give it as ``index`` to :class:`~afa.data.datasets.FullImageEvalDataset` (val/test)
    or :class:`~afa.data.datasets.CropTrainDataset` (the fixed train split); the split
    goes through the VOC code path. Constructing it writes nothing: :meth:`prepare`
    generates the benchmark under ``root`` if its cache is missing or differs (see
    :func:`prepare_synthetic`: idempotent, atomic), and :meth:`resolve` reads it, raising
    a ``RuntimeError`` when it was not prepared. Under torchrun call ``prepare()`` on
    rank 0 only, then a barrier: no rank generates on first use.

    Args:
        root: cache folder.
        split: ``train``, ``val`` or ``test``.
        seed: benchmark seed.
        num_train, num_val, num_test: images per split (all three form the cache).
        with_masks, with_labels: index the masks / image-level labels.
        spec: generator parameters (a ``SyntheticSpec`` or a mapping of overrides).
    """

    class_names = SYNTHETIC_CLASSES

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        seed: int = 0,
        num_train: int = 2000,
        num_val: int = 500,
        num_test: int = 500,
        with_masks: bool = True,
        with_labels: bool = True,
        spec: SyntheticSpec | Mapping[str, Any] | None = None,
    ) -> None:
        self.root, self.split, self.seed = Path(root), split, int(seed)
        self.split_sizes = {"train": int(num_train), "val": int(num_val), "test": int(num_test)}
        self.with_masks, self.with_labels = bool(with_masks), bool(with_labels)
        self.spec = as_spec(spec)
        self.folder = self.root.expanduser() / "VOCdevkit" / "VOC2012"
        self.description = f"synthetic benchmark {self.folder} split {split!r}"

    def prepare(self) -> None:
        """Generate the benchmark unless its cache under ``root`` already matches."""
        prepare_synthetic(self.root, self.seed, *self.split_sizes.values(), spec=self.spec)

    def resolve(self) -> ImageIndex:
        """The split's index from the prepared cache.

        Raises:
            RuntimeError: the cache is missing or was generated with other parameters.
        """
        wanted = _manifest(self.seed, self.split_sizes, self.spec)
        if _read_manifest(self.folder) != wanted:
            raise RuntimeError(
                f"{self.description} is not prepared (no matching {MANIFEST_NAME}): call "
                "dataset.prepare() first (under torchrun on rank 0, then a barrier)"
            )
        return voc_index(
            self.folder, self.split,
            split_file=self.folder / "ImageSets" / "Segmentation" / f"{self.split}.txt",
            labels_file=self.folder / "cls_labels.json", class_names=SYNTHETIC_CLASSES,
            image_ext=".png", with_masks=self.with_masks, with_labels=self.with_labels,
        )


__all__ = [
    "DEFAULT_SPEC", "GENERATOR_VERSION", "SYNTHETIC_CLASSES", "SyntheticImage", "SyntheticIndex",
    "SyntheticSpec", "SyntheticTrainDataset",
    "generate_image", "generate_split_image", "prepare_synthetic",
]

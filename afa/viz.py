"""Pictures for the logger and for eyes: label maps, CAMs, affinities, panels.

Every function returns ``uint8`` arrays in HWC (or BHWC) layout, takes numpy arrays or
torch tensors (on any device), and is vectorised; these run every few hundred
iterations, so they favour clarity over speed. No matplotlib: the jet map is the usual
piecewise-linear formula.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from afa.data.classes import voc_palette

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
TITLE_HEIGHT = 14  # pixels of the band above each panel cell that holds its title

ArrayLike = np.ndarray | torch.Tensor


def _to_numpy(array: ArrayLike) -> np.ndarray:
    """A host numpy view of a tensor or array."""
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def resize_maps(maps: ArrayLike, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly resizes maps over their last two dimensions.

    Args:
        maps: (..., h, w) real values.
        size: Target (H, W).

    Returns:
        (..., H, W) float32.
    """
    maps = torch.as_tensor(_to_numpy(maps), dtype=torch.float32)
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps.numpy()
    leading = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:])  # (N, 1, h, w) for interpolate
    resized = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return resized.reshape(*leading, *size).numpy()


def colorize_labels(labels: ArrayLike, palette: np.ndarray | None = None) -> np.ndarray:
    """Colours a label map with the VOC palette (255, ignore, gets its palette colour).

    Args:
        labels: (H, W) or (B, H, W) integer labels in [0, 255].
        palette: (256, 3) uint8; the VOC palette by default.

    Returns:
        (H, W, 3) or (B, H, W, 3) uint8.
    """
    labels = _to_numpy(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be integers, got dtype {labels.dtype}; pass argmax indices, not scores")
    palette = voc_palette() if palette is None else palette
    if labels.size and (labels.min() < 0 or labels.max() >= len(palette)):
        raise ValueError(
            f"label values must lie in [0, {len(palette)}), got [{labels.min()}, {labels.max()}]"
        )
    return palette[labels]


def denormalize_image(
    image: ArrayLike,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """Undoes ImageNet normalisation of 0–255 RGB images.

    Args:
        image: (3, H, W) or (B, 3, H, W) normalised float images.
        mean: Per-channel mean on the 0–255 scale.
        std: Per-channel std on the 0–255 scale.

    Returns:
        (H, W, 3) or (B, H, W, 3) uint8.
    """
    image = _to_numpy(image).astype(np.float32)
    if image.ndim not in (3, 4) or image.shape[-3] != 3:
        raise ValueError(f"expected (3, H, W) or (B, 3, H, W), got shape {image.shape}")
    pixels = np.moveaxis(image, -3, -1)  # (..., H, W, 3)
    pixels = pixels * np.asarray(std, dtype=np.float32) + np.asarray(mean, dtype=np.float32)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def jet_colormap(values: ArrayLike) -> np.ndarray:
    """Maps values in [0, 1] to jet colours (dark blue → cyan → yellow → dark red).

    Args:
        values: (...) floats; clipped to [0, 1], NaN shown as 0.

    Returns:
        (..., 3) uint8.
    """
    values = np.nan_to_num(np.clip(_to_numpy(values).astype(np.float32), 0.0, 1.0))
    # each channel is a trapezoid centred at 3/4 (red), 1/2 (green), 1/4 (blue)
    centres = np.asarray([0.75, 0.5, 0.25], dtype=np.float32)
    colours = np.clip(1.5 - np.abs(4.0 * values[..., None] - 4.0 * centres), 0.0, 1.0)
    return np.rint(colours * 255).astype(np.uint8)


def blend(image: np.ndarray, overlay: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 - alpha) * image + alpha * overlay`` for uint8 arrays of equal shape."""
    mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * overlay.astype(np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def cam_overlay(image: ArrayLike, cam: ArrayLike, alpha: float = 0.5) -> np.ndarray:
    """Blends a jet-coloured CAM over an image.

    Args:
        image: (H, W, 3) or (B, H, W, 3) uint8.
        cam: (h, w) or (B, h, w) activations in [0, 1]; resized bilinearly to (H, W).
        alpha: Weight of the CAM colours.

    Returns:
        Same shape as ``image``, uint8.
    """
    image = _to_numpy(image)
    cam = _to_numpy(cam)
    if image.dtype != np.uint8 or image.shape[-1] != 3 or cam.ndim != image.ndim - 1:
        raise ValueError(
            f"expected uint8 image (..., H, W, 3) and cam (..., h, w), got image {image.shape} "
            f"{image.dtype} and cam {cam.shape}"
        )
    cam = resize_maps(cam, image.shape[-3:-1])
    return blend(image, jet_colormap(cam), alpha)


def _draw_marker(picture: np.ndarray, row: int, col: int, half: int) -> None:
    """Draws a white square with a black rim centred at (row, col), in place."""
    height, width = picture.shape[:2]
    for radius, colour in ((half + 1, 0), (half, 255)):
        top, bottom = max(row - radius, 0), min(row + radius + 1, height)
        left, right = max(col - radius, 0), min(col + radius + 1, width)
        picture[top:bottom, left:right] = colour


def affinity_map(
    affinity: ArrayLike,
    grid_hw: tuple[int, int],
    points: Sequence[tuple[int, int]],
    image: ArrayLike | None = None,
    size: tuple[int, int] | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """Shows the affinity of a few query points to every grid position, side by side.

    Each query's row of the affinity is reshaped to the grid, min-max scaled to [0, 1],
    upsampled and jet-coloured (over ``image`` when given); the query is marked white.

    Args:
        affinity: (N, N) with N = h * w; row i is query position i (row-major on the grid).
        grid_hw: (h, w) of the token grid.
        points: Query positions as (row, col) on the grid.
        image: Optional (H, W, 3) uint8 to draw under the maps; sets the output size.
        size: Output (H, W) of each map without an image; 16× the grid by default.
        alpha: Weight of the colours over ``image``.

    Returns:
        (H, P * W + gaps, 3) uint8: one map per query point.
    """
    affinity = _to_numpy(affinity).astype(np.float32)
    height, width = grid_hw
    if affinity.shape != (height * width, height * width):
        raise ValueError(f"affinity shape {affinity.shape} does not match grid {grid_hw} (expected (h*w, h*w))")
    points = [(int(row), int(col)) for row, col in points]
    if not points or any(not (0 <= r < height and 0 <= c < width) for r, c in points):
        raise ValueError(f"points {points} must be a non-empty list of (row, col) inside the grid {grid_hw}")
    rows = affinity[[r * width + c for r, c in points]].reshape(len(points), height, width)
    low = rows.min(axis=(1, 2), keepdims=True)
    span = rows.max(axis=(1, 2), keepdims=True) - low
    scaled = np.where(span > 0, (rows - low) / np.where(span > 0, span, 1.0), 0.0)
    if image is not None:
        image = _to_numpy(image)
        size = image.shape[:2]
    size = size or (height * 16, width * 16)
    pictures = jet_colormap(resize_maps(scaled, size))  # (P, H, W, 3)
    if image is not None:
        pictures = blend(np.broadcast_to(image, pictures.shape), pictures, alpha)
    half = max(2, min(size) // 64)
    for picture, (row, col) in zip(pictures, points):
        # grid cell centre in output pixels
        _draw_marker(picture, int((row + 0.5) * size[0] / height), int((col + 0.5) * size[1] / width), half)
    return make_panel(list(pictures), ncols=len(points))


def _as_rgb(image: ArrayLike) -> np.ndarray:
    """(H, W) or (H, W, 3) uint8 → (H, W, 3) uint8."""
    image = _to_numpy(image)
    if image.dtype != np.uint8:
        raise TypeError(f"panel images must be uint8, got {image.dtype}; colorize or denormalize first")
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"panel images must be (H, W) or (H, W, 3), got {image.shape}")
    return image


def make_panel(
    images: Sequence[ArrayLike],
    titles: Sequence[str] | None = None,
    ncols: int | None = None,
    gap: int = 2,
    background: int = 255,
) -> np.ndarray:
    """Arranges images on a grid, each centred in a cell of the largest size.

    Args:
        images: (H, W, 3) or (H, W) uint8 images, possibly of different sizes.
        titles: Optional caption per image, drawn above it with PIL's default font.
        ncols: Images per row; all in one row by default.
        gap: Pixels between cells and around the border.
        background: Grey level of the gaps.

    Returns:
        (rows * (H + title) + gaps, ncols * W + gaps, 3) uint8.
    """
    images = [_as_rgb(image) for image in images]
    if not images:
        raise ValueError("make_panel needs at least one image")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"{len(titles)} titles for {len(images)} images")
    ncols = min(ncols or len(images), len(images))
    nrows = -(-len(images) // ncols)
    cell_h = max(image.shape[0] for image in images)
    cell_w = max(image.shape[1] for image in images)
    band = TITLE_HEIGHT if titles is not None else 0
    panel = np.full(
        (nrows * (cell_h + band + gap) + gap, ncols * (cell_w + gap) + gap, 3), background, dtype=np.uint8
    )
    corners = []
    for index, image in enumerate(images):
        top = gap + (index // ncols) * (cell_h + band + gap)
        left = gap + (index % ncols) * (cell_w + gap)
        corners.append((top, left))
        y = top + band + (cell_h - image.shape[0]) // 2
        x = left + (cell_w - image.shape[1]) // 2
        panel[y : y + image.shape[0], x : x + image.shape[1]] = image
    if titles is not None:
        canvas = Image.fromarray(panel)
        draw = ImageDraw.Draw(canvas)
        font = ImageFont.load_default()
        for (top, left), title in zip(corners, titles):
            draw.text((left + 1, top + 1), str(title), fill=(0, 0, 0), font=font)
        panel = np.asarray(canvas).copy()
    return panel


def overlay_with_legend(
    image: np.ndarray, labels: np.ndarray, class_names: Sequence[str], alpha: float = 0.5
) -> np.ndarray:
    """The image with its label map blended in and, below it, a legend of the classes shown.

    Args:
        image: (H, W, 3) uint8 RGB.
        labels: (H, W) integer labels (255: ignore, not in the legend).
        class_names: K names, background first.

    Returns:
        (H + legend height, W, 3) uint8.
    """
    colours = colorize_labels(labels)
    picture = blend(image, colours, alpha)
    shown = [int(k) for k in np.unique(labels) if k != 255 and k < len(class_names)]
    row, swatch, width = 14, 10, picture.shape[1]
    entries_per_row = max(1, width // 110)
    rows = -(-len(shown) // entries_per_row) if shown else 0
    legend = Image.new("RGB", (width, rows * row + 4 if rows else 0), (255, 255, 255))
    draw = ImageDraw.Draw(legend)
    palette = voc_palette()
    for position, class_index in enumerate(shown):
        left, top = (position % entries_per_row) * 110 + 2, (position // entries_per_row) * row + 2
        draw.rectangle([left, top, left + swatch, top + swatch], fill=tuple(int(c) for c in palette[class_index]))
        draw.text((left + swatch + 3, top - 1), class_names[class_index][:16], fill=(0, 0, 0))
    return np.concatenate([picture, np.asarray(legend)], axis=0) if rows else picture

"""Reading images, masks and their sizes, with errors that name the file and the fix.

Every loader in ``afa.data`` reads pixels through these functions, so mode conversion and
mask validation happen in one place: the same checks run when a sample is loaded and in
``python -m afa.data check``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from afa.data.classes import IGNORE_INDEX, voc_palette

# Modes PIL converts to RGB without losing meaning (alpha is dropped, CMYK and YCbCr are
# converted colorimetrically, palette images are expanded, 1-bit becomes black/white).
_CONVERTIBLE_MODES = {"RGB", "L", "LA", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "1", "La"}
# Mask modes whose pixel values are the class indices themselves.
_INDEX_MASK_MODES = {"P", "L", "I", "I;16", "I;16B", "I;16L"}


class DatasetError(ValueError):
    """A dataset file exists but its content is wrong (corrupt, mismatched, out of range)."""


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to RGB.

    Grayscale, palette, RGBA (alpha dropped), CMYK and YCbCr images are converted to RGB.
    EXIF orientation is deliberately not applied: masks are aligned with the stored pixels.

    Args:
        path: image file.

    Returns:
        (H, W, 3) uint8 RGB array.

    Raises:
        FileNotFoundError: the file does not exist.
        DatasetError: the file cannot be decoded, or its mode has no RGB meaning.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"image {path} not found: check the dataset root and that the split list only "
            "names images that exist (python -m afa.data check lists every missing file)"
        )
    try:
        with Image.open(path) as image:
            image.load()  # decode now so truncated files fail here, not later
            if image.mode not in _CONVERTIBLE_MODES:
                raise DatasetError(
                    f"image {path} has mode {image.mode!r}, which has no RGB meaning: "
                    "convert it to 8-bit RGB (e.g. PIL .convert('RGB') after rescaling)"
                )
            rgb = image.convert("RGB") if image.mode != "RGB" else image
            return np.asarray(rgb, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise DatasetError(
            f"image {path} cannot be decoded ({error}): the file is corrupt or not an "
            "image; re-download or re-export it, or remove it from the split list"
        ) from error


def image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image, read from its header without decoding the pixels."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} not found: check the dataset root")
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError) as error:
        raise DatasetError(f"image {path} cannot be read ({error}): the file is corrupt") from error
    return height, width


def _rgb_mask_to_indices(rgb: np.ndarray, path: Path) -> np.ndarray:
    """Map a colour-coded (VOC palette) RGB mask to class indices; unknown colours are errors."""
    palette = voc_palette(256).astype(np.int64)
    palette_codes = (palette[:, 0] << 16) | (palette[:, 1] << 8) | palette[:, 2]
    order = np.argsort(palette_codes)
    sorted_codes = palette_codes[order]
    pixels = rgb.astype(np.int64)
    codes = (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]
    positions = np.clip(np.searchsorted(sorted_codes, codes), 0, len(sorted_codes) - 1)
    known = sorted_codes[positions] == codes
    if not known.all():
        unknown = np.unique(rgb[~known].reshape(-1, 3), axis=0)[:5].tolist()
        raise DatasetError(
            f"mask {path} is an RGB image with colours outside the VOC palette "
            f"(e.g. {unknown}): save masks as palette ('P') or grayscale ('L') PNGs whose "
            "pixel values are class indices"
        )
    return order[positions].astype(np.uint8)


def read_mask(path: str | Path) -> np.ndarray:
    """Read a segmentation mask as class indices.

    Palette and grayscale PNGs hold indices directly; an RGB mask coloured with the VOC
    palette is mapped back to indices. Values are not range-checked here (see
    :func:`validate_mask`).

    Returns:
        (H, W) uint8 array of class indices (255 = ignore).

    Raises:
        FileNotFoundError: the file does not exist.
        DatasetError: the file cannot be decoded or is not an index mask.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"mask {path} not found: evaluation needs a mask for every image of the split "
            "(for inference without masks build the index with with_masks=False)"
        )
    try:
        with Image.open(path) as mask:
            mask.load()
            mode = mask.mode
            values = np.asarray(mask)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise DatasetError(f"mask {path} cannot be decoded ({error}): the file is corrupt") from error
    if mode in {"RGB", "RGBA"}:
        return _rgb_mask_to_indices(values[..., :3], path)
    if mode not in _INDEX_MASK_MODES:
        raise DatasetError(
            f"mask {path} has mode {mode!r}: save masks as palette ('P') or grayscale ('L') "
            "PNGs whose pixel values are class indices"
        )
    if values.max(initial=0) > 255:
        raise DatasetError(
            f"mask {path} holds values up to {int(values.max())}, above 255: class indices "
            "must fit in 8 bits (255 = ignore)"
        )
    return values.astype(np.uint8)


def validate_mask(
    mask: np.ndarray,
    num_classes: int,
    image_hw: tuple[int, int],
    path: str | Path,
    ignore_index: int = IGNORE_INDEX,
) -> None:
    """Check a mask's size against its image and its values against the class range.

    Args:
        mask: (H, W) class indices.
        num_classes: foreground class count C; valid values are 0..C and ``ignore_index``.
        image_hw: (H, W) of the image the mask belongs to.
        path: the mask file, for the message.
        ignore_index: the ignored value.

    Raises:
        DatasetError: on a size mismatch or an out-of-range value.
    """
    if tuple(mask.shape) != tuple(image_hw):
        raise DatasetError(
            f"mask {path} is {mask.shape[0]}x{mask.shape[1]} (HxW) but its image is "
            f"{image_hw[0]}x{image_hw[1]}: masks must be pixel-aligned with their images; "
            "regenerate the mask or fix the image"
        )
    out_of_range = (mask > num_classes) & (mask != ignore_index)
    if out_of_range.any():
        bad_values = np.unique(mask[out_of_range]).tolist()
        raise DatasetError(
            f"mask {path} holds values {bad_values[:10]} outside the class range 0..{num_classes} "
            f"and {ignore_index} (ignore): check that the dataset's class list matches the "
            "masks (is this a dataset with more classes?)"
        )


def write_index_mask(path: str | Path, mask: np.ndarray) -> None:
    """Save (H, W) uint8 class indices as a VOC-palette PNG (values stay the indices)."""
    image = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8))
    image.putpalette(voc_palette(256).tobytes())  # L + palette → P, pixel values unchanged
    image.save(path, compress_level=1)

"""Plain images for inference: a folder, a list file, or one image; no labels, no masks."""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch
from torch.utils.data import Dataset

from afa.data.readers import DatasetError, image_size, read_image
from afa.data.transforms import normalize_to_tensor

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(source: str | Path) -> list[Path]:
    """The images of a folder (sorted, not recursive), of a text file (one path per line,
    relative to the file's folder), or a single image file.

    Raises:
        DatasetError: nothing exists at ``source``, or it holds no image.
    """
    source = Path(source)
    if source.is_dir():
        paths = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    elif source.is_file() and source.suffix.lower() in IMAGE_SUFFIXES:
        paths = [source]
    elif source.is_file():
        lines = [line.strip() for line in source.read_text().splitlines()]
        paths = [p if (p := Path(line)).is_absolute() else source.parent / p for line in lines if line]
    else:
        raise DatasetError(f"images={source}: no such folder or file; give a folder of images, a list file or an image")
    if not paths:
        raise DatasetError(f"images={source}: no images ({', '.join(IMAGE_SUFFIXES)}) found there")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DatasetError(f"images={source}: {len(missing)} listed images do not exist, e.g. {missing[0]}")
    return paths


class ImageListDataset(Dataset):
    """Samples ``{"name", "image" (3, H, W) normalised}`` of plain images.

    Names are the file stems (made unique with the parent folder when two images share one).

    Args:
        source: a folder, a list file or an image (see :func:`list_images`).
    """

    def __init__(self, source: str | Path) -> None:
        self.paths = list_images(source)
        stems = [p.stem for p in self.paths]
        self.names = [f"{p.parent.name}_{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    @cached_property
    def image_sizes(self) -> list[tuple[int, int]]:
        """(H, W) per image, from the headers (an unreadable image fails here, before any work)."""
        return [image_size(path) for path in self.paths]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        return {"name": self.names[index], "image": normalize_to_tensor(read_image(self.paths[index]))}

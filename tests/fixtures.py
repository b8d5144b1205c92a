"""Tiny on-disk datasets in each layout, for the tests (imported as ``tests.fixtures``).

Every fixture image is painted with the VOC palette colour of the class its mask holds
(background a mid grey), objects as horizontal bands, so an image and its mask can be
checked against each other after any geometric transform.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from afa.data.classes import COCO_CATEGORY_IDS, voc_palette
from afa.data.readers import write_index_mask

BACKGROUND_RGB = (128, 128, 128)


def banded_sample(height: int, width: int, classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """An image and mask with one horizontal band per class, background above and below.

    Returns:
        (H, W, 3) uint8 image, (H, W) uint8 mask.
    """
    mask = np.zeros((height, width), np.uint8)
    bands = np.linspace(height // 8, height - height // 8, len(classes) + 1).astype(int)
    for band, class_index in enumerate(classes):
        mask[bands[band] : bands[band + 1], width // 8 : width - width // 8] = class_index
    colours = voc_palette(256).copy()
    colours[0] = BACKGROUND_RGB
    return colours[mask], mask


def write_voc_fixture(
    root: str | Path,
    samples: dict[str, Sequence[int]],
    splits: dict[str, Sequence[str]] | None = None,
    size: tuple[int, int] = (48, 64),
    mask_folder: str = "SegmentationClass",
    image_ext: str = ".png",
) -> Path:
    """A VOC2012-style folder: images, masks, split lists, ``cls_labels.json``.

    Args:
        root: where ``VOCdevkit/VOC2012`` is created.
        samples: image name → foreground classes (1..C) drawn into it.
        splits: split name → image names, written to ``ImageSets/Segmentation``
            (default: ``{"all": every name}``).
        size: (H, W) of every image.
        mask_folder: ``SegmentationClass`` or ``SegmentationClassAug``.
        image_ext: ``.png`` (lossless, exact colours) or ``.jpg``.

    Returns:
        The VOC2012 folder.
    """
    folder = Path(root) / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", mask_folder, "ImageSets/Segmentation"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for name, classes in samples.items():
        image, mask = banded_sample(*size, classes)
        Image.fromarray(image).save(folder / "JPEGImages" / f"{name}{image_ext}")
        write_index_mask(folder / mask_folder / f"{name}.png", mask)
    for split, names in (splits or {"all": list(samples)}).items():
        (folder / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    labels = {name: sorted(set(classes)) for name, classes in samples.items()}
    (folder / "cls_labels.json").write_text(json.dumps(labels))
    return folder


def write_custom_fixture(
    root: str | Path,
    samples: dict[str, Sequence[str]],
    class_names: Sequence[str],
    labels_format: str = "csv",
    with_masks: bool = True,
    size: tuple[int, int] = (40, 56),
) -> dict[str, Path]:
    """A folder of images with a CSV or JSON labels file (and optional masks).

    Args:
        samples: image file name (with extension) → foreground class names.
        class_names: foreground class names; mask value k = ``class_names[k - 1]``.
        labels_format: ``csv`` or ``json``.

    Returns:
        ``images_dir``, ``labels_file`` and (with masks) ``masks_dir``.
    """
    root = Path(root)
    images_dir, masks_dir = root / "images", root / "masks"
    images_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(exist_ok=True)
    lookup = {name: index + 1 for index, name in enumerate(class_names)}
    for file_name, names in samples.items():
        image, mask = banded_sample(*size, [lookup[name] for name in names])
        Image.fromarray(image).save(images_dir / file_name)
        if with_masks:
            write_index_mask(masks_dir / f"{Path(file_name).stem}.png", mask)
    if labels_format == "csv":
        labels_file = root / "labels.csv"
        with labels_file.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image", "labels"])
            for file_name, names in samples.items():
                writer.writerow([file_name, ";".join(names)])
    else:
        labels_file = root / "labels.json"
        labels_file.write_text(json.dumps({file_name: list(names) for file_name, names in samples.items()}))
    paths = {"images_dir": images_dir, "labels_file": labels_file}
    if with_masks:
        paths["masks_dir"] = masks_dir
    return paths


def write_coco_fixture(root: str | Path, split: str = "val") -> Path:
    """A COCO 2014–style folder with three images and an instances json.

    Image 1 (``…01``, 40×60): a person polygon (rows 5–25, cols 5–35) overlapped by a
    smaller dog polygon (rows 10–20, cols 20–30) listed first, plus a crowd RLE of
    persons (rows 30–39, cols 0–59). Image 2 (``…02``, 30×30): a car as compressed RLE
    (rows 0–14, cols 0–29). Image 3 (``…03``, 20×20): no annotations.

    Returns:
        The COCO root (``annotations/instances_<split>2014.json``, ``<split>2014/*.jpg``).
    """
    from pycocotools import mask as mask_utils

    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / f"{split}2014").mkdir(exist_ok=True)
    person, dog, car = COCO_CATEGORY_IDS[0], COCO_CATEGORY_IDS[16], COCO_CATEGORY_IDS[2]
    images = [
        {"id": 1, "file_name": f"COCO_{split}2014_000000000001.jpg", "height": 40, "width": 60},
        {"id": 2, "file_name": f"COCO_{split}2014_000000000002.jpg", "height": 30, "width": 30},
        {"id": 3, "file_name": f"COCO_{split}2014_000000000003.jpg", "height": 20, "width": 20},
    ]
    for info in images:
        pixels = np.full((info["height"], info["width"], 3), 90, np.uint8)
        Image.fromarray(pixels).save(root / f"{split}2014" / info["file_name"])

    def rectangle(top: int, bottom: int, left: int, right: int) -> list[list[float]]:
        # Pixel-edge polygon covering rows top..bottom-1, cols left..right-1.
        return [[left, top, right, top, right, bottom, left, bottom]]

    crowd = np.zeros((40, 60), np.uint8, order="F")
    crowd[30:40, :] = 1
    crowd_rle = mask_utils.encode(crowd)
    crowd_counts = _uncompressed_counts(crowd)
    car_mask = np.zeros((30, 30), np.uint8, order="F")
    car_mask[0:15, :] = 1
    car_rle = mask_utils.encode(car_mask)
    annotations = [
        {"id": 10, "image_id": 1, "category_id": dog, "segmentation": rectangle(10, 20, 20, 30),
         "area": 100.0, "bbox": [20, 10, 10, 10], "iscrowd": 0},
        {"id": 11, "image_id": 1, "category_id": person, "segmentation": rectangle(5, 25, 5, 35),
         "area": 600.0, "bbox": [5, 5, 30, 20], "iscrowd": 0},
        {"id": 12, "image_id": 1, "category_id": person,
         "segmentation": {"size": [40, 60], "counts": crowd_counts},
         "area": float(mask_utils.area(crowd_rle)), "bbox": [0, 30, 60, 10], "iscrowd": 1},
        {"id": 13, "image_id": 2, "category_id": car,
         "segmentation": {"size": [30, 30], "counts": car_rle["counts"].decode("ascii")},
         "area": float(mask_utils.area(car_rle)), "bbox": [0, 0, 30, 15], "iscrowd": 0},
    ]
    categories = [{"id": category_id, "name": str(category_id)} for category_id in COCO_CATEGORY_IDS]
    instances = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(instances))
    return root


def _uncompressed_counts(binary: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE (column-major run lengths, starting with a run of 0s)."""
    flat = np.asarray(binary, np.uint8).ravel(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    boundaries = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(boundaries).tolist()
    return runs if flat[0] == 0 else [0, *runs]

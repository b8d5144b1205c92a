"""Build VOC-style index masks and image-level labels from COCO 2014 instance annotations.

Output, under ``out`` (the ``MSCOCO`` root the COCO datasets read):

- ``SegmentationClass/<split>/<name>.png``: palette PNG, value k = ``COCO_CLASSES[k]``
  (1..80, official category ids remapped), 0 background, 255 ignore.
- ``JPEGImages/<split>/<name>.jpg``: symbolic links (or copies) of the official images.
- ``cls_labels_<split>.json``: name → sorted class indices 1..80 of every category
  annotated in the image (crowd annotations included).

Choices: overlapping instances are painted largest first, so a smaller object lying on a
larger one stays visible; crowd regions (``iscrowd=1``) not covered by any single
instance become 255 (ignored), since they mix object and background pixels.

Images are processed one at a time (the annotation file itself is loaded whole by
pycocotools), each mask is written to a temporary file and renamed, and existing masks are
skipped, so an interrupted build resumes where it stopped.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

from afa.data.classes import COCO_CATEGORY_IDS, IGNORE_INDEX
from afa.data.readers import DatasetError, write_index_mask

CATEGORY_TO_CLASS = {category_id: index + 1 for index, category_id in enumerate(COCO_CATEGORY_IDS)}


def default_annotation_file(coco_root: str | Path, split: str) -> Path:
    """``<coco_root>/annotations/instances_<split>2014.json``."""
    return Path(coco_root) / "annotations" / f"instances_{split}2014.json"


def rasterize_annotations(coco, annotations: list[dict], height: int, width: int) -> np.ndarray:
    """Index mask of one image.

    Args:
        coco: a ``pycocotools.coco.COCO`` (for ``annToMask``).
        annotations: the image's annotations (polygons, RLE, crowd RLE).
        height, width: image size.

    Returns:
        (H, W) uint8: class index per pixel, 255 on crowd-only pixels.
    """
    mask = np.zeros((height, width), np.uint8)
    crowd = np.zeros((height, width), bool)
    instances = [ann for ann in annotations if not ann.get("iscrowd", 0)]
    with warnings.catch_warnings():
        # pycocotools' decoder trips numpy 2's __array__(copy=...) deprecation; harmless.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="pycocotools")
        for ann in sorted(instances, key=lambda ann: -float(ann.get("area", 0.0))):
            mask[coco.annToMask(ann).astype(bool)] = CATEGORY_TO_CLASS[ann["category_id"]]
        for ann in annotations:
            if ann.get("iscrowd", 0):
                crowd |= coco.annToMask(ann).astype(bool)
    mask[crowd & (mask == 0)] = IGNORE_INDEX
    return mask


def _link_image(source: Path, target: Path, mode: str) -> None:
    if mode == "none" or target.exists() or not source.is_file():
        return
    if mode == "symlink":
        os.symlink(source.resolve(), target)
    else:
        shutil.copyfile(source, target)


def build_coco_split(
    coco_root: str | Path,
    out: str | Path,
    split: str,
    annotation_file: str | Path | None = None,
    images: str = "symlink",
    show_progress: bool = True,
) -> dict[str, int]:
    """Write masks, image links and labels for one COCO 2014 split.

    Args:
        coco_root: folder with ``annotations/`` and ``<split>2014/`` images.
        out: the VOC-style ``MSCOCO`` root to write.
        split: ``train`` or ``val`` (any name works with an explicit ``annotation_file``).
        annotation_file: instances json (default :func:`default_annotation_file`).
        images: ``symlink``, ``copy`` or ``none`` for ``JPEGImages/<split>/``.
        show_progress: show a tqdm bar.

    Returns:
        counts: ``images``, ``written`` (new masks), ``skipped`` (already there),
        ``missing_images`` (image files not found under ``coco_root/<split>2014``).
    """
    from pycocotools.coco import COCO

    annotation_path = Path(annotation_file) if annotation_file else default_annotation_file(coco_root, split)
    if not annotation_path.is_file():
        raise FileNotFoundError(
            f"COCO annotation file {annotation_path} not found: pass --coco-root holding "
            f"annotations/instances_{split}2014.json, or --annotations <file>"
        )
    if images not in {"symlink", "copy", "none"}:
        raise ValueError(f"images must be symlink, copy or none, got {images!r}")
    coco = COCO(str(annotation_path))
    unknown = {ann["category_id"] for ann in coco.dataset.get("annotations", [])} - set(CATEGORY_TO_CLASS)
    if unknown:
        raise DatasetError(
            f"{annotation_path} uses category ids {sorted(unknown)} outside COCO's 80 "
            "(afa.data.classes.COCO_CATEGORY_IDS): is this a COCO instances file?"
        )
    out = Path(out)
    mask_dir = out / "SegmentationClass" / split
    image_dir = out / "JPEGImages" / split
    mask_dir.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    source_dir = Path(coco_root) / f"{split}2014"

    labels: dict[str, list[int]] = {}
    counts = {"images": 0, "written": 0, "skipped": 0, "missing_images": 0}
    for image_id in tqdm(sorted(coco.getImgIds()), desc=f"coco {split}", disable=not show_progress):
        info = coco.imgs[image_id]
        name = Path(info["file_name"]).stem
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=None))
        labels[name] = sorted({CATEGORY_TO_CLASS[ann["category_id"]] for ann in annotations})
        counts["images"] += 1
        source = source_dir / info["file_name"]
        counts["missing_images"] += int(images != "none" and not source.is_file())
        _link_image(source, image_dir / info["file_name"], images)
        mask_path = mask_dir / f"{name}.png"
        if mask_path.is_file():
            counts["skipped"] += 1
            continue
        mask = rasterize_annotations(coco, annotations, int(info["height"]), int(info["width"]))
        partial = mask_path.with_name(f".{name}.partial.png")
        write_index_mask(partial, mask)
        os.replace(partial, mask_path)  # a killed build never leaves a truncated mask behind
        counts["written"] += 1

    labels_path = out / f"cls_labels_{split}.json"
    partial_labels = labels_path.with_name(f".{labels_path.name}.partial")
    partial_labels.write_text(json.dumps(labels, sort_keys=True))
    os.replace(partial_labels, labels_path)
    return counts

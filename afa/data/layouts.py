"""Where a dataset's files are: split lists, image-level label files and per-layout paths.

Each layout (VOC, COCO, custom folder) resolves to an :class:`ImageIndex`: the image names
of a split, their image and mask paths, and their image-level labels. Problems that make
the whole dataset unusable (missing root, split list or label file, unknown class names,
images without labels) are raised here, at construction time, with the path and the fix.
Per-file problems (a missing or corrupt image, a bad mask) are raised when a sample is
loaded, and collected by ``python -m afa.data check``.
"""
from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Protocol

from afa.data.classes import COCO_CLASSES, VOC_CLASSES
from afa.data.readers import DatasetError

VOC_STANDARD_SPLITS = ("train_aug", "train", "val", "test", "trainval")
COCO_STANDARD_SPLITS = ("train", "val")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageIndex:
    """The files and labels of one split.

    Attributes:
        names: image names (file stems), in split order.
        image_paths: one image file per name.
        mask_paths: one mask file per name, or None when the split is used without masks.
        labels: foreground class indices (1..C) per name, or None when labels are unknown.
        class_names: K = C + 1 names, background first.
        description: where the index came from, for messages.
    """

    names: tuple[str, ...]
    image_paths: tuple[Path, ...]
    mask_paths: tuple[Path, ...] | None
    labels: tuple[tuple[int, ...], ...] | None
    class_names: tuple[str, ...]
    description: str


class PendingIndex(Protocol):
    """An index whose files are written by a preparation step (the synthetic benchmark).

    ``prepare()`` writes the files (idempotent, safe to repeat); ``resolve()`` reads them
    and returns the :class:`ImageIndex`, and raises when they were not prepared. The
    class list is known before either.
    """

    class_names: tuple[str, ...]
    description: str

    def prepare(self) -> None: ...

    def resolve(self) -> ImageIndex: ...


def packaged_split_dir(dataset: str) -> Path:
    """Folder of the split lists shipped with the package (``afa/data/splits/<dataset>``)."""
    return Path(str(resources.files("afa.data") / "splits" / dataset))


def _parse_name(token: str) -> str:
    """A list entry's image name: accepts ``name``, ``name.jpg`` and ``/JPEGImages/name.jpg``."""
    if "/" in token or Path(token).suffix.lower() in IMAGE_EXTENSIONS:
        return Path(token).stem
    return token


def read_split_file(path: str | Path) -> tuple[str, ...]:
    """Read a split list: one image per line, first whitespace-separated field.

    Blank lines and lines starting with ``#`` are skipped; ``name 1`` (VOC's
    ImageSets/Main style) and path-like entries are accepted.

    Raises:
        FileNotFoundError: the list does not exist.
        DatasetError: the list is empty or names an image twice.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split list {path} not found")
    names = []
    for line in path.read_text().splitlines():
        fields = line.split()
        if fields and not fields[0].startswith("#"):
            names.append(_parse_name(fields[0]))
    if not names:
        raise DatasetError(f"split list {path} names no image: fill it, one image name per line")
    duplicates = [name for name, count in Counter(names).items() if count > 1]
    if duplicates:
        raise DatasetError(
            f"split list {path} names {len(duplicates)} image(s) more than once "
            f"(e.g. {duplicates[:3]}): remove the repeated lines"
        )
    return tuple(names)


def resolve_split_file(
    split: str,
    split_file: str | Path | None,
    standard_splits: Sequence[str],
    packaged_dir: Path,
    local_dir: Path,
) -> Path:
    """Pick the list file for a split: explicit file > packaged standard list > local list."""
    if split_file is not None:
        path = Path(split_file)
        if not path.is_file():
            raise FileNotFoundError(f"split_file {path} not found: pass an existing list file")
        return path
    if split in standard_splits:
        return packaged_dir / f"{split}.txt"
    path = local_dir / f"{split}.txt"
    if not path.is_file():
        available = sorted(p.stem for p in local_dir.glob("*.txt")) if local_dir.is_dir() else []
        raise FileNotFoundError(
            f"split {split!r} is not a standard split {tuple(standard_splits)} and {path} "
            f"does not exist (lists found there: {available or 'none'}): pick one of those, "
            "or pass split_file=<path to a list of image names>"
        )
    return path


def _class_lookup(class_names: Sequence[str]) -> dict[str, int]:
    """Name → index (1..C) for foreground classes, case-insensitive."""
    return {name.lower(): index for index, name in enumerate(class_names) if index > 0}


def _to_class_indices(
    entries: Sequence[object], class_names: Sequence[str], where: str
) -> tuple[int, ...]:
    """Convert a label entry (class names or indices 1..C) to sorted unique indices."""
    lookup = _class_lookup(class_names)
    num_classes = len(class_names) - 1
    indices = set()
    for entry in entries:
        if isinstance(entry, bool):
            raise DatasetError(f"{where}: label {entry!r} is not a class name or index")
        if isinstance(entry, int):
            if not 1 <= entry <= num_classes:
                raise DatasetError(
                    f"{where}: class index {entry} is outside 1..{num_classes} "
                    "(0 is background and is never an image label)"
                )
            indices.add(entry)
            continue
        name = str(entry).strip()
        if not name:
            continue
        if name.lower() not in lookup:
            raise DatasetError(
                f"{where}: unknown class {name!r}; known classes: {list(class_names[1:])}. "
                "Fix the label or add the class to class_names"
            )
        indices.add(lookup[name.lower()])
    return tuple(sorted(indices))


def load_labels_file(path: str | Path, class_names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Read image-level labels.

    Formats: JSON ``{image: [class names or indices 1..C]}``, or CSV with rows
    ``image,class1;class2`` (an optional header row starting with ``image`` is skipped).
    Image keys may carry an extension; they are reduced to the file stem.

    Returns:
        name → sorted foreground class indices (1..C).

    Raises:
        FileNotFoundError: the file does not exist.
        DatasetError: malformed file, unknown class name or index out of range.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file {path} not found: pass labels_file=<existing file>")
    if path.suffix.lower() == ".json":
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise DatasetError(f"labels file {path} is not valid JSON ({error})") from error
        if not isinstance(raw, dict):
            raise DatasetError(f"labels file {path} must hold a JSON object {{image: [classes]}}")
        labels = {}
        for key, entries in raw.items():
            if not isinstance(entries, list):
                raise DatasetError(f"labels file {path}, image {key!r}: expected a list of classes")
            labels[_parse_name(key)] = _to_class_indices(entries, class_names, f"{path}, image {key!r}")
        return labels
    labels = {}
    with path.open(newline="") as handle:
        for line_number, row in enumerate(csv.reader(handle), start=1):
            if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
                continue
            if line_number == 1 and row[0].strip().lower() in {"image", "name", "filename"}:
                continue  # header
            if len(row) > 2:
                raise DatasetError(
                    f"labels file {path}, line {line_number}: expected 'image,class1;class2' "
                    f"(classes separated by ';'), got {len(row)} fields"
                )
            classes = row[1].split(";") if len(row) == 2 else []
            where = f"{path}, line {line_number} (image {row[0].strip()!r})"
            labels[_parse_name(row[0].strip())] = _to_class_indices(classes, class_names, where)
    return labels


def select_labels(
    names: Sequence[str],
    labels: dict[str, tuple[int, ...]],
    labels_path: Path,
    allow_background_only: bool,
) -> tuple[tuple[int, ...], ...]:
    """Labels of the split's images, in order; errors on images without (foreground) labels."""
    missing = [name for name in names if name not in labels]
    if missing:
        raise DatasetError(
            f"{len(missing)} of {len(names)} images have no entry in labels file {labels_path} "
            f"(e.g. {missing[:3]}): add them, pass the right labels_file, or, for inference "
            "on an unlabelled split, build the eval index with with_labels=False"
        )
    selected = tuple(labels[name] for name in names)
    if not allow_background_only:
        empty = [name for name, classes in zip(names, selected) if not classes]
        if empty:
            raise DatasetError(
                f"{len(empty)} images have no foreground class in {labels_path} (e.g. "
                f"{empty[:3]}): weak supervision needs at least one class per image; fix "
                "their labels, drop them from the split, or pass allow_background_only=True"
            )
    return selected


def _require_dir(path: Path, what: str, fix: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} {path} not found: {fix}")


def voc_index(
    root: str | Path,
    split: str,
    split_file: str | Path | None = None,
    labels_file: str | Path | None = None,
    class_names: Sequence[str] | None = None,
    image_ext: str = ".jpg",
    mask_dir: str | Path | None = None,
    with_masks: bool = False,
    with_labels: bool = True,
    allow_background_only: bool = False,
) -> ImageIndex:
    """Resolve a PASCAL VOC–style split (``root`` = the folder holding JPEGImages/).

    Split lists: the packaged standard lists for train_aug/train/val/test/trainval,
    otherwise ``root/ImageSets/Segmentation/<split>.txt``, or ``split_file``. Labels: the
    packaged standard labels (from the XML annotations) unless ``labels_file`` is given.
    Masks: ``mask_dir``, else ``SegmentationClassAug/``, else ``SegmentationClass/``.
    """
    root = Path(root).expanduser()
    class_names = tuple(class_names) if class_names is not None else VOC_CLASSES
    _require_dir(
        root, "VOC root",
        "set dataset.root to the folder holding JPEGImages/ and SegmentationClass(Aug)/ "
        "(e.g. .../VOCdevkit/VOC2012)",
    )
    _require_dir(root / "JPEGImages", "image folder", "the VOC root must hold JPEGImages/")
    split_path = resolve_split_file(
        split, split_file, VOC_STANDARD_SPLITS, packaged_split_dir("voc"),
        root / "ImageSets" / "Segmentation",
    )
    names = read_split_file(split_path)
    labels = None
    if with_labels:
        labels_path = Path(labels_file) if labels_file else packaged_split_dir("voc") / "cls_labels.json"
        labels = select_labels(
            names, load_labels_file(labels_path, class_names), labels_path, allow_background_only
        )
    mask_paths = None
    if with_masks:
        if mask_dir is not None:
            masks = Path(mask_dir)
        else:
            masks = next(
                (root / name for name in ("SegmentationClassAug", "SegmentationClass")
                 if (root / name).is_dir()),
                root / "SegmentationClass",
            )
        _require_dir(
            masks, "mask folder",
            f"evaluation on split {split!r} needs masks under {root}/SegmentationClassAug or "
            "SegmentationClass (or pass mask_dir); for inference without masks use with_masks=False",
        )
        mask_paths = tuple(masks / f"{name}.png" for name in names)
    return ImageIndex(
        names=names,
        image_paths=tuple(root / "JPEGImages" / f"{name}{image_ext}" for name in names),
        mask_paths=mask_paths,
        labels=labels,
        class_names=class_names,
        description=f"VOC {root} split {split!r} ({split_path})",
    )


def coco_index(
    root: str | Path,
    split: str,
    split_file: str | Path | None = None,
    labels_file: str | Path | None = None,
    subset: str | None = None,
    image_ext: str = ".jpg",
    with_masks: bool = False,
    with_labels: bool = True,
    allow_background_only: bool = False,
) -> ImageIndex:
    """Resolve an MS COCO 2014 split in the VOC-style layout.

    Layout under ``root`` (e.g. ``.../MSCOCO``): ``JPEGImages/<subset>/<name>.jpg``,
    ``SegmentationClass/<subset>/<name>.png``, labels ``cls_labels_<subset>.json`` (as
    written by ``python -m afa.data build-coco``). ``subset`` defaults to the split name.
    """
    root = Path(root).expanduser()
    subset = subset or split
    _require_dir(
        root, "COCO root",
        "set dataset.root to the folder holding JPEGImages/{train,val} and "
        "SegmentationClass/{train,val} (build them with python -m afa.data build-coco)",
    )
    images = root / "JPEGImages" / subset
    _require_dir(images, "COCO image folder", f"put the {subset}2014 images there (build-coco links them)")
    split_path = resolve_split_file(
        split, split_file, COCO_STANDARD_SPLITS, packaged_split_dir("coco"),
        root / "ImageSets",
    )
    names = read_split_file(split_path)
    labels = None
    if with_labels:
        labels_path = Path(labels_file) if labels_file else root / f"cls_labels_{subset}.json"
        if not labels_path.is_file():
            raise FileNotFoundError(
                f"COCO labels file {labels_path} not found: build it with python -m afa.data "
                f"build-coco --coco-root <coco> --out {root} --split {subset}, or pass labels_file"
            )
        labels = select_labels(
            names, load_labels_file(labels_path, COCO_CLASSES), labels_path, allow_background_only
        )
    mask_paths = None
    if with_masks:
        masks = root / "SegmentationClass" / subset
        _require_dir(masks, "COCO mask folder", "build the masks with python -m afa.data build-coco")
        mask_paths = tuple(masks / f"{name}.png" for name in names)
    return ImageIndex(
        names=names,
        image_paths=tuple(images / f"{name}{image_ext}" for name in names),
        mask_paths=mask_paths,
        labels=labels,
        class_names=COCO_CLASSES,
        description=f"COCO {root} split {split!r} ({split_path})",
    )


def _images_by_stem(images_dir: Path) -> dict[str, Path]:
    """Map file stem → image file for a folder (one directory scan)."""
    found: dict[str, Path] = {}
    with os.scandir(images_dir) as entries:
        for entry in entries:
            suffix = os.path.splitext(entry.name)[1].lower()
            if suffix in IMAGE_EXTENSIONS and entry.is_file():
                stem = os.path.splitext(entry.name)[0]
                if stem in found:
                    raise DatasetError(
                        f"two images in {images_dir} share the name {stem!r} "
                        f"({found[stem].name}, {entry.name}): rename one"
                    )
                found[stem] = Path(entry.path)
    return found


def with_background(class_names: Sequence[str]) -> tuple[str, ...]:
    """Class list with background first: prepends it unless already there."""
    names = tuple(str(name) for name in class_names)
    if not names:
        raise ValueError("class_names is empty: list the foreground classes")
    return names if names[0].lower() == "background" else ("background", *names)


def custom_index(
    images_dir: str | Path,
    labels_file: str | Path,
    class_names: Sequence[str],
    masks_dir: str | Path | None = None,
    split_file: str | Path | None = None,
    with_masks: bool | None = None,
    allow_background_only: bool = False,
) -> ImageIndex:
    """Resolve a custom folder of images with a labels file.

    Args:
        images_dir: folder of images (any of :data:`IMAGE_EXTENSIONS`).
        labels_file: CSV (``image,class1;class2``) or JSON (``{image: [names]}``); its
            images, in file order, are the dataset unless ``split_file`` selects some.
        class_names: foreground class names (background is prepended if absent); mask
            value k means ``class_names[k - 1]``.
        masks_dir: folder of ``<image stem>.png`` index masks (needed for evaluation).
        split_file: optional list of image names restricting the dataset.
        with_masks: index the masks (default: when ``masks_dir`` is given).
    """
    if with_masks is None:
        with_masks = masks_dir is not None
    images_dir = Path(images_dir).expanduser()
    class_names = with_background(class_names)
    _require_dir(images_dir, "images_dir", "pass the folder holding the images")
    labels_path = Path(labels_file)
    labels = load_labels_file(labels_path, class_names)
    names = read_split_file(split_file) if split_file is not None else tuple(labels)
    if not names:
        raise DatasetError(f"labels file {labels_path} lists no image")
    selected = select_labels(names, labels, labels_path, allow_background_only)
    files = _images_by_stem(images_dir)
    missing = [name for name in names if name not in files]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} images named in {labels_path} are not in {images_dir} "
            f"(e.g. {missing[:3]}): add the files or remove those entries"
        )
    mask_paths = None
    if with_masks:
        if masks_dir is None:
            raise ValueError(
                "evaluation with masks needs masks_dir; pass masks_dir=<folder of <image>.png "
                "masks> or with_masks=False for inference"
            )
        masks = Path(masks_dir).expanduser()
        _require_dir(masks, "masks_dir", "pass the folder holding <image>.png masks")
        mask_paths = tuple(masks / f"{name}.png" for name in names)
    return ImageIndex(
        names=names,
        image_paths=tuple(files[name] for name in names),
        mask_paths=mask_paths,
        labels=selected,
        class_names=class_names,
        description=f"custom {images_dir} with labels {labels_path}",
    )

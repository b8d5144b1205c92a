"""Command line: ``python -m afa.data {check,build-coco,synthetic} ...``.

- ``check --layout {voc,coco,custom,synthetic} --root R [--split S] [--labels-file F]
  [--unlabelled]``: load every image and mask of a split, print which labels file was
  used, per-class counts and problems; exit 1 on problems, 2 when the dataset cannot even
  be opened. Without ``--labels-file`` the layout's usual labels are used (VOC: the
  packaged standard labels; COCO: ``<root>/cls_labels_<subset>.json``) and, where those
  lack the split's images, ``<root>/cls_labels.json`` when it exists. ``--unlabelled``
  checks images (and masks) of a split that has no image-level labels.
- ``build-coco --coco-root C --out O --split {train,val}``: VOC-style masks and labels
  from the official instances json (resumable).
- ``synthetic --root R [--seed N]``: pre-generate the synthetic benchmark.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from afa.data.check import check_dataset
from afa.data.coco_masks import build_coco_split
from afa.data.classes import VOC_CLASSES
from afa.data.datasets import FullImageEvalDataset
from afa.data.layouts import (
    VOC_STANDARD_SPLITS,
    coco_index,
    custom_index,
    load_labels_file,
    packaged_split_dir,
    read_split_file,
    resolve_split_file,
    voc_index,
)
from afa.data.readers import DatasetError
from afa.data.synthetic import MANIFEST_NAME, SYNTHETIC_CLASSES, prepare_synthetic


def _class_names(value: str) -> list[str]:
    """Comma-separated names, or a file with one name per line."""
    path = Path(value)
    if path.is_file():
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [name.strip() for name in value.split(",") if name.strip()]


def _synthetic_folder(root: Path) -> Path:
    """Accept the cache root given to prepare_synthetic or its VOC2012 folder."""
    for folder in (root / "VOCdevkit" / "VOC2012", root):
        if (folder / MANIFEST_NAME).is_file():
            return folder
    raise FileNotFoundError(
        f"no synthetic benchmark under {root} (no {MANIFEST_NAME}): generate it with "
        f"python -m afa.data synthetic --root {root}"
    )


ROOT_LABELS_NAME = "cls_labels.json"

# Python-only advice in the library's error messages, and what to type on this command line.
_CLI_ADVICE = (
    ("build the eval index with with_labels=False", "pass --unlabelled"),
    ("with_labels=False", "--unlabelled"),
    ("pass the right labels_file", "pass the right --labels-file"),
    ("or pass labels_file", "or pass --labels-file"),
    ("pass labels_file=<existing file>", "pass --labels-file <existing file>"),
    ("pass split_file=<path to a list of image names>", "pass --split-file <list of image names>"),
    ("(or pass mask_dir)", "(or pass --mask-dir)"),
)


def _cli_advice(message: str) -> str:
    """Rewrite the library's Python-argument advice into this command's flags."""
    for python_advice, flag_advice in _CLI_ADVICE:
        message = message.replace(python_advice, flag_advice)
    return message


def _voc_labels_file(args: argparse.Namespace, root: Path) -> tuple[Path, str]:
    """Labels file for ``--layout voc`` without ``--labels-file``, and why it was picked.

    The layout's own default is the packaged standard labels (VOC 2012 XML annotations);
    when they lack some of the split's images and ``<root>/cls_labels.json`` exists (as in
    a sample or a re-labelled copy of VOC), that file is used instead.
    """
    packaged = packaged_split_dir("voc") / ROOT_LABELS_NAME
    local = root / ROOT_LABELS_NAME
    if not local.is_file():
        return packaged, "the packaged standard VOC labels"
    try:
        split = args.split or "val"
        names = read_split_file(resolve_split_file(
            split, args.split_file, VOC_STANDARD_SPLITS, packaged_split_dir("voc"),
            root / "ImageSets" / "Segmentation",
        ))
        known = load_labels_file(packaged, VOC_CLASSES)
    except (FileNotFoundError, DatasetError, ValueError):
        # The dataset itself reports an unusable split list with its own message.
        return local, "found in the dataset root"
    missing = sum(name not in known for name in names)
    if not missing:
        return packaged, "the packaged standard VOC labels cover this split"
    return local, (
        f"found in the dataset root; the packaged standard VOC labels lack {missing} of "
        f"{len(names)} images of this split"
    )


def _coco_labels_file(root: Path, subset: str) -> tuple[Path, str]:
    """Labels file for ``--layout coco`` without ``--labels-file``, and why it was picked."""
    expected = root / f"cls_labels_{subset}.json"
    local = root / ROOT_LABELS_NAME
    if not expected.is_file() and local.is_file():
        return local, f"found in the dataset root; {expected.name} is absent"
    return expected, "the layout's default"


def _open_dataset(args: argparse.Namespace) -> tuple[FullImageEvalDataset, str]:
    """The dataset to check, and a line saying which labels it uses."""
    root = Path(args.root).expanduser()
    common = {"allow_background_only": True}
    with_labels = not args.unlabelled
    if args.labels_file:
        labels_file, why = Path(args.labels_file), "--labels-file"
    else:
        labels_file, why = None, ""
    if args.layout == "voc":
        has_masks = args.mask_dir is not None or any(
            (root / name).is_dir() for name in ("SegmentationClassAug", "SegmentationClass")
        )
        if labels_file is None and with_labels and root.is_dir():
            labels_file, why = _voc_labels_file(args, root)
        index = voc_index(
            root, split=args.split or "val", split_file=args.split_file, labels_file=labels_file,
            image_ext=args.image_ext or ".jpg", mask_dir=args.mask_dir, with_masks=has_masks,
            with_labels=with_labels, **common,
        )
    elif args.layout == "synthetic":
        folder = _synthetic_folder(root)
        split = args.split or "val"
        if labels_file is None:
            labels_file, why = folder / ROOT_LABELS_NAME, "the synthetic benchmark's labels"
        index = voc_index(
            folder, split=split, split_file=folder / "ImageSets" / "Segmentation" / f"{split}.txt",
            labels_file=labels_file, class_names=SYNTHETIC_CLASSES, image_ext=".png",
            with_masks=True, with_labels=with_labels, **common,
        )
    elif args.layout == "coco":
        split = args.split or "val"
        subset = args.subset or split
        has_masks = (root / "SegmentationClass" / subset).is_dir()
        if labels_file is None and with_labels:
            labels_file, why = _coco_labels_file(root, subset)
        index = coco_index(
            root, split=split, split_file=args.split_file, labels_file=labels_file, subset=subset,
            image_ext=args.image_ext or ".jpg", with_masks=has_masks, with_labels=with_labels,
            **common,
        )
    else:
        if args.unlabelled:
            raise ValueError(
                "--unlabelled does not apply to --layout custom, whose images are those its "
                "--labels-file lists: pass --labels-file and --class-names instead"
            )
        if not args.labels_file or not args.class_names:
            raise ValueError("--layout custom needs --labels-file and --class-names")
        index = custom_index(
            root, labels_file=args.labels_file, class_names=_class_names(args.class_names),
            split_file=args.split_file, masks_dir=args.mask_dir, **common,
        )
    dataset = FullImageEvalDataset(index)
    if not with_labels:
        return dataset, "labels file: none (--unlabelled: images and masks only)"
    return dataset, f"labels file: {labels_file} ({why})"


def _check(args: argparse.Namespace) -> int:
    try:
        dataset, labels_line = _open_dataset(args)
    except (FileNotFoundError, DatasetError, ValueError) as error:
        print(f"cannot open the dataset: {_cli_advice(str(error))}")
        return 2
    print(labels_line)
    report = check_dataset(dataset, show_progress=not args.no_progress)
    print(report.format())
    return 0 if report.ok else 1


def _build_coco(args: argparse.Namespace) -> int:
    counts = build_coco_split(
        args.coco_root, args.out, args.split, args.annotations, args.images,
        show_progress=not args.no_progress,
    )
    print(
        f"{counts['images']} images: {counts['written']} masks written, {counts['skipped']} "
        f"already there; {counts['missing_images']} image files not found; labels in "
        f"{Path(args.out) / f'cls_labels_{args.split}.json'}"
    )
    return 0


def _synthetic(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    folder = prepare_synthetic(
        args.root, seed=args.seed, num_train=args.num_train, num_val=args.num_val,
        num_test=args.num_test, workers=args.workers,
    )
    print(f"synthetic benchmark ready in {folder} ({time.perf_counter() - start:.1f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m afa.data", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check", help="validate a dataset and print per-class counts")
    check.add_argument("--layout", choices=["voc", "coco", "custom", "synthetic"], required=True)
    check.add_argument(
        "--root", required=True,
        help="VOC2012 folder, MSCOCO folder, images folder (custom) or synthetic cache folder",
    )
    check.add_argument("--split", help="split name (default val)")
    check.add_argument("--split-file", help="explicit list of image names")
    check.add_argument(
        "--labels-file",
        help="image-level labels (JSON or CSV); default: the layout's usual labels, or "
        "<root>/cls_labels.json where those lack the split's images",
    )
    check.add_argument(
        "--unlabelled", action="store_true",
        help="voc/coco/synthetic: the split has no image-level labels; check images and masks only",
    )
    check.add_argument("--class-names", help="custom: comma-separated foreground names, or a file of names")
    check.add_argument("--mask-dir", help="VOC: mask folder override; custom: folder of <image>.png masks")
    check.add_argument("--image-ext", help="image file extension (default .jpg)")
    check.add_argument("--subset", help="COCO: image/mask subfolder (default: the split)")
    check.add_argument("--no-progress", action="store_true")
    check.set_defaults(run=_check)

    coco = commands.add_parser("build-coco", help="COCO 2014 instances json → VOC-style masks and labels")
    coco.add_argument("--coco-root", required=True, help="folder with annotations/ and <split>2014/")
    coco.add_argument("--out", required=True, help="the MSCOCO folder to write")
    coco.add_argument("--split", required=True, help="train or val")
    coco.add_argument(
        "--annotations", help="instances json (default <coco-root>/annotations/instances_<split>2014.json)"
    )
    coco.add_argument("--images", choices=["symlink", "copy", "none"], default="symlink")
    coco.add_argument("--no-progress", action="store_true")
    coco.set_defaults(run=_build_coco)

    synthetic = commands.add_parser("synthetic", help="pre-generate the synthetic benchmark")
    synthetic.add_argument(
        "--root", required=True, help="cache folder (the VOC layout goes to <root>/VOCdevkit/VOC2012)"
    )
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument("--num-train", type=int, default=2000)
    synthetic.add_argument("--num-val", type=int, default=500)
    synthetic.add_argument("--num-test", type=int, default=500)
    synthetic.add_argument("--workers", type=int, default=None)
    synthetic.set_defaults(run=_synthetic)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

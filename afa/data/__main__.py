"""Command line: ``python -m afa.data {check,build-coco,synthetic} ...``.

- ``check --layout {voc,coco,custom,synthetic} --root R [--split S]``: load every image
  and mask of a split, print per-class counts and problems; exit 1 on problems, 2 when
  the dataset cannot even be opened.
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
from afa.data.datasets import COCOEvalDataset, CustomEvalDataset, FullImageEvalDataset, VOCEvalDataset
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


def _open_dataset(args: argparse.Namespace) -> FullImageEvalDataset:
    root = Path(args.root)
    common = {"allow_background_only": True}
    if args.layout == "voc":
        has_masks = args.mask_dir is not None or any(
            (root / name).is_dir() for name in ("SegmentationClassAug", "SegmentationClass")
        )
        return VOCEvalDataset(
            root, split=args.split or "val", split_file=args.split_file, labels_file=args.labels_file,
            image_ext=args.image_ext or ".jpg", mask_dir=args.mask_dir, with_masks=has_masks,
            **common,
        )
    if args.layout == "synthetic":
        folder = _synthetic_folder(root)
        split = args.split or "val"
        return VOCEvalDataset(
            folder, split=split, split_file=folder / "ImageSets" / "Segmentation" / f"{split}.txt",
            labels_file=folder / "cls_labels.json", class_names=SYNTHETIC_CLASSES, image_ext=".png",
            **common,
        )
    if args.layout == "coco":
        split = args.split or "val"
        subset = args.subset or split
        has_masks = (root / "SegmentationClass" / subset).is_dir()
        return COCOEvalDataset(
            root, split=split, split_file=args.split_file, labels_file=args.labels_file, subset=subset,
            image_ext=args.image_ext or ".jpg", with_masks=has_masks, **common,
        )
    if not args.labels_file or not args.class_names:
        raise ValueError("--layout custom needs --labels-file and --class-names")
    return CustomEvalDataset(
        root, labels_file=args.labels_file, class_names=_class_names(args.class_names),
        split_file=args.split_file, masks_dir=args.mask_dir, **common,
    )


def _check(args: argparse.Namespace) -> int:
    try:
        dataset = _open_dataset(args)
    except (FileNotFoundError, DatasetError, ValueError) as error:
        print(f"cannot open the dataset: {error}")
        return 2
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
    check.add_argument("--labels-file", help="image-level labels (JSON or CSV)")
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

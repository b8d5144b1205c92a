"""Images per second of `eval.py`'s test-protocol presets on real-size photos, and what they
mean for the VOC val split (1,449 images) and COCO val (40,137).

    python benchmarks/eval_speed.py                       # MiT-B1, the VOC photos of ../shared/data/voc-sample
    python benchmarks/eval_speed.py --max-images 200 --device cuda --presets ss ms ms_crf

Speed does not depend on the weights, and no trained VOC checkpoint exists here: the network
of ``experiment=afa_voc`` (``--model``) gets seeded random weights and is written as a
checkpoint that ``evaluate()`` (what `python eval.py` runs) reads like any other. mIoU is
therefore not reported. The clock runs from the first batch request to the last result
(loader start-up and the CRF workers included). The table goes to stdout and, with the
environment, to ``--out`` as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from afa.engine.builders import build_network  # noqa: E402
from afa.engine.evaluate import evaluate  # noqa: E402

SPLITS = {"VOC val": 1449, "COCO val": 40137}
DEFAULT_ROOT = REPO.parent / "shared" / "data" / "voc-sample" / "VOCdevkit" / "VOC2012"


def compose_config(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def write_checkpoint(path: Path, root: Path, split_file: Path, labels_file: Path, model: str) -> None:
    """A seeded random network of the VOC preset, stored with its config as the trainer does."""
    cfg = compose_config("config", [
        "experiment=afa_voc", f"model={model}", "model.pretrained=null", f"dataset.root={root}",
        f"+dataset.val.index.split_file={split_file}", f"+dataset.val.index.labels_file={labels_file}", "logger=none",
    ])
    torch.manual_seed(0)
    network = build_network(cfg.model, 20)
    torch.save({"model": network.state_dict(), "config_source": OmegaConf.to_container(cfg, resolve=False)}, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="a VOC-layout folder (JPEGImages/, masks)")
    parser.add_argument("--split-file", type=Path, help="image list (default: <root>/ImageSets/Segmentation/all.txt)")
    parser.add_argument("--labels-file", type=Path, help="image labels (default: <root>/cls_labels.json)")
    parser.add_argument("--model", default="mit_b1")
    parser.add_argument("--presets", nargs="+", default=["ss", "ms", "ms_crf"])
    parser.add_argument("--max-images", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "eval_speed.json")
    args = parser.parse_args()
    rows = measure_presets(args.root, args.model, args.presets, args.max_images, args.batch_size, args.device,
                           args.amp, args.split_file, args.labels_file)

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    environment = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "torch": torch.__version__, "model": args.model, "batch_size": args.batch_size, "amp": args.amp,
        "root": str(args.root), "max_images": args.max_images,
    }
    print(f"{environment['device']}, torch {environment['torch']}, {args.model}, batch {args.batch_size}"
          f"{', bf16' if args.amp else ''}; resize long side 512 (the reference's test)")
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": environment, "rows": rows}, indent=2))


def measure_presets(
    root: Path, model: str, presets: list[str], max_images: int, batch_size: int, device: str, amp: bool,
    split_file: Path | None = None, labels_file: Path | None = None,
) -> list[dict]:
    """Images/s of each preset on ``max_images`` photos of a VOC-layout ``root``, by ``evaluate()``."""
    split_file = split_file or root / "ImageSets" / "Segmentation" / "all.txt"
    labels_file = labels_file or root / "cls_labels.json"
    for path in (root, split_file, labels_file):
        if not path.exists():
            sys.exit(f"error: {path} does not exist: pass --root/--split-file/--labels-file of a VOC-layout folder")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / f"random_{model}.pt"
        write_checkpoint(ckpt, root, split_file, labels_file, model)
        for preset in presets:
            cfg = compose_config("eval", [
                f"ckpt={ckpt}", f"eval={preset}", f"max_images={max_images}", f"batch_size={batch_size}",
                f"device={device}", f"amp={str(amp).lower()}", f"run_dir={Path(tmp) / preset}",
            ])
            results = evaluate(cfg, {})
            rate = results["images_per_second"]
            rows.append({"preset": preset, "images": results["num_images"], "seconds": results["seconds"],
                         "images_per_second": rate, **{name: count / rate for name, count in SPLITS.items()}})
    return rows


def print_table(rows: list[dict]) -> None:
    print("| preset | images | images/s | VOC val (1,449) | COCO val (40,137) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['preset']} | {row['images']} | {row['images_per_second']:.2f} | "
              f"{_duration(row['VOC val'])} | {_duration(row['COCO val'])} |")


def _duration(seconds: float) -> str:
    hours, rest = divmod(int(round(seconds)), 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


if __name__ == "__main__":
    main()

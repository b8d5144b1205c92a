"""Pseudo-label and segmentation quality of AFA's parts on the synthetic benchmark: mIoU of
the CAM, PAR and propagated labels (val and train) and of the segmentation (val), and the
recall of the learned affinity (val), for AFA, AFA without its refinements or its pretrained
prior, and the PSA mode, over seeds.

    python benchmarks/quality.py                                   # seeds 0 1 2, all five variants, runs/quality
    python benchmarks/quality.py --variants cam_only no_par --out runs/quality
    python benchmarks/quality.py --seeds 0 --variants afa --no-train-split   # val columns only
    python benchmarks/quality.py --finished-only --train-max-images 400      # a table of the runs already done
    python benchmarks/quality.py --variants afa_prior --prior runs/exp/prior_parts.pth --out runs/qparts  # another prior

Variants (each one `python train.py logger=none seed=k ...`, by `synthetic_runs.run_one`):

- ``cam_only``: ``method.switch_iters=800 method.loss.aff_weight=0``: the segmentation head
  learns from the PAR label throughout, no affinity loss, no propagated label in training;
- ``no_par``: ``method.par.num_iterations=0``: AFA without PAR (the PAR label is the
  thresholded CAM through PAR's ×2 down/up-sampling; the propagated label is not refined);
- ``afa``: the default `python train.py` (the tiny MiT from randomly initialised weights);
- ``afa_prior``: ``experiment=synthetic_prior``: the default run started from the tiny MiT's
  pretrained prior (``weights/mit_tiny_synthetic_prior.pth``, docs/synthetic.md);
- ``psa``: ``experiment=psa_synthetic``, the PSA two-stage mode.

A run is reused, not trained again, when ``<out>/<variant>-seed<k>.log`` holds its result
line and its checkpoint exists (``<out>/<variant>-seed<k>/checkpoints/last.pt``; PSA:
``.../seg/checkpoints/last.pt``). Columns of the AFA variants: CAM, propagated,
segmentation and classification F1 on val from the run's final validation (its log); PAR on val and CAM, PAR,
propagated on train from `eval.py`'s ``evaluate()`` on the checkpoint (``target=par`` /
``cam`` / ``propagated``, ``split=train``, ``eval=ss``: the CAM targets use the method's CAM
scales at the images' size, as the training validation does), and the affinity recall on
val from ``target=affinity`` (the shares of the masks' same-class and different-class pairs
within ``method.affinity.radius`` with P > 0.5 and P ≤ 0.5; "objects": the same-class pairs
inside objects, without the background's), each cached as
``<out>/<variant>-seed<k>/quality/<split>-<target>.json``. PSA: its own CAM-label and
random-walk-label mIoU on train and segmentation on val, '-' elsewhere. Minutes per run:
first to last timestamped line of the run's log. Cells: mean ± half the range over seeds.
Writes ``<out>/quality.md`` and ``<out>/quality.json`` and prints the table.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.synthetic_runs import mean_spread, parse_result, run_one  # noqa: E402


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...]
    psa: bool = False  # the PSA mode: its own result line and stage layout, no eval.py targets


VARIANTS = {v.name: v for v in (
    Variant("cam_only", ("method.switch_iters=800", "method.loss.aff_weight=0")),
    Variant("no_par", ("method.par.num_iterations=0",)),
    Variant("afa", ()),
    Variant("afa_prior", ("experiment=synthetic_prior",)),
    Variant("psa", ("experiment=psa_synthetic",), psa=True),
)}
# (key, header) of the table's metric columns, in order.
COLUMNS = (
    ("val_cam", "CAM (val)"), ("val_par", "PAR (val)"), ("val_propagated", "propagated (val)"),
    ("segmentation", "segmentation (val)"), ("cls_f1", "classification F1 (val)"),
    ("val_affinity_positive", "affinity recall + (val)"), ("val_affinity_objects", "affinity recall +, objects (val)"),
    ("val_affinity_negative", "affinity recall − (val)"),
    ("train_cam", "CAM (train)"), ("train_par", "PAR (train)"), ("train_propagated", "propagated (train)"),
)
# The eval.py targets of an AFA checkpoint: (split, target) -> ((column, result key), ...).
VAL_EVALS = {
    ("val", "par"): (("val_par", "miou"),),
    ("val", "affinity"): (("val_affinity_positive", "positive_recall"),
                          ("val_affinity_objects", "foreground_positive_recall"),
                          ("val_affinity_negative", "negative_recall")),
}
TRAIN_EVALS = {("train", target): ((f"train_{target}", "miou"),) for target in ("cam", "par", "propagated")}
# What a target's cache entry keeps of evaluate()'s results.
RESULT_KEYS = {"affinity": ("positive_recall", "foreground_positive_recall", "negative_recall", "positives",
                            "foreground_positives", "negatives", "radius")}
LABEL_RESULT_KEYS = ("miou", "miou_standard")
TIMESTAMP = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}) \|", re.MULTILINE)


# ---------------------------------------------------------------------- runs and their logs
def run_paths(out: Path, variant: Variant, seed: int) -> tuple[Path, Path, Path]:
    """(log, run directory, checkpoint) of a run, as `synthetic_runs.run_one` lays them out."""
    run_dir = out / f"{variant.name}-seed{seed}"
    checkpoint = run_dir / ("seg" if variant.psa else "") / "checkpoints" / "last.pt"
    return out / f"{variant.name}-seed{seed}.log", run_dir, checkpoint


def log_seconds(text: str) -> float | None:
    """Seconds from the first to the last timestamped line of a log (None: fewer than two)."""
    stamps = [datetime.fromisoformat(stamp) for stamp in TIMESTAMP.findall(text)]
    return (max(stamps) - min(stamps)).total_seconds() if len(stamps) > 1 else None


def finished_run(out: Path, variant: Variant, seed: int) -> dict[str, Any] | None:
    """The reuse rule: the run's numbers if its log holds the result line and its checkpoint
    exists, else None (the run is trained)."""
    log, _, checkpoint = run_paths(out, variant, seed)
    if not log.is_file() or not checkpoint.is_file():
        return None
    text = log.read_text(errors="replace")
    result = parse_result(text)
    if result is None:
        return None
    return {**result, "seconds": log_seconds(text)}


def table_columns(variant: Variant, result: dict[str, Any]) -> dict[str, Any]:
    """A run's log numbers under the table's keys: AFA's final validation is on val; the PSA
    line gives its CAM and random-walk labels on train (the latter in the propagated column)."""
    if variant.psa:
        return {"train_cam": result["cam"], "train_propagated": result["propagated"],
                "segmentation": result["segmentation"], "seconds": result.get("seconds")}
    return {"val_cam": result["cam"], "val_propagated": result["propagated"], "segmentation": result["segmentation"],
            "cls_f1": result.get("cls_f1"), "seconds": result.get("seconds")}


def train_or_reuse(out: Path, variant: Variant, seed: int) -> tuple[dict[str, Any], bool]:
    """(the run's log numbers, whether it was reused)."""
    found = finished_run(out, variant, seed)
    if found is not None:
        return found, True
    timed = run_one(variant.name, list(variant.overrides), seed, out)
    found = finished_run(out, variant, seed)
    if found is None:
        raise SystemExit(f"error: {variant.name} seed {seed} finished without {run_paths(out, variant, seed)[2]}")
    if found["seconds"] is None:
        found["seconds"] = timed["seconds"]
    return found, False


# ---------------------------------------------------------------------- eval.py targets
def checkpoint_stamp(checkpoint: Path) -> dict[str, Any]:
    stat = checkpoint.stat()
    return {"checkpoint": str(checkpoint.resolve()), "checkpoint_mtime_ns": stat.st_mtime_ns,
            "checkpoint_size": stat.st_size}


def cache_path(run_dir: Path, split: str, target: str) -> Path:
    return run_dir / "quality" / f"{split}-{target}.json"


def split_max_images(split: str, options: argparse.Namespace) -> int | None:
    """How many images of `split` the eval targets score (None: all)."""
    return options.train_max_images if split == "train" and options.train_max_images is not None else options.max_images


def read_cache(path: Path, checkpoint: Path, max_images: int | None, target: str) -> dict[str, Any] | None:
    """A cached eval result, if it was computed on this very checkpoint file with these images
    and holds every number the target now reports."""
    if not path.is_file():
        return None
    try:
        cached = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    same = all(cached.get(k) == v for k, v in checkpoint_stamp(checkpoint).items() if k != "checkpoint")
    complete = all(key in cached for key in RESULT_KEYS.get(target, LABEL_RESULT_KEYS))
    return cached if same and complete and cached.get("max_images") == max_images else None


def eval_overrides(checkpoint: Path, split: str, target: str, run_dir: Path, options: argparse.Namespace) -> list[str]:
    """`python eval.py` arguments of one target."""
    overrides = [f"ckpt={checkpoint}", f"target={target}", "eval=ss", f"run_dir={run_dir}", "logger=none",
                 f"device={options.device}", f"batch_size={options.batch_size}", f"num_workers={options.num_workers}"]
    if split != "val":
        overrides.append(f"split={split}")
    max_images = split_max_images(split, options)
    if max_images is not None:
        overrides.append(f"max_images={max_images}")
    return overrides


def evaluate_target(checkpoint: Path, run_dir: Path, split: str, target: str,
                    options: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    """(one eval.py target's numbers: mIoU and friends, the two recalls for ``affinity``;
    whether they came from the cache)."""
    path = cache_path(run_dir, split, target)
    max_images = split_max_images(split, options)
    cached = read_cache(path, checkpoint, max_images, target)
    if cached is not None:
        return cached, True
    from hydra import compose, initialize_config_dir

    from afa.engine.evaluate import evaluate

    overrides = eval_overrides(checkpoint, split, target, path.with_suffix(""), options)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=overrides)
    results = evaluate(cfg, {})
    entry = {"split": split, "target": target, **{key: results[key] for key in RESULT_KEYS.get(target, LABEL_RESULT_KEYS)},
             "num_images": results["num_images"], "seconds": results["seconds"], "max_images": max_images,
             "command": "python eval.py " + " ".join(overrides), **checkpoint_stamp(checkpoint)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entry, indent=2))
    return entry, False


# ---------------------------------------------------------------------- the table
def format_table(results: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown: one row per variant, each cell mean ± half the range over its seeds ('-'
    where the variant has no such number); a column no run has (the train columns without
    the train split) is left out."""
    columns = [(key, header) for key, header in COLUMNS
               if any(run.get(key) is not None for runs in results.values() for run in runs)]
    headers = ["variant", "seeds", *(header for _, header in columns), "minutes per run"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for name, runs in results.items():
        cells = [name, str(len(runs))]
        for key in (*(key for key, _ in columns), "seconds"):
            values = [run[key] for run in runs if run.get(key) is not None]
            if key == "seconds":
                cells.append(mean_spread([v / 60 for v in values], 1) if values else "-")
            else:
                cells.append(mean_spread(values, 3) if values else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--train-split", action=argparse.BooleanOptionalAction, default=True,
                        help="also score the CAM, PAR and propagated labels on train (2,000 images; the slow part)")
    parser.add_argument("--device", default="auto", help="eval.py's device")
    parser.add_argument("--batch-size", type=int, default=8, help="eval.py's batch_size (the training validation's)")
    parser.add_argument("--num-workers", type=int, default=1, help="eval.py's num_workers")
    parser.add_argument("--max-images", type=int, default=None,
                        help="score only the first N images of each split (a smoke run; not the benchmark's numbers)")
    parser.add_argument("--train-max-images", type=int, default=None,
                        help="score only the first N train images (the train columns on a subset; val stays whole)")
    parser.add_argument("--prior", type=Path, default=None,
                        help="weights for afa_prior (model.pretrained) instead of the shipped prior, e.g. one made by "
                             "benchmarks/pretrain_tiny.py --style parts; give such runs their own --out")
    parser.add_argument("--finished-only", action="store_true",
                        help="train nothing: the table of the runs already finished in --out (missing ones are listed)")
    options = parser.parse_args()
    out: Path = options.out
    out.mkdir(parents=True, exist_ok=True)
    evals = {**VAL_EVALS, **(TRAIN_EVALS if options.train_split else {})}
    variants = dict(VARIANTS)
    if options.prior is not None and not options.prior.is_file():
        raise SystemExit(f"error: --prior {options.prior} does not exist: pass a mit_*.pth file "
                         "(benchmarks/pretrain_tiny.py writes one)")
    if options.prior is not None:
        variants["afa_prior"] = Variant("afa_prior", (*VARIANTS["afa_prior"].overrides,
                                                      f"model.pretrained={options.prior.resolve()}"))

    results: dict[str, list[dict[str, Any]]] = {}
    missing: list[str] = []
    for name in options.variants:
        variant = variants[name]
        for seed in options.seeds:
            log, run_dir, checkpoint = run_paths(out, variant, seed)
            if options.finished_only and finished_run(out, variant, seed) is None:
                missing.append(f"{name} seed {seed}")
                continue
            print(f"{name} seed {seed}: " + ("reusing " if finished_run(out, variant, seed) else "training -> ")
                  + str(log), flush=True)
            numbers, reused = train_or_reuse(out, variant, seed)
            run = {"seed": seed, "reused": reused, "log": str(log), "checkpoint": str(checkpoint),
                   **table_columns(variant, numbers)}
            if not variant.psa:
                for (split, target), columns in evals.items():
                    entry, cached = evaluate_target(checkpoint, run_dir, split, target, options)
                    run.update({column: entry[key] for column, key in columns})
                    numbers = ", ".join(f"{'mIoU' if key == 'miou' else key.replace('_', ' ')} {entry[key]:.4f}"
                                        for _, key in columns)
                    print(f"  {target} on {split}: {numbers}"
                          + (" (cached)" if cached else f" ({entry['seconds']:.0f} s)"), flush=True)
            minutes = "-" if run["seconds"] is None else f"{run['seconds'] / 60:.1f} min"
            print(f"  {name} seed {seed}: " + ", ".join(f"{key} {run[key]:.3f}" for key, _ in COLUMNS
                                                         if run.get(key) is not None) + f", {minutes}", flush=True)
            results.setdefault(name, []).append(run)

    table = format_table(results)
    note = (f"Seeds {' '.join(map(str, options.seeds))}; mean ± half the range over seeds; runs in {out}."
            + ("" if options.train_split else " Train columns not computed (--no-train-split).")
            + ("" if options.max_images is None else f" Eval targets on the first {options.max_images} images only.")
            + ("" if options.train_max_images is None or not options.train_split
               else f" Train columns on the first {options.train_max_images} train images.")
            + ("" if options.prior is None else f" afa_prior starts from {options.prior}.")
            + ("" if not missing else " Not run: " + ", ".join(missing) + "."))
    (out / "quality.md").write_text(table + "\n\n" + note + "\n")
    (out / "quality.json").write_text(json.dumps({
        "seeds": options.seeds, "train_split": options.train_split, "max_images": options.max_images,
        "train_max_images": options.train_max_images, "missing": missing,
        "columns": dict(COLUMNS),
        "variants": {name: {"overrides": list(variants[name].overrides), "runs": runs} for name, runs in results.items()},
    }, indent=2))
    print(table)
    print(note)


if __name__ == "__main__":
    main()

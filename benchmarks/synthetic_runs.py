"""Run `python train.py` on the synthetic benchmark once per (variant, seed), one after
another, and print the final validation mIoU of each with the mean and spread per variant.

    python benchmarks/synthetic_runs.py --seeds 0 1 2
    python benchmarks/synthetic_runs.py --seeds 0 --variant zero "method.inactive_losses=zero" \
        --variant reference_cam "method.cam.reference_mode=true"
    python benchmarks/synthetic_runs.py --seeds 0 1 2 --variant psa "experiment=psa_synthetic"

For the PSA mode the columns read: CAM label (train), random-walk label (train),
segmentation (val).

Variant "default" (no overrides) runs unless ``--no-default``. Each run's log goes to
``--out``/<variant>-seed<k>.log; the table is printed and written as results.md and results.json.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

RESULT_LINE = re.compile(
    r"CAM (?P<cam>[\d.]+) \| propagated (?P<propagated>[\d.]+) \| segmentation (?P<segmentation>[\d.]+) "
    r"\(classification F1 (?P<cls_f1>[\d.]+)\)"
)
METRICS = ("cam", "propagated", "segmentation", "cls_f1")
# The PSA mode's line (experiment=psa_synthetic): CAM and random-walk labels on train, segmentation on val.
PSA_RESULT_LINE = re.compile(
    r"PSA — CAM label mIoU \(train\) (?P<cam>[\d.]+) \| random-walk label mIoU \(train\) (?P<propagated>[\d.]+) "
    r"\| segmentation mIoU \(val\) (?P<segmentation>[\d.]+)"
)


def run_one(name: str, overrides: list[str], seed: int, out: Path) -> dict[str, float]:
    """One training run; its final validation numbers and wall time in seconds."""
    log = out / f"{name}-seed{seed}.log"
    command = [sys.executable, "train.py", "logger=none", f"seed={seed}", f"run_name=runs-{name}-seed{seed}",
               f"run_dir={out / f'{name}-seed{seed}'}", *overrides]
    start = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    result = parse_result(log.read_text())
    if code != 0 or result is None:
        raise SystemExit(f"error: {' '.join(command)} failed (exit {code}); see {log}")
    return {**result, "seconds": seconds}


def parse_result(text: str) -> dict[str, float] | None:
    """The final numbers of a train.py output (AFA's or the PSA mode's line), None if absent."""
    match = RESULT_LINE.search(text) or PSA_RESULT_LINE.search(text)
    return None if match is None else {key: float(value) for key, value in match.groupdict().items()}


def mean_spread(values: list[float], digits: int = 3) -> str:
    """A table cell: ``mean ± half the range`` of ``values`` (the value alone for one)."""
    mean, spread = sum(values) / len(values), (max(values) - min(values)) / 2
    return f"{mean:.{digits}f}" + (f" ± {spread:.{digits}f}" if len(values) > 1 else "")


def summarise(results: dict[str, list[dict[str, float]]]) -> str:
    """Markdown: one row per variant, mean ± half the range over its seeds."""
    lines = ["| variant | seeds | CAM | propagated | segmentation | cls F1 | minutes per run |",
             "|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        cells = []
        for key in (*METRICS, "seconds"):
            if key not in runs[0]:  # PSA reports no classification F1
                cells.append("-")
                continue
            values = [run[key] / (60 if key == "seconds" else 1) for run in runs]
            cells.append(mean_spread(values, 1 if key == "seconds" else 3))
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variant", nargs=2, action="append", default=[], metavar=("NAME", "OVERRIDES"),
                        help="a name and its hydra overrides (space-separated, one string)")
    parser.add_argument("--no-default", action="store_true", help="skip the run without overrides")
    parser.add_argument("--out", type=Path, default=Path("runs/synthetic_runs"))
    args = parser.parse_args()
    variants = ([] if args.no_default else [("default", [])]) + [(n, o.split()) for n, o in args.variant]
    if not variants:
        parser.error("nothing to run: give --variant or drop --no-default")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, float]]] = {}
    for name, overrides in variants:
        for seed in args.seeds:
            results.setdefault(name, []).append(run := run_one(name, overrides, seed, args.out))
            print(f"{name} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in run.items()), flush=True)
    table = summarise(results)
    (args.out / "results.md").write_text(table + "\n")
    (args.out / "results.json").write_text(json.dumps(
        {name: {"overrides": dict(variants)[name], "runs": runs} for name, runs in results.items()}, indent=2))
    print(table)


if __name__ == "__main__":
    main()

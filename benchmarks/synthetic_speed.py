"""Generation speed of the synthetic benchmark (the table in docs/synthetic.md).

    python benchmarks/synthetic_speed.py            # 300 images per timing, S = 128
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from afa.data import SyntheticTrainDataset, generate_split_image, prepare_synthetic  # noqa: E402

SPLITS = {"num_train": 2000, "num_val": 500, "num_test": 500}  # prepare_synthetic's defaults


def per_item_ms(function, count: int) -> float:
    function(0)  # warm-up
    started = time.perf_counter()
    for index in range(count):
        function(index)
    return (time.perf_counter() - started) / count * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=300, help="images per per-image timing")
    parser.add_argument("--crop", type=int, default=128, help="training crop size S")
    args = parser.parse_args()

    generate = per_item_ms(lambda i: generate_split_image(0, "train", i), args.count)
    print(f"generate_split_image, one process: {generate:.1f} ms/image ({60_000 / generate:,.0f} images/min)")
    train = SyntheticTrainDataset(seed=0, length=args.count + 1, crop_size=args.crop, scale_range=(0.6, 1.0))
    sample = per_item_ms(lambda i: train[i], args.count)
    print(f"one on-the-fly training sample (S = {args.crop}): {sample:.1f} ms")
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as root:
            started = time.perf_counter()
            prepare_synthetic(root, seed=0, workers=workers, **SPLITS)
            elapsed = time.perf_counter() - started
            started = time.perf_counter()
            prepare_synthetic(root, seed=0, workers=workers, **SPLITS)
            cached = (time.perf_counter() - started) * 1000
        total = sum(SPLITS.values())
        print(f"prepare_synthetic defaults ({total:,} images), {workers} worker(s): {elapsed:.1f} s "
              f"({total / elapsed * 60:,.0f} images/min); second call {cached:.1f} ms")


if __name__ == "__main__":
    main()

"""Times each batched AFA operator against its per-image reference, in the same run.

    python benchmarks/bench_ops.py                  # CPU, batch 4, 512 crops
    python benchmarks/bench_ops.py --device cuda    # GPU, timed with torch.cuda.synchronize
    python benchmarks/bench_ops.py --quick          # small sizes, a smoke run

The references (tests/reference_ops.py) follow AFA.md literally, image by image, as the
public reference code does. Each row also checks that both give the same result.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: afa and tests

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import afa.ops as ops  # noqa: E402
from afa.engine.afa_step import resolve_propagation  # noqa: E402
from afa.ops.random_walk import _random_walk  # noqa: E402
from tests import reference_ops as ref  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, repeats: int, budget_s: float) -> float:
    """Median seconds of up to `repeats` runs after one warm-up run; stops once the timed
    runs have taken `budget_s`. A warm-up slower than the budget (a slow reference on a
    CPU) is itself the measurement."""
    start = time.perf_counter()
    fn()
    synchronize(device)
    warm_up = time.perf_counter() - start
    if warm_up > budget_s:
        return warm_up
    times: list[float] = []
    while len(times) < repeats and sum(times) < budget_s:
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class SmallCamNetwork(torch.nn.Module):
    """Stand-in for the CAM-only forward: stride-16 conv features, 1×1 classifier, affinity."""

    def __init__(self, classes: int):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 4, stride=4), torch.nn.GELU(), torch.nn.Conv2d(32, 64, 4, stride=4))
        self.classifier = torch.nn.Conv2d(64, classes, 1, bias=False)

    def forward(self, images: torch.Tensor, affinity_images: int):
        features = self.features(images)
        cams = self.classifier(features)
        if affinity_images == 0:
            return cams, None
        flat = features[:affinity_images].flatten(2)  # (a, 64, N)
        return cams, torch.sigmoid(flat.transpose(1, 2) @ flat / 64)


def build_inputs(args: argparse.Namespace, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(0)
    batch, crop, classes = args.batch, args.crop, args.classes
    labels = torch.zeros(batch, classes)
    for i in range(batch):  # 1–3 classes per image, as in VOC
        labels[i, torch.randperm(classes, generator=generator)[: 1 + i % 3]] = 1
    boxes = []
    for i in range(batch):  # the first crop full, the others partly padding
        top, left = (0, 0) if i == 0 else (7 * i, 11 * i)
        boxes.append([top, crop - (0 if i == 0 else 13 * i), left, crop - (0 if i == 0 else 5 * i)])
    grid = int(crop * 1.5) // 16  # largest CAM scale's stage-4 grid (48 for 512)
    affinity = torch.rand(batch, grid * grid, grid * grid, generator=generator)
    segmentation = torch.randint(0, classes + 1, (batch, crop, crop), generator=generator)
    segmentation[:, : crop // 8] = 255
    inputs = dict(
        images=ref.random_images(batch, crop, crop, seed=1),
        cams=torch.rand(batch, classes, crop, crop, generator=generator),
        labels=labels, boxes=torch.tensor(boxes), grid=grid,
        affinity=(affinity + affinity.transpose(1, 2)) / 2,
        par_images=ref.random_images(batch, crop // 2, crop // 2, seed=2),
        par_masks=torch.rand(batch, args.channels, crop // 2, crop // 2, generator=generator),
        segmentation=segmentation,
        seg_logits=torch.randn(batch, classes + 1, crop // 4, crop // 4, generator=generator),
        pair_prediction=torch.rand(batch, (crop // 16) ** 2, (crop // 16) ** 2, generator=generator),
    )
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def max_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"max|Δ| {(a.float() - b.float()).abs().max().item():.1e}"


def agreement(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"equal {100 * (a == b).float().mean().item():.3f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--crop", type=int, default=512, help="crop size S")
    parser.add_argument("--classes", type=int, default=20, help="foreground classes C")
    parser.add_argument("--channels", type=int, default=21, help="K' of the plain PAR row")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timed runs per row and side")
    parser.add_argument("--quick", action="store_true", help="crop 128, one repeat")
    parser.add_argument("--only", default="", help="run the rows whose name contains this text")
    args = parser.parse_args()
    if args.quick:
        args.crop, args.repeats = 128, 1
    device = torch.device(args.device)
    # Plain float32 convolutions and products, so that the per-row checks compare like with like.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    x = build_inputs(args, device)
    network = SmallCamNetwork(args.classes).to(device).eval()
    implementation = resolve_propagation("auto", device)  # training's default choice
    # The reference trainer builds its windows once, so the reference rows get them ready-made.
    reference_window = ref.reference_window_mask(x["grid"], x["grid"], 8, device)
    label_grid = args.crop // 16
    label_window = ref.reference_window_mask(label_grid, label_grid, 8, device)
    most = int(x["labels"].sum(dim=1).max())  # known on the CPU before the labels move to the GPU
    thresholds = (0.55, 0.35)
    on_grid = F.interpolate(x["cams"], size=(x["grid"], x["grid"]), mode="bilinear", align_corners=False)
    affinity_targets = ops.affinity_labels_from_segmentation(x["segmentation"], label_grid)

    def random_walk(implementation: str):  # the step below the label, all classes kept
        return lambda: _random_walk(on_grid.flatten(2), x["labels"], ops.class_channel_index(x["labels"]),
                                    x["affinity"], (x["grid"], x["grid"]), 8, thresholds, implementation)

    def reference_random_walk():
        return torch.stack([ref.reference_propagate(on_grid, x["labels"], x["affinity"], reference_window, tau)
                            for tau in thresholds], dim=1)

    rows = [
        # name, batched, per-image reference, check
        (f"PAR {args.crop // 2}² K'={args.channels}",
         lambda: ops.pixel_adaptive_refinement(x["par_images"], x["par_masks"]),
         lambda: ref.reference_par(x["par_images"], x["par_masks"]), max_difference),
        ("PAR label §5 (C masked)",
         lambda: ops.refine_cams_with_par(x["images"], x["cams"], x["labels"], x["boxes"], thresholds),
         lambda: ref.reference_refine_cams_with_par(x["images"], x["cams"], x["labels"], x["boxes"], thresholds),
         agreement),
        (f"PAR label §5 (≤{most} classes)",
         lambda: ops.refine_cams_with_par(x["images"], x["cams"], x["labels"], x["boxes"], thresholds,
                                          max_classes_per_image=most),
         lambda: ref.reference_refine_cams_with_par(x["images"], x["cams"], x["labels"], x["boxes"], thresholds),
         agreement),
        (f"random walk N={x['grid'] ** 2}, 2 τ, window", random_walk("windowed"), reference_random_walk,
         max_difference),
        (f"random walk N={x['grid'] ** 2}, 2 τ, dense T", random_walk("dense"), reference_random_walk, max_difference),
        (f"propagated label §7 (≤{most} classes)",
         lambda: ops.propagate_cams_with_affinity(x["cams"], x["labels"], x["affinity"], x["images"], x["boxes"],
                                                  implementation=implementation, max_classes_per_image=most),
         lambda: ref.reference_propagate_with_affinity(x["cams"], x["labels"], x["affinity"], x["images"],
                                                       x["boxes"], grid=(x["grid"], x["grid"])),
         agreement),
        ("multi-scale CAM",
         lambda: ops.multi_scale_cam(network, x["images"])[0],
         lambda: ref.reference_multi_scale_cam(network, x["images"], [1.0, 0.5, 1.5])[0], max_difference),
        ("CAM training label §4",
         lambda: ops.cam_to_training_label(x["cams"], x["labels"], x["boxes"]),
         lambda: ref.reference_cam_to_training_label(x["cams"], x["labels"], x["boxes"], 0.55, 0.35), agreement),
        (f"affinity labels {label_grid}²",
         lambda: ops.affinity_labels_from_segmentation(x["segmentation"], label_grid),
         lambda: ref.reference_affinity_labels(x["segmentation"], (label_grid, label_grid), 8, label_window),
         agreement),
        ("affinity loss",
         lambda: ops.affinity_loss(x["pair_prediction"], affinity_targets)[0],
         lambda: ref.reference_affinity_loss(x["pair_prediction"], affinity_targets.long()), max_difference),
        ("segmentation loss",
         lambda: ops.balanced_segmentation_loss(x["seg_logits"], x["segmentation"]),
         lambda: ref.reference_balanced_segmentation_loss(x["seg_logits"], x["segmentation"]), max_difference),
    ]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device {name}; torch {torch.__version__}; batch {args.batch}, crop {args.crop}, C={args.classes}, "
          f"median of ≤{args.repeats} runs after a warm-up (≤{args.budget:g} s a side)")
    print(f"{'operator':34s} {'batched ms':>11s} {'per-image ms':>13s} {'ratio':>7s}  check")
    with torch.no_grad():
        for label, batched, reference, check in rows:
            if args.only not in label:
                continue
            ours_s = measure(batched, device, args.repeats, args.budget)
            reference_s = measure(reference, device, args.repeats, args.budget)
            result = check(batched(), reference())
            print(f"{label:34s} {1e3 * ours_s:11.1f} {1e3 * reference_s:13.1f} {reference_s / ours_s:6.1f}×  {result}",
                  flush=True)


if __name__ == "__main__":
    main()

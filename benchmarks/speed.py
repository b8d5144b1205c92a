"""One AFA training iteration, phase by phase, against a straightforward per-image
implementation of the same steps, in the same run; then evaluation images/s.

    python benchmarks/speed.py                          # CPU: the VOC setting and the tiny synthetic one
    python benchmarks/speed.py --configs tiny --iterations 5
    python benchmarks/speed.py --device cuda --amp --iterations 20 --eval-images 200

Settings (``--configs``): ``voc`` is ``experiment=afa_voc`` (MiT-B1 with random weights,
512×512 crops, batch 2, CAM scales 1 / 0.5 / 1.5, 20 classes); ``tiny`` is the default
synthetic experiment (``python train.py``: tiny MiT, 128 crops, batch 8, scales 1 / 0.5).
Inputs are seeded random tensors with 1–3 classes per image: the time of an iteration
does not depend on the weights or pixels. Each iteration is one of the propagated-label
phase (AFA.md §8), the one that runs every step: multi-scale CAM (§3), PAR label (§5),
propagated label (§7), training forward, losses with the affinity labels (§6) and
backward, optimiser step.

Implementations (``--implementations``):
- ``afa``: what the trainer runs (``afa.engine.afa_step``): batched CAM passes without the
  decoder, batched PAR and random walk.
- ``straightforward``: the obvious loop, as the public reference code is written: every
  CAM scale of every image through the full network including the decoder (train mode, as
  the reference), the affinity as a 1×1 conv over the 16 symmetrised N×N logit maps, PAR
  and propagation image by image and threshold by threshold, a dense N×N window mask (built once, as the reference trainer does), the per-image operators of
  ``tests/reference_ops.py`` (which the tests check against AFA.md and against afa's).

Each (setting, implementation) runs in its own process so its peak memory is its own
(CUDA: ``max_memory_allocated``; CPU: the process's peak resident set). Times are medians
over ``--iterations`` after one warm-up iteration, CUDA synchronised at each phase
boundary. Evaluation images/s come from ``benchmarks/eval_speed.py`` (the VOC photos of
``../shared/data/voc-sample``, or ``--eval-root``; ``--eval-images 0`` skips it). Tables go
to stdout, and with the environment to ``--out`` as JSON.

``--profile`` adds, per (setting, implementation), one more iteration counted by
``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and, on CUDA, the
fused attention, forward and backward; sparse products by their stored entries; achieved TFLOP/s = FLOPs / median iteration time, and the fraction of
``--peak-tflops`` when given) and one under ``torch.profiler``: the operators with the most
self time, and the counts of kernel launches and of host-device synchronisations.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # afa, tests and benchmarks

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from afa.data.synthetic import NUM_SYNTHETIC_CLASSES  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from afa.engine.afa_step import AFAOptions, afa_losses, pseudo_labels  # noqa: E402
from afa.engine.builders import build_network, build_optimizer_from_config  # noqa: E402
from afa.engine.evaluator import autocast_context  # noqa: E402
from afa.engine.trainer import PhaseTimer  # noqa: E402
from tests import reference_ops as ref  # noqa: E402

SETTINGS = {
    "voc": (["experiment=afa_voc", "model.pretrained=null"], 20),
    "tiny": (["experiment=synthetic"], NUM_SYNTHETIC_CLASSES),
}
IMPLEMENTATIONS = ("afa", "straightforward")
PHASES = ("cam", "par", "propagation", "forward", "losses_backward", "optimizer")


def compose_setting(name: str):
    overrides, _ = SETTINGS[name]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[*overrides, "logger=none"])


def synthetic_batch(batch: int, crop: int, classes: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Normalised-looking images (B, 3, crop, crop), 1–3 classes per image, whole-crop boxes."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, crop, crop, generator=generator)
    labels = torch.zeros(batch, classes)
    for row in range(batch):
        count = 1 + row % 3
        labels[row, torch.randperm(classes, generator=generator)[:count]] = 1
    boxes = torch.tensor([[0, crop, 0, crop]] * batch, dtype=torch.long)
    return {"image": images.to(device), "labels": labels.to(device), "valid_box": boxes.to(device),
            "max_classes": int(labels.sum(dim=1).max())}


class AFAIteration:
    """The trainer's propagated-label step (afa/engine/trainer.py ``_train_step``)."""

    def __init__(self, network, optimizer, options: AFAOptions, amp: bool) -> None:
        self.network, self.optimizer, self.options, self.amp = network, optimizer, options, amp

    def __call__(self, batch: dict, mark) -> None:
        images, labels, boxes = batch["image"], batch["labels"], batch["valid_box"]
        with autocast_context(images.device, self.amp):
            pseudo = pseudo_labels(self.network, images, labels, boxes, self.options, propagate=True,
                                   max_classes=batch["max_classes"], mark=mark)
            output = self.network(images)
            mark("forward")
            losses, _ = afa_losses(output, labels, pseudo, "propagated_label", self.options,
                                   self.network.affinity_grid(*images.shape[-2:]))
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        mark("losses_backward")
        self.optimizer.step()
        mark("optimizer")


def obvious_forward(network, images: torch.Tensor, attention_images: int):
    """The network as the reference writes it: the decoder always runs, and the affinity is
    the 1×1 conv of the (n, 16, N, N) logit maps plus their transposes (AFA.md §2 literally)."""
    features, attention = network.encoder(images, attention_images=attention_images)
    class_logits = network.classifier(network.pool(features[-1])).flatten(1)
    cams = F.conv2d(features[-1], network.classifier.weight)
    seg_logits = network.decoder(features)
    affinity = None
    if attention is not None:
        logits = attention.logits()
        affinity = torch.sigmoid(F.conv2d(logits + logits.transpose(-2, -1), network.attn_proj.weight,
                                          network.attn_proj.bias))[:, 0]
    return class_logits, cams, seg_logits, affinity


class StraightforwardIteration:
    """The same step written the obvious way, image by image (see the module docstring)."""

    def __init__(self, network, optimizer, options: AFAOptions, amp: bool, crop: int) -> None:
        self.network, self.optimizer, self.options, self.amp = network, optimizer, options, amp
        stride = network.encoder.output_stride
        largest = int(max(options.cam_scales) * crop)
        self.cam_grid = (-(-largest // stride),) * 2  # the largest scale's grid (AFA.md §7)
        self.train_grid = network.affinity_grid(crop, crop)
        device = next(network.parameters()).device
        self.cam_window = ref.reference_window_mask(*self.cam_grid, options.radius, device)
        self.train_window = ref.reference_window_mask(*self.train_grid, options.radius, device)
        self.par = dict(dilations=options.par.dilations, num_iterations=options.par.num_iterations,
                        w1=options.par.w1, w2=options.par.w2)

    def pseudo_labels(self, batch: dict, mark) -> dict[str, torch.Tensor]:
        """CAMs, PAR label and propagated label image by image, in the network's current mode."""
        images, labels, boxes = batch["image"], batch["labels"], batch["valid_box"]
        options = self.options
        with torch.no_grad():
            cams, affinity = ref.reference_multi_scale_cam(
                lambda x, n: obvious_forward(self.network, x, n)[1::2],  # (cams, affinity)
                images, list(options.cam_scales))
            cams, affinity = cams.float(), affinity.float()
            mark("cam")
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):  # the label ops in float32, as afa's
            refined = ref.reference_refine_cams_with_par(
                images, cams, labels, boxes, (options.high_thre, options.low_thre), **self.par)
            mark("par")
            propagated = ref.reference_propagate_with_affinity(
                cams, labels, affinity, images, boxes, (options.low_thre, options.high_thre),
                radius=options.radius, grid=self.cam_grid, window=self.cam_window, **self.par)
            mark("propagation")
        return {"cams": cams, "refined": refined, "propagated": propagated}

    def __call__(self, batch: dict, mark) -> None:
        images, labels, options = batch["image"], batch["labels"], self.options
        with autocast_context(images.device, self.amp):
            pseudo = self.pseudo_labels(batch, mark)
            class_logits, _, seg_logits, train_affinity = obvious_forward(self.network, images, images.shape[0])
            mark("forward")
            targets = ref.reference_affinity_labels(
                pseudo["refined"], self.train_grid, options.radius, window=self.train_window)
            loss = (ref.reference_multilabel_soft_margin_loss(class_logits.float(), labels)
                    + options.seg_weight * ref.reference_balanced_segmentation_loss(seg_logits.float(), pseudo["propagated"])
                    + options.aff_weight * ref.reference_affinity_loss(train_affinity.float(), targets))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        mark("losses_backward")
        self.optimizer.step()
        mark("optimizer")


def measure_worker(setting: str, implementation: str, iterations: int, device_name: str, amp: bool,
                   batch_size: int | None = None, crop: int | None = None, profile: bool = False) -> dict:
    """Times ``iterations`` steps (after a warm-up) of one implementation; runs in its own process.
    ``batch_size`` and ``crop`` replace the setting's (a smoke test's small sizes); ``profile``
    adds :func:`profile_iteration`'s counts (after the timed steps and the peak memory)."""
    device = torch.device(device_name)
    cfg = compose_setting(setting)
    _, classes = SETTINGS[setting]
    torch.manual_seed(0)
    network = build_network(cfg.model, classes).to(device).train()
    optimizer, _ = build_optimizer_from_config(network, cfg.optimizer, int(cfg.train.max_iters))
    options = AFAOptions.from_config(cfg.method)
    crop = crop or int(cfg.dataset.crop_size)
    batch_size = batch_size or int(cfg.train.batch_size)
    batch = synthetic_batch(batch_size, crop, classes, device)
    step = (AFAIteration(network, optimizer, options, amp) if implementation == "afa"
            else StraightforwardIteration(network, optimizer, options, amp, crop))
    timer = PhaseTimer(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    per_phase: dict[str, list[float]] = {phase: [] for phase in PHASES}
    totals = []
    for index in range(iterations + 1):
        timer.start(True)
        start = time.perf_counter()
        step(batch, timer.mark)
        if index == 0:
            continue  # warm-up: allocator, kernels, caches
        totals.append(time.perf_counter() - start)
        for phase in PHASES:
            per_phase[phase].append(timer.times.get(phase, 0.0))
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    seconds = statistics.median(totals)
    profiled = profile_iteration(step, batch, device) if profile else None
    if profiled is not None:
        profiled["achieved_tflops"] = profiled["flops"] / seconds / 1e12
    return {"setting": setting, "implementation": implementation, "iterations": iterations, "profile": profiled,
            "crop": crop, "batch_size": batch_size, "backbone": str(cfg.model.backbone),
            "cam_scales": list(options.cam_scales), "seconds": seconds,
            "phases": {phase: statistics.median(values) for phase, values in per_phase.items()},
            "peak_memory_bytes": peak, "peak_memory_kind": "allocated" if device.type == "cuda" else "process RSS"}


def counted_flops(step, batch: dict) -> int:
    """FLOPs of one iteration by ``FlopCounterMode``, with sparse products (the windowed random
    walk's CSR transition) counted by their stored entries, 2·nnz·columns, not as dense."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    correction = [0]

    class SparseProducts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.mm.default and args[0].layout != torch.strided:
                sparse, dense = args[0], args[1]
                as_dense = 2 * sparse.shape[0] * sparse.shape[1] * dense.shape[1]
                correction[0] += 2 * sparse._nnz() * dense.shape[1] - as_dense
            return func(*args, **(kwargs or {}))

    counter = FlopCounterMode(display=False)
    with counter, SparseProducts():
        step(batch, lambda phase: None)
    return int(counter.get_total_flops()) + correction[0]


SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy ", "cudaMemcpyAsync")


def profile_iteration(step, batch: dict, device: torch.device, top: int = 12) -> dict:
    """FLOPs of one iteration, then one iteration under the profiler: the operators with the
    most self time (device time on CUDA), kernel launches and host synchronisations."""
    from torch.profiler import ProfilerActivity, profile

    def ignore(phase: str) -> None:
        return None

    flops = counted_flops(step, batch)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step(batch, ignore)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    device_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    ranked = sorted(events, key=lambda e: getattr(e, device_key, 0.0), reverse=True)[:top]
    total = sum(getattr(e, device_key, 0.0) for e in events) or 1.0
    return {
        "flops": flops,
        "time_kind": "device self time" if device.type == "cuda" else "CPU self time",
        "top_ops": [{"name": e.key, "calls": int(e.count), "ms": getattr(e, device_key, 0.0) / 1e3,
                     "share": getattr(e, device_key, 0.0) / total} for e in ranked],
        "kernel_launches": int(sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                                         "cudaLaunchKernelExC", "cuLaunchKernelEx"))),
        "host_syncs": int(sum(e.count for e in events if e.key.startswith(SYNC_EVENTS))),
    }


def run_worker_process(setting: str, implementation: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", setting, implementation, "--iterations", str(args.iterations),
               "--device", args.device] + (["--amp"] if args.amp else []) + (["--profile"] if args.profile else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"error: {' '.join(command)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_setting(rows: list[dict]) -> None:
    first = rows[0]
    print(f"\n{first['setting']}: {first['backbone']}, {first['crop']}×{first['crop']}, batch {first['batch_size']}, "
          f"CAM scales {' / '.join(f'{s:g}' for s in first['cam_scales'])}; median of {first['iterations']} iterations")
    names = [row["implementation"] for row in rows]
    print("| phase | " + " | ".join(f"{name} s" for name in names) + (" | ratio |" if len(rows) == 2 else " |"))
    print("|---|" + "---|" * (len(rows) + (len(rows) == 2)))
    for phase in (*PHASES, "iteration"):
        values = [row["seconds"] if phase == "iteration" else row["phases"][phase] for row in rows]
        cells = " | ".join(f"{value:.3f}" for value in values)
        ratio = f" | {values[1] / values[0]:.1f}× |" if len(rows) == 2 and values[0] > 0 else (" | - |" if len(rows) == 2 else " |")
        print(f"| {'**iteration**' if phase == 'iteration' else phase} | {cells}{ratio}")
    memory = " | ".join(f"{row['peak_memory_bytes'] / 2**30:.2f}" for row in rows)
    ratio = f" | {rows[1]['peak_memory_bytes'] / rows[0]['peak_memory_bytes']:.2f}× |" if len(rows) == 2 else " |"
    print(f"| peak memory GiB ({first['peak_memory_kind']}) | {memory}{ratio}")


def print_profile(row: dict, peak_tflops: float | None) -> None:
    profiled = row["profile"]
    utilisation = (f", {profiled['achieved_tflops'] / peak_tflops:.1%} of {peak_tflops:g} TFLOP/s"
                   if peak_tflops else "")
    print(f"\n{row['setting']} {row['implementation']}: {profiled['flops'] / 1e9:.1f} GFLOP per iteration, "
          f"{profiled['achieved_tflops']:.2f} TFLOP/s achieved{utilisation}; "
          f"{profiled['kernel_launches']} kernel launches, {profiled['host_syncs']} host synchronisations")
    print(f"| operator | calls | ms ({profiled['time_kind']}) | share |")
    print("|---|---|---|---|")
    for op in profiled["top_ops"]:
        print(f"| {op['name']} | {op['calls']} | {op['ms']:.1f} | {op['share']:.1%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--configs", nargs="+", default=["voc", "tiny"], choices=sorted(SETTINGS))
    parser.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast, as train.amp (CUDA; CPU where it has native bf16)")
    parser.add_argument("--eval-images", type=int, default=12, help="images per evaluation preset; 0 skips")
    parser.add_argument("--eval-root", type=Path, default=None, help="VOC-layout photos (default: voc-sample)")
    parser.add_argument("--profile", action="store_true", help="FLOPs, top operators, launches, syncs (slower)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for the utilisation")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "speed.json")
    parser.add_argument("--worker", nargs=2, metavar=("SETTING", "IMPLEMENTATION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        print(json.dumps(measure_worker(*args.worker, args.iterations, args.device, args.amp, profile=args.profile)))
        return

    device = args.device
    environment = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda")
        else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "amp": args.amp,
    }
    print(f"{environment['device']}, torch {environment['torch']}{', bf16 autocast' if args.amp else ''}")
    results: dict = {"environment": environment, "iterations": [], "evaluation": []}
    for setting in args.configs:
        rows = [run_worker_process(setting, implementation, args) for implementation in args.implementations]
        results["iterations"].extend(rows)
        print_setting(rows)
        for row in rows:
            if row["profile"] is not None:
                print_profile(row, args.peak_tflops)
    if args.eval_images > 0:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from eval_speed import DEFAULT_ROOT, measure_presets, print_table

        model = "mit_b1"
        rows = measure_presets(args.eval_root or DEFAULT_ROOT, model=model, presets=["ss", "ms", "ms_crf"], max_images=args.eval_images,
                               batch_size=4, device=device, amp=args.amp)
        results["evaluation"] = rows
        print(f"\nevaluation ({model}, random weights, voc-sample photos, long side 512):")
        print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Pretrain the tiny MiT on the synthetic prior, standing in for ImageNet (docs/synthetic.md).

Trains the tiny MiT (the synthetic experiment's strides) with a SegFormer head on fully
supervised segmentation of the prior's shape families (``afa.data.synthetic_prior``: its
own seed space and classes, no marks, never the benchmark's images), plus the multi-label
classification loss; with ``--aff-weight`` > 0 also AFA's affinity loss (AFA.md §6) on the
attention of the last two blocks against the ground-truth pairs, which makes the attention
group whole regions (measured: it made AFA's learned affinity worse, docs/synthetic.md).
``--colour-weight`` adds a loss that reads each last-stage cell's mean input colour back from
its features, so that colour, which segmenting shape families does not need, stays in them.
``--style parts`` pretrains on objects of two differently coloured, partly saturated sides
instead (measured: AFA from it is worse than from the shipped plain-style prior).
``--logit-rms-max`` bounds the root mean square of the last blocks' attention logits, the ones
AFA's affinity projects (measured with ``--colour-weight 1``: the best CAM of any start, but
the learned affinity still drops some classes' marks; docs/synthetic.md).
Writes the encoder alone in the SegFormer ``mit_*.pth`` key layout (float16), loadable by
``model.pretrained``, and a JSON record beside it (command, metrics on the prior's own
validation images, time). Resumable: a checkpoint is kept in ``--work-dir``.

    python benchmarks/pretrain_tiny.py                      # writes weights/mit_tiny_synthetic_prior.pth
    python benchmarks/pretrain_tiny.py --iterations 20 --val-images 16 --out /tmp/prior.pth   # smoke run
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from afa.data.loaders import build_loader  # noqa: E402
from afa.data.synthetic_prior import NUM_PRIOR_CLASSES, PRIOR_STYLES, PRIOR_VAL_OFFSET, SyntheticPriorDataset  # noqa: E402
from afa.engine.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from afa.engine.optim import poly_warmup_multiplier  # noqa: E402
from afa.metrics import AffinityRecall, ConfusionMatrix  # noqa: E402
from afa.models.mit import AttentionFactors  # noqa: E402
from afa.models.network import AFANetwork, build_afa_network  # noqa: E402
from afa.ops import affinity_labels_from_segmentation, affinity_loss, multilabel_soft_margin_loss  # noqa: E402

DEFAULT_OUT = ROOT / "weights" / "mit_tiny_synthetic_prior.pth"
# Options a resumed run must share with the interrupted one.
RESUME_KEYS = ("iterations", "batch_size", "lr", "weight_decay", "warmup", "aff_weight", "radius", "strides", "seed",
               "style", "colour_weight", "logit_rms_max")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--aff-weight", type=float, default=0.0,
                        help="weight of an affinity loss on the attention against the ground-truth pairs (0: "
                             "segmentation only, the shipped prior's setting; docs/synthetic.md measures 1)")
    parser.add_argument("--radius", type=int, default=None,
                        help="affinity window radius on the grid (default: the whole grid, every pair)")
    parser.add_argument("--style", choices=PRIOR_STYLES, default="plain",
                        help="the prior images' style (afa.data.synthetic_prior): plain, the shipped prior's, or "
                             "parts, objects of differently coloured sides")
    parser.add_argument("--colour-weight", type=float, default=0.0,
                        help="weight of an auxiliary loss that reads each last-stage cell's mean input colour "
                             "back from its features (a 1x1 conv, MSE), keeping colour in the deepest features "
                             "(0: off, the shipped prior's setting; docs/synthetic.md measures 1)")
    parser.add_argument("--logit-rms-max", type=float, default=None,
                        help="penalise the last blocks' attention logits q k^T (those AFA's affinity projects) "
                             "by (rms - this)^2 where their root mean square exceeds it, so that the prior does "
                             "not saturate the affinity's sigmoid (off by default, the shipped prior's setting)")
    parser.add_argument("--strides", type=int, nargs=4, default=[4, 2, 1, 1], help="the synthetic experiment's")
    parser.add_argument("--val-images", type=int, default=500)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "pretrain_tiny")
    return parser.parse_args(argv)


def affinity_targets(masks: torch.Tensor, network: AFANetwork, radius: int | None) -> torch.Tensor:
    """Ground-truth pairs (B, N, N) on the last stage's grid: 1 same family, 0 not, 255 ignored."""
    grid = network.affinity_grid(*masks.shape[-2:])
    return affinity_labels_from_segmentation(masks, grid, radius=max(grid) if radius is None else radius)


def colour_loss(head: nn.Module, last_features: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """MSE between ``head`` on the last stage (B, D, h, w) and each cell's mean input colour
    (the normalised images (B, 3, H, W) average-pooled to h × w)."""
    return F.mse_loss(head(last_features), F.adaptive_avg_pool2d(images, last_features.shape[-2:]))


def logit_rms(attention: AttentionFactors) -> torch.Tensor:
    """Root mean square of the attention logits q kᵀ (n, M, N, N) that AFA's affinity projects,
    without forming them: per map ‖q kᵀ‖²_F = ⟨qᵀq, kᵀk⟩_F."""
    queries, keys = attention.queries, attention.keys
    squares = ((queries.transpose(-2, -1) @ queries) * (keys.transpose(-2, -1) @ keys)).sum(dim=(-2, -1))
    return (squares.mean() / (queries.shape[-2] * keys.shape[-2])).sqrt()


def losses(network: AFANetwork, batch: dict[str, torch.Tensor], aff_weight: float, radius: int | None,
           colour_head: nn.Module | None = None, colour_weight: float = 0.0,
           logit_rms_max: float | None = None) -> dict[str, torch.Tensor]:
    """Segmentation CE + classification + aff_weight · affinity loss (+ colour_weight · colour
    loss with a ``colour_head``; + (rms − logit_rms_max)² where the last blocks' attention
    logits' root mean square exceeds ``logit_rms_max``) of one batch."""
    images = batch["image"]
    with_attention = aff_weight > 0 or logit_rms_max is not None
    features, attention = network.encoder(images, attention_images=images.shape[0] if with_attention else 0)
    logits = F.interpolate(network.decoder(features), size=batch["mask"].shape[-2:], mode="bilinear",
                           align_corners=False)
    seg = F.cross_entropy(logits, batch["mask"], ignore_index=255)
    cls = multilabel_soft_margin_loss(network.classifier(network.pool(features[-1])).flatten(1), batch["labels"])
    result = {"seg_loss": seg, "cls_loss": cls, "loss": seg + cls}
    if aff_weight > 0:
        aff, _ = affinity_loss(network.attn_proj(attention), affinity_targets(batch["mask"], network, radius))
        result["aff_loss"] = aff
        result["loss"] = result["loss"] + aff_weight * aff
    if colour_head is not None:
        result["colour_loss"] = colour_loss(colour_head, features[-1], images)
        result["loss"] = result["loss"] + colour_weight * result["colour_loss"]
    if logit_rms_max is not None:
        result["logit_rms"] = logit_rms(attention)
        result["loss"] = result["loss"] + F.relu(result["logit_rms"] - logit_rms_max).square()
    return result


@torch.no_grad()
def evaluate(network: AFANetwork, loader, device: torch.device, radius: int | None,
             with_affinity: bool) -> dict[str, float]:
    """Segmentation mIoU on the prior's validation images, and the attention affinity's
    recall when the affinity was trained (an untrained projection's would mean nothing)."""
    network.eval()
    matrix, recall = ConfusionMatrix(NUM_PRIOR_CLASSES + 1), AffinityRecall()
    for batch in loader:
        images, masks = batch["image"].to(device), batch["mask"].to(device)
        output = network(images, with_affinity=with_affinity)
        logits = F.interpolate(output.seg_logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
        matrix.update(logits.argmax(1), masks)
        if with_affinity:
            recall.update(output.affinity, affinity_targets(masks, network, radius))
    network.train()
    affinity = {k: recall.compute()[k] for k in ("positive_recall", "negative_recall")} if with_affinity else {}
    return {"miou": float(matrix.compute()["miou"]), **affinity}


def parameter_groups(modules: list[nn.Module], weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices and kernels only (not on biases and norms)."""
    parameters = [p for module in modules for p in module.parameters()]
    decay = [p for p in parameters if p.ndim >= 2]
    no_decay = [p for p in parameters if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    network = build_afa_network("tiny", NUM_PRIOR_CLASSES, strides=tuple(args.strides)).to(device).train()
    # The colour readout trains with the encoder and is dropped with the other heads.
    colour_head = nn.Conv2d(network.classifier.weight.shape[1], 3, 1).to(device) if args.colour_weight > 0 else None
    trained = [network] if colour_head is None else [network, colour_head]
    optimizer = torch.optim.AdamW(parameter_groups(trained, args.weight_decay), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: poly_warmup_multiplier(step, args.iterations, args.warmup))
    checkpoint_path = args.work_dir / "last.pt"
    state = load_checkpoint(checkpoint_path) if checkpoint_path.is_file() else None
    if state is not None and any(state["args"].get(key) != getattr(args, key) for key in RESUME_KEYS):
        raise SystemExit(f"{checkpoint_path} was written with other options ({', '.join(RESUME_KEYS)}): "
                         "delete it or pass another --work-dir")
    start = state["iteration"] if state is not None else 0
    # Image i of the stream is always image i: a resumed run sees the images the interrupted one would have.
    train = SyntheticPriorDataset(start=start * args.batch_size, length=(args.iterations - start) * args.batch_size,
                                  style=args.style)
    val = SyntheticPriorDataset(start=PRIOR_VAL_OFFSET, length=args.val_images, style=args.style)
    train_loader = build_loader(train, batch_size=args.batch_size, num_workers=args.workers, persistent_workers=False)
    val_loader = build_loader(val, batch_size=32, num_workers=args.workers, persistent_workers=False)
    batches = iter(train_loader)  # before the RNG is restored: creating it draws from torch's RNG
    elapsed, history = 0.0, []
    if state is not None:
        network.load_state_dict(state["network"])
        if colour_head is not None:
            colour_head.load_state_dict(state["colour_head"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])  # stochastic depth draws as in an uninterrupted run
        elapsed, history = state["elapsed"], state["history"]
        print(f"resumed from {checkpoint_path} at iteration {start}")

    iteration, started = start, time.perf_counter() - elapsed
    progress = tqdm(batches, total=args.iterations, initial=start, desc="pretrain", dynamic_ncols=True, mininterval=10)
    for batch in progress:
        batch = {key: value.to(device) for key, value in batch.items()}
        terms = losses(network, batch, args.aff_weight, args.radius, colour_head, args.colour_weight,
                       args.logit_rms_max)
        if not torch.isfinite(terms["loss"]):
            raise SystemExit(f"non-finite loss at iteration {iteration}: lower --lr")
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        scheduler.step()
        iteration += 1
        progress.set_postfix({key: f"{value.item():.3f}" for key, value in terms.items()})
        if iteration % args.eval_every == 0 or iteration == args.iterations:
            metrics = evaluate(network, val_loader, device, args.radius, with_affinity=args.aff_weight > 0)
            history.append({"iteration": iteration, **metrics})
            progress.write(f"iteration {iteration}: prior val mIoU {metrics['miou']:.3f}" + (
                f" | affinity recall positive {metrics['positive_recall']:.3f} negative {metrics['negative_recall']:.3f}"
                if "positive_recall" in metrics else ""))
        if iteration % args.checkpoint_every == 0 and iteration < args.iterations:
            save_checkpoint(checkpoint_path, {
                "network": network.state_dict(), "optimizer": optimizer.state_dict(),
                **({} if colour_head is None else {"colour_head": colour_head.state_dict()}),
                "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(), "iteration": iteration,
                "elapsed": time.perf_counter() - started, "history": history,
                "args": {key: getattr(args, key) for key in RESUME_KEYS},
            })
    progress.close()
    encoder = {key: value.half() for key, value in network.encoder.state_dict().items()}
    save_checkpoint(args.out, encoder)
    record = {
        "weights": args.out.name,
        "command": " ".join(["python benchmarks/pretrain_tiny.py", *(sys.argv[1:] if argv is None else argv)]),
        "commit": git_commit(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {device}",
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "images_seen": args.iterations * args.batch_size,
        "prior_val": history[-1] if history else None,
        "history": history,
    }
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    checkpoint_path.unlink(missing_ok=True)
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB) and {args.out.with_suffix('.json').name}; "
          f"prior val mIoU {record['prior_val']['miou']:.3f}" if history else f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()

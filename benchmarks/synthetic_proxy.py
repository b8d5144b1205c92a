"""Offline look at where AFA's refinements gain or lose on the synthetic benchmark.

Loads a trained AFA checkpoint (tiny MiT, e.g. runs/<name>/checkpoints/last.pt) and
generates synthetic images in memory with any ``SyntheticSpec`` overrides, so a generator
idea can be tried on a network trained on another variant. Reports on those images:

- the four validation numbers of AFA.md §10 (classification F1; CAM, propagated-CAM and
  segmentation mIoU), computed as the trainer's validation computes them;
- the PAR-refined CAM label (AFA.md §5) with both thresholds at the evaluation's bkg_score
  0.45 ("PAR@0.45", ignore-free, comparable to the CAM label), and AFA's training label
  (τ = 0.55 / 0.35) scored on its non-ignored pixels, with the ignored share;
- per object, from the generator's internal instance and mark maps: the share of each
  zone that the CAM label and the PAR label give the object's class — the mark core, the
  band around it (within --band mark radii), the rest of the body — and the false
  positives in the background near objects (within 12 px) and far from them.

    python benchmarks/synthetic_proxy.py runs/NAME/checkpoints/last.pt --num 300
    python benchmarks/synthetic_proxy.py CKPT --spec '{"mark_tint": 1.5}' --dump /tmp/proxy
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from afa.data.datasets import labels_to_multi_hot  # noqa: E402
from afa.data.synthetic import NUM_SYNTHETIC_CLASSES, _render, as_spec, image_seed  # noqa: E402
from afa.data.transforms import normalize_to_tensor  # noqa: E402
from afa.engine.builders import build_network  # noqa: E402
from afa.engine.checkpoint import load_checkpoint  # noqa: E402
from afa.engine.evaluator import predict_afa_batch_with_cams  # noqa: E402
from afa.metrics import ConfusionMatrix, MultiLabelCounts  # noqa: E402
from afa.engine.afa_step import resolve_propagation  # noqa: E402
from afa.engine.predict import propagate_label  # noqa: E402
from afa.ops import affinity_labels_from_segmentation, local_window_mask, refine_cams_with_par  # noqa: E402

ZONES = ("core", "band", "rest of body", "background near", "background far")


def load_network(path: str) -> tuple[torch.nn.Module, DictConfig]:
    """The network of the run that saved ``path`` and that run's method config; a missing or
    unreadable file is a one-line exit."""
    if not Path(path).is_file():
        raise SystemExit(f"error: checkpoint {path} does not exist: give a train.py checkpoint "
                         "(runs/<run>/checkpoints/last.pt)")
    try:
        checkpoint = load_checkpoint(path)
    except (RuntimeError, TypeError) as error:
        raise SystemExit(f"error: {error}") from None
    return network_from_checkpoint(checkpoint)


def network_from_checkpoint(checkpoint: dict) -> tuple[torch.nn.Module, DictConfig]:
    """The network a loaded ``train.py`` checkpoint holds, in eval mode, and its method config."""
    config = OmegaConf.create(checkpoint["config"])
    config.model.pretrained = None  # the checkpoint holds every weight
    network = build_network(config.model, NUM_SYNTHETIC_CLASSES)
    network.load_state_dict(checkpoint["model"])
    return network.eval(), config.method


def oracle_affinity(chunk: list[dict], grid: tuple[int, int]) -> torch.Tensor:
    """P = 0.95 between nodes of the same object (or both background), else 0.05."""
    instances = torch.stack([torch.from_numpy(s["parts"]["instances"].astype(np.int64)) for s in chunk])
    nodes = F.interpolate(instances[:, None].float(), size=grid, mode="nearest").flatten(1).long()
    return torch.where(nodes[:, :, None] == nodes[:, None, :], 0.95, 0.05)


def label_affinity(learned: torch.Tensor, train_label: torch.Tensor, grid: tuple[int, int], radius: int) -> torch.Tensor:
    """(B, N, N): 0.95 / 0.05 where the affinity labels of ``train_label`` (B, H, W) say same /
    different (AFA.md §6, window ``radius`` on ``grid``), the learned P (B, N, N) where they are ignored."""
    targets = affinity_labels_from_segmentation(train_label, grid, radius=radius)
    return torch.where(targets == 255, learned, torch.where(targets == 1, 0.95, 0.05))


PAIR_KINDS = ("mark-mark", "mark-body", "mark-background", "body-background")


def mark_pair_means(chunk: list[dict], learned: torch.Tensor, grid: tuple[int, int], radius: int,
                    sums: np.ndarray) -> None:
    """Adds, per class, the learned P (B, N, N) summed over the window's pairs of each kind
    (``PAIR_KINDS``, between one object's nodes and its own mark's or the background's) and
    their count to ``sums`` (classes + 1, kinds, 2); nodes sample the maps nearest."""
    window = local_window_mask(grid[0], grid[1], radius, learned.device)
    for row, sample in enumerate(chunk):
        maps = torch.from_numpy(np.stack([sample["parts"]["marks"], sample["parts"]["instances"]]).astype(np.float32))
        marks, instances = F.interpolate(maps[None], size=grid, mode="nearest")[0].flatten(1).long()
        background = instances == 0
        for obj, cls in enumerate(sample["parts"]["classes"], start=1):
            mark, body = marks == obj, (instances == obj) & (marks != obj)
            for kind, (first, second) in enumerate(((mark, mark), (mark, body), (mark, background), (body, background))):
                pairs = window & first[:, None] & second[None, :]
                sums[cls, kind] += (float(learned[row][pairs].sum()), int(pairs.sum()))


def zone_counts(sample: dict, cam_label: np.ndarray, par_label: np.ndarray, band: float) -> np.ndarray:
    """(5 zones, [pixels, CAM hits, PAR hits]); a hit is the object's class (object zones)
    or any foreground (background zones: false positives)."""
    parts, mask = sample["parts"], sample["image"].mask
    counts = np.zeros((len(ZONES), 3))
    for obj, cls in enumerate(parts["classes"], start=1):
        body = (parts["instances"] == obj) & (mask != 255)
        mark = parts["marks"] == obj
        if not mark.any():
            continue
        distance = cv2.distanceTransform((~mark).astype(np.uint8), cv2.DIST_L2, 5)
        radius = np.sqrt(mark.sum() / np.pi)
        core = body & mark
        near = body & ~mark & (distance <= band * radius)
        for zone, where in enumerate((core, near, body & ~mark & ~near)):
            counts[zone] += (where.sum(), (cam_label[where] == cls).sum(), (par_label[where] == cls).sum())
    background = mask == 0
    grown = cv2.dilate((parts["instances"] > 0).astype(np.uint8), np.ones((25, 25), np.uint8)) > 0
    for zone, where in ((3, background & grown), (4, background & ~grown)):
        counts[zone] += (where.sum(), (cam_label[where] > 0).sum(), (par_label[where] > 0).sum())
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--num", type=int, default=300, help="images (from index 0)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spec", default="{}", help="JSON overrides of SyntheticSpec fields")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--band", type=float, default=1.0, help="width of the band zone, in mark radii")
    parser.add_argument("--oracle-affinity", action="store_true",
                        help="propagate with a perfect affinity (same object on the stage-4 grid)")
    parser.add_argument("--label-affinity", action="store_true",
                        help="also propagate with the affinity AFA's labels ask for: P = 0.95 / 0.05 on the pairs "
                             "the PAR training label (0.55 / 0.35) calls same / different, the network's own P on "
                             "the pairs it ignores (a projection that fits its labels perfectly)")
    parser.add_argument("--mark-pairs", action="store_true",
                        help="print the learned P per class: mean over the window's mark-mark, mark-body, "
                             "mark-background and body-background pairs of each object")
    parser.add_argument("--classes", help="only images whose classes all lie in this comma list")
    parser.add_argument("--dump", type=Path, help="write image | CAM | CAM, PAR, propagated, seg labels | GT")
    parser.add_argument("--dump-count", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = as_spec(json.loads(args.spec))
    started = time.perf_counter()
    network, method = load_network(args.checkpoint)
    scales = tuple(method.cam.scales)
    data = []
    for index in range(args.num):
        image, parts = _render(image_seed(args.seed, args.split, index), spec)
        data.append({"image": image, "parts": parts, "index": index})
    if args.classes:
        allowed = {int(c) for c in args.classes.split(",")}
        data = [s for s in data if set(s["image"].classes) <= allowed]
    by_size: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for sample in data:
        by_size[sample["image"].mask.shape].append(sample)

    shown = ("cam", "par", "propagated", "segmentation", *(("label_propagated",) if args.label_affinity else ()))
    names = ("par_train", *shown)
    matrices = {name: ConfusionMatrix(NUM_SYNTHETIC_CLASSES + 1) for name in names}
    classification = MultiLabelCounts(NUM_SYNTHETIC_CLASSES)
    ignored, counted, dumped = 0, 0, 0
    zones = np.zeros((len(ZONES), 3))
    pair_sums = np.zeros((NUM_SYNTHETIC_CLASSES + 1, len(PAIR_KINDS), 2))
    radius = int(method.affinity.radius)
    with torch.no_grad():
        for size, group in sorted(by_size.items()):
            for start in range(0, len(group), args.batch):
                chunk = group[start:start + args.batch]
                images = torch.stack([normalize_to_tensor(s["image"].image) for s in chunk])
                masks = torch.stack([torch.from_numpy(s["image"].mask.astype(np.int64)) for s in chunk])
                labels = torch.stack([labels_to_multi_hot(s["image"].classes, NUM_SYNTHETIC_CLASSES) for s in chunk])
                oracle = oracle_affinity(chunk, network.affinity_grid(*size)) if args.oracle_affinity else None
                logits, predictions, cams = predict_afa_batch_with_cams(
                    network, images, labels, size, scales, float(method.cam.bkg_score),
                    float(method.affinity.propagation_bkg_score), int(method.affinity.radius), affinity=oracle)
                classification.update(logits, labels)
                boxes = torch.tensor([[0, size[0], 0, size[1]]] * len(chunk))
                predictions["par"] = refine_cams_with_par(images, cams, labels, boxes, thresholds=(0.45, 0.45))
                train_label = refine_cams_with_par(images, cams, labels, boxes, thresholds=(0.55, 0.35))
                is_ignored = train_label == 255
                ignored += int((is_ignored & (masks != 255)).sum())
                counted += int((masks != 255).sum())
                predictions["par_train"] = torch.where(is_ignored, 0, train_label)
                if args.label_affinity or args.mark_pairs:
                    learned = network(images, with_segmentation=False).affinity
                    grid = network.affinity_grid(*size)
                if args.label_affinity:
                    predictions["label_propagated"] = propagate_label(
                        network, images, cams, labels, label_affinity(learned, train_label, grid, radius),
                        float(method.affinity.propagation_bkg_score), radius, resolve_propagation("auto", images.device))
                if args.mark_pairs:
                    mark_pair_means(chunk, learned, grid, radius, pair_sums)
                for name, prediction in predictions.items():
                    target = torch.where(is_ignored, 255, masks) if name == "par_train" else masks
                    matrices[name].update(prediction, target)
                for row, sample in enumerate(chunk):
                    cam_label, par_label = predictions["cam"][row].numpy(), predictions["par"][row].numpy()
                    zones += zone_counts(sample, cam_label, par_label, args.band)
                    if args.dump is not None and dumped < args.dump_count:
                        heat = (cams[row] * labels[row, :, None, None]).amax(0)
                        dump_picture(args.dump, sample, predictions, row, heat)
                        dumped += 1
    results = {name: matrix.compute() for name, matrix in matrices.items()}
    f1 = classification.compute()
    print(f"spec overrides: {args.spec}   CAM scales: {list(scales)}   images: {len(data)}   "
          f"({time.perf_counter() - started:.0f} s)")
    print(f"cls F1 {f1['f1']:.3f} | CAM {results['cam']['miou']:.3f} | PAR@0.45 {results['par']['miou']:.3f} | "
          f"PAR training label {results['par_train']['miou']:.3f} (ignored {ignored / max(1, counted):.0%}) | "
          f"propagated {results['propagated']['miou']:.3f} | segmentation {results['segmentation']['miou']:.3f}"
          + (f" | propagated with the labels' affinity {results['label_propagated']['miou']:.3f}"
             if args.label_affinity else ""))
    print("  classification F1 per class: " + " ".join(f"{v:.2f}" for v in f1["per_class_f1"]))
    for name in shown:
        iou = results[name]["iou"]
        print(f"  {name:13s} IoU per class: " + " ".join("-" if np.isnan(v) else f"{v:.2f}" for v in iou))
    print(f"  zone (band = {args.band} mark radii)   pixels   CAM label   PAR@0.45   (object zones: share given the"
          " object's class; background: false-positive share)")
    for name, (pixels, cam_hits, par_hits) in zip(ZONES, zones):
        print(f"    {name:16s} {int(pixels):9d}   {cam_hits / max(pixels, 1):.3f}     {par_hits / max(pixels, 1):.3f}")
    if args.mark_pairs:
        print(f"  learned P, mean over the window's pairs (r = {radius}), per class: " + " | ".join(PAIR_KINDS))
        for cls in range(1, NUM_SYNTHETIC_CLASSES + 1):
            means = [f"{total / count:.2f}" if count else "-" for total, count in pair_sums[cls]]
            print(f"    class {cls}: " + " | ".join(means))


def dump_picture(folder: Path, sample: dict, predictions: dict, row: int, heat: torch.Tensor) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    gray = np.repeat((heat.numpy() * 255).astype(np.uint8)[..., None], 3, axis=-1)
    panels = [sample["image"].image, gray]
    panels += [colorize(predictions[name][row].numpy()) for name in ("cam", "par", "propagated", "segmentation")]
    panels.append(colorize(sample["image"].mask))
    Image.fromarray(np.concatenate(panels, axis=1)).save(folder / f"{sample['index']:04d}.png")


PALETTE = np.array([[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128], [128, 0, 128],
                    [0, 128, 128], [128, 128, 128], [64, 0, 0]], np.uint8)


def colorize(mask: np.ndarray) -> np.ndarray:
    out = np.full(mask.shape + (3,), 255, np.uint8)
    inside = mask < len(PALETTE)
    out[inside] = PALETTE[mask[inside]]
    return out


if __name__ == "__main__":
    main()

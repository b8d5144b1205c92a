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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from afa.data.synthetic import NUM_SYNTHETIC_CLASSES, _render, as_spec, image_seed  # noqa: E402
from afa.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from afa.metrics import ConfusionMatrix, MultiLabelCounts  # noqa: E402
from afa.models.network import build_afa_network  # noqa: E402
from afa.ops import (  # noqa: E402
    cam_to_label,
    multi_scale_cam,
    propagate_cams_for_evaluation,
    refine_cams_with_par,
)

ZONES = ("core", "band", "rest of body", "background near", "background far")


def load_network(path: str) -> tuple[torch.nn.Module, tuple[float, ...]]:
    """The network and the CAM scales of the run that saved ``path``."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    config = checkpoint.get("config", {})
    strides = tuple(config.get("model", {}).get("strides", (4, 2, 2, 1)))
    scales = tuple(config.get("method", {}).get("cam", {}).get("scales", (1.0, 0.5, 1.5)))
    network = build_afa_network(
        backbone="tiny", num_classes=NUM_SYNTHETIC_CLASSES, pooling="gmp", decoder_dim=256,
        drop_path_rate=0.1, strides=strides, pretrained=None)
    network.load_state_dict(checkpoint["model"])
    return network.eval(), scales


def to_tensor(image: np.ndarray) -> torch.Tensor:
    normalised = (image.astype(np.float32) - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    return torch.from_numpy(normalised.transpose(2, 0, 1).copy())


def predict(
    network, images: torch.Tensor, labels: torch.Tensor, scales: tuple[float, ...],
) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """As afa.engine.evaluator.predict_afa_batch (AFA.md §10), also returning the CAMs."""
    output = network(images)
    size = images.shape[-2:]
    segmentation = F.interpolate(output.seg_logits.float(), size=size, mode="bilinear", align_corners=False)
    cams, _ = multi_scale_cam(network.forward_cam, images, scales, with_affinity=False)
    stride = network.encoder.output_stride
    grid = (-(-size[0] // stride), -(-size[1] // stride))
    predictions = {
        "cam": cam_to_label(cams, labels, 0.45),
        "propagated": propagate_cams_for_evaluation(cams, labels, output.affinity, 0.35, 8, grid_size=grid),
        "segmentation": segmentation.argmax(dim=1),
    }
    return output.class_logits.float(), predictions, cams


def oracle_affinity(chunk: list[dict], grid: tuple[int, int]) -> torch.Tensor:
    """P = 0.95 between nodes of the same object (or both background), else 0.05."""
    instances = torch.stack([torch.from_numpy(s["parts"]["instances"].astype(np.int64)) for s in chunk])
    nodes = F.interpolate(instances[:, None].float(), size=grid, mode="nearest").flatten(1).long()
    return torch.where(nodes[:, :, None] == nodes[:, None, :], 0.95, 0.05)


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
    parser.add_argument("--classes", help="only images whose classes all lie in this comma list")
    parser.add_argument("--dump", type=Path, help="write image | CAM | CAM, PAR, propagated, seg labels | GT")
    parser.add_argument("--dump-count", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = as_spec(json.loads(args.spec))
    started = time.perf_counter()
    network, scales = load_network(args.checkpoint)
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

    names = ("cam", "par", "par_train", "propagated", "segmentation")
    matrices = {name: ConfusionMatrix(NUM_SYNTHETIC_CLASSES + 1) for name in names}
    classification = MultiLabelCounts(NUM_SYNTHETIC_CLASSES)
    ignored, counted, dumped = 0, 0, 0
    zones = np.zeros((len(ZONES), 3))
    with torch.no_grad():
        for size, group in sorted(by_size.items()):
            for start in range(0, len(group), args.batch):
                chunk = group[start:start + args.batch]
                images = torch.stack([to_tensor(s["image"].image) for s in chunk])
                masks = torch.stack([torch.from_numpy(s["image"].mask.astype(np.int64)) for s in chunk])
                labels = torch.zeros(len(chunk), NUM_SYNTHETIC_CLASSES)
                for row, s in enumerate(chunk):
                    labels[row, torch.tensor(s["image"].classes) - 1] = 1
                logits, predictions, cams = predict(network, images, labels, scales)
                if args.oracle_affinity:
                    stride = network.encoder.output_stride
                    grid = (-(-size[0] // stride), -(-size[1] // stride))
                    predictions["propagated"] = propagate_cams_for_evaluation(
                        cams, labels, oracle_affinity(chunk, grid), 0.35, 8, grid_size=grid)
                classification.update(logits, labels)
                boxes = torch.tensor([[0, size[0], 0, size[1]]] * len(chunk))
                predictions["par"] = refine_cams_with_par(images, cams, labels, boxes, thresholds=(0.45, 0.45))
                train_label = refine_cams_with_par(images, cams, labels, boxes, thresholds=(0.55, 0.35))
                is_ignored = train_label == 255
                ignored += int((is_ignored & (masks != 255)).sum())
                counted += int((masks != 255).sum())
                predictions["par_train"] = torch.where(is_ignored, 0, train_label)
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
          f"propagated {results['propagated']['miou']:.3f} | segmentation {results['segmentation']['miou']:.3f}")
    print("  classification F1 per class: " + " ".join(f"{v:.2f}" for v in f1["per_class_f1"]))
    for name in ("cam", "par", "propagated", "segmentation"):
        iou = results[name]["iou"]
        print(f"  {name:13s} IoU per class: " + " ".join("-" if np.isnan(v) else f"{v:.2f}" for v in iou))
    print(f"  zone (band = {args.band} mark radii)   pixels   CAM label   PAR@0.45   (object zones: share given the"
          " object's class; background: false-positive share)")
    for name, (pixels, cam_hits, par_hits) in zip(ZONES, zones):
        print(f"    {name:16s} {int(pixels):9d}   {cam_hits / max(pixels, 1):.3f}     {par_hits / max(pixels, 1):.3f}")


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

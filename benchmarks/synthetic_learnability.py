"""Sanity check of the synthetic benchmark: are the classes learnable, and where is the CAM?

Trains a small fully-convolutional classifier (stride 16 like AFA's stage 4, global max
pooling, multi-label soft margin loss) on fresh on-the-fly synthetic images, then on the
fixed val images reports classification exact match / F1, the CAM label mIoU of AFA.md
§4 (bkg_score 0.45), the share of ground-truth object pixels the CAM covers, and the mIoU
of the CAM refined by PAR (afa.ops, §5, both thresholds at 0.45) — the headroom PAR finds.

This is not the AFA trainer: it only sizes the benchmark (classes learnable from the marks,
CAM far from the full object extent).

    python benchmarks/synthetic_learnability.py --seconds 120 --device cuda
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

if importlib.util.find_spec("mmcv") is None:  # the generator never calls mmcv; allow machines without it
    sys.modules["mmcv"] = types.ModuleType("mmcv")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from afa.data.loaders import build_loader  # noqa: E402
from afa.data.synthetic import NUM_SYNTHETIC_CLASSES, SyntheticSpec, generate_split_image  # noqa: E402
from afa.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from afa.ops import refine_cams_with_par  # noqa: E402

CANVAS = 192


class PaddedSynthetic(Dataset):
    """Synthetic images zero-padded to 192×192 (no other augmentation)."""

    def __init__(self, split: str, length: int, spec: SyntheticSpec, seed: int = 0) -> None:
        self.split, self.length, self.spec, self.seed = split, length, spec, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        sample = generate_split_image(self.seed, self.split, index, self.spec)
        height, width = sample.mask.shape
        image = np.zeros((CANVAS, CANVAS, 3), np.float32)
        image[:height, :width] = (sample.image - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
        mask = np.full((CANVAS, CANVAS), 255, np.int64)
        mask[:height, :width] = sample.mask
        labels = np.zeros(NUM_SYNTHETIC_CLASSES, np.float32)
        labels[np.asarray(sample.classes) - 1] = 1
        return {"image": torch.from_numpy(image.transpose(2, 0, 1).copy()), "mask": torch.from_numpy(mask),
                "labels": torch.from_numpy(labels), "valid_box": torch.tensor([0, height, 0, width])}


def conv_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(True),
        nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(True),
    )


class SmallCamNet(nn.Module):
    """Stride-16 conv features (dims 32/64/128/256) + bias-free 1×1 classifier."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(conv_block(3, 32, 2), conv_block(32, 64, 2), conv_block(64, 128, 2),
                                      conv_block(128, 256, 2))
        self.classifier = nn.Conv2d(256, num_classes, 1, bias=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cams = self.classifier(self.features(images))  # (B, C, H/16, W/16)
        return cams.amax(dim=(2, 3)), cams


def _accumulate(confusion: torch.Tensor, masks: torch.Tensor, predicted: torch.Tensor) -> None:
    valid = (masks != 255) & (predicted != 255)
    confusion += torch.bincount(masks[valid] * confusion.shape[0] + predicted[valid],
                                minlength=confusion.numel()).view_as(confusion)


def _miou(confusion: torch.Tensor) -> tuple[float, float]:
    """(mIoU over all K classes, mean foreground IoU)."""
    intersection = confusion.diag().float()
    iou = intersection / (confusion.sum(0).float() + confusion.sum(1).float() - intersection).clamp(min=1)
    return float(iou.mean()), float(iou[1:].mean())


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[dict], device: str) -> dict:
    model.eval()
    num_labels = NUM_SYNTHETIC_CLASSES + 1
    cam_confusion = torch.zeros(num_labels, num_labels, dtype=torch.long, device=device)
    par_confusion = torch.zeros_like(cam_confusion)
    exact, true_pos, false_pos, false_neg, covered, object_pixels = 0, 0, 0, 0, 0, 0
    for batch in batches:
        images, masks, labels, boxes = (batch[key].to(device) for key in ("image", "mask", "labels", "valid_box"))
        logits, cams = model(images)
        predicted = (logits > 0).float()
        exact += int((predicted == labels).all(dim=1).sum())
        true_pos += int((predicted * labels).sum())
        false_pos += int((predicted * (1 - labels)).sum())
        false_neg += int(((1 - predicted) * labels).sum())
        cams = F.interpolate(F.relu(cams), size=images.shape[-2:], mode="bilinear", align_corners=False)
        cams = cams - cams.amin(dim=(2, 3), keepdim=True)
        cams = cams / (cams.amax(dim=(2, 3), keepdim=True) + 1e-5)
        valid_cams = cams * labels[:, :, None, None]  # AFA.md §4 with ground-truth labels
        score, best = valid_cams.max(dim=1)
        cam_labels = torch.where(score > 0.45, best + 1, torch.zeros_like(best))
        _accumulate(cam_confusion, masks, cam_labels)
        # PAR with both thresholds at bkg_score gives a full (ignore-free) label inside the box.
        par_labels = refine_cams_with_par(images, valid_cams, labels, boxes, thresholds=(0.45, 0.45))
        _accumulate(par_confusion, masks, par_labels)
        foreground = (masks != 255) & (masks > 0)
        object_pixels += int(foreground.sum())
        covered += int((foreground & (cam_labels == masks)).sum())
    cam_miou, cam_foreground = _miou(cam_confusion)
    par_miou, par_foreground = _miou(par_confusion)
    model.train()
    return {
        "exact_match": exact / sum(len(b["labels"]) for b in batches),
        "f1": 2 * true_pos / max(1, 2 * true_pos + false_pos + false_neg),
        "cam_miou": cam_miou, "cam_iou_foreground_mean": cam_foreground,
        "cam_object_pixel_recall": covered / max(1, object_pixels),
        "par_cam_miou": par_miou, "par_cam_iou_foreground_mean": par_foreground,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-val", type=int, default=500)
    parser.add_argument("--spec", default="{}", help="JSON overrides of SyntheticSpec fields")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)

    spec = SyntheticSpec(**json.loads(args.spec))
    val_loader = build_loader(PaddedSynthetic("val", args.num_val, spec), batch_size=100, num_workers=args.workers)
    val_batches = list(val_loader)
    train_loader = build_loader(PaddedSynthetic("train", 10**7, spec), batch_size=args.batch_size, shuffle=True,
                              num_workers=args.workers, drop_last=True)
    model = SmallCamNet(NUM_SYNTHETIC_CLASSES).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    checkpoints = {250, 500, 1000, 2000, 4000, 8000}
    history, start, step = [], time.perf_counter(), 0
    for batch in train_loader:
        logits, _ = model(batch["image"].to(args.device))
        loss = F.multilabel_soft_margin_loss(logits, batch["labels"].to(args.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        elapsed = time.perf_counter() - start
        if step in checkpoints or elapsed > args.seconds:
            result = {"step": step, "images_seen": step * args.batch_size, "seconds": round(elapsed, 1),
                      "loss": loss.item(), **evaluate(model, val_batches, args.device)}
            history.append(result)
            print(json.dumps(result), flush=True)
        if elapsed > args.seconds:
            break
    if args.output:
        args.output.write_text(json.dumps(history, indent=1))


if __name__ == "__main__":
    main()

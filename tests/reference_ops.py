"""Slow, obviously-correct per-image reference implementations of the AFA operators.

They follow AFA.md's formulas literally and the public reference code's structure: loops
over images, neighbours gathered one by one and stacked, present channels selected with
index_select, boolean-index masking. They never call afa.ops, so tests and
benchmarks/bench_ops.py can compare the batched operators against them.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IGN = 255
DIRECTIONS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
DILATIONS = (1, 2, 4, 8, 12, 24)


# --- random inputs ---------------------------------------------------------------------

def random_images(batch: int, height: int, width: int, seed: int) -> Tensor:
    """(B, 3, H, W) test images, 0–255."""
    generator = torch.Generator().manual_seed(seed)
    # Smooth regions plus noise, 0–255, so σ_I varies from small to large.
    coarse = torch.rand(batch, 3, height // 4 + 1, width // 4 + 1, generator=generator)
    smooth = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return 255 * (0.8 * smooth + 0.2 * torch.rand(batch, 3, height, width, generator=generator))


def random_labels_and_boxes(batch: int, classes: int, height: int, width: int, seed: int) -> tuple[Tensor, Tensor]:
    """Multi-hot labels (B, C) (first image background-only) and valid boxes (B, 4): the
    first the whole crop, the others random, odd offsets and sizes included, at least 2×2."""
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.rand(batch, classes, generator=generator) < 0.4).float()
    labels[0] = 0  # an image with background only
    labels[-1, :3] = 1
    boxes = [[0, height, 0, width]]  # full crop
    for _ in range(batch - 1):  # odd offsets and sizes, at least 2×2
        top = int(torch.randint(0, height // 3, (1,), generator=generator))
        left = int(torch.randint(0, width // 3, (1,), generator=generator))
        bottom = int(torch.randint(top + 2, height + 1, (1,), generator=generator))
        right = int(torch.randint(left + 2, width + 1, (1,), generator=generator))
        boxes.append([top, bottom, left, right])
    return labels, torch.tensor(boxes, dtype=torch.long)


# --- §3, §4 -------------------------------------------------------------------------------

def reference_multi_scale_cam(
    cam_fn: Callable[[Tensor, int], tuple[Tensor, Tensor | None]], images: Tensor,
    scales: Sequence[float],
) -> tuple[Tensor, Tensor]:
    """Per image: each scale's [image; flip] forward, upsample, max with the unflipped flip
    CAM, ReLU, sum over scales, per-class min-max. Affinity of the largest scale."""
    cams, affinities = [], []
    largest = scales.index(max(scales))
    with torch.no_grad():
        for i in range(images.shape[0]):
            image = images[i:i + 1]
            _, _, h, w = image.shape
            per_scale = []
            for s_index, s in enumerate(scales):
                x = image if s == 1.0 else F.interpolate(
                    image, size=(int(s * h), int(s * w)), mode="bilinear", align_corners=False)
                raw, affinity = cam_fn(torch.cat([x, x.flip(-1)], dim=0), 1 if s_index == largest else 0)
                raw = F.interpolate(raw, size=(h, w), mode="bilinear", align_corners=False)
                per_scale.append(F.relu(torch.max(raw[:1], raw[1:].flip(-1))))
                if s_index == largest:
                    affinities.append(affinity[:1])
            cam = torch.stack(per_scale).sum(0)
            cam = cam + F.adaptive_max_pool2d(-cam, (1, 1))
            cam = cam / (F.adaptive_max_pool2d(cam, (1, 1)) + 1e-5)
            cams.append(cam)
    return torch.cat(cams), torch.cat(affinities)


def reference_cam_to_label(cams: Tensor, labels: Tensor, bkg_score: float) -> Tensor:
    out = []
    for i in range(cams.shape[0]):
        valid = cams[i] * labels[i][:, None, None]
        score, index = valid.max(dim=0)
        label = index + 1
        label[score <= bkg_score] = 0
        out.append(label)
    return torch.stack(out)


def reference_cam_to_training_label(
    cams: Tensor, labels: Tensor, boxes: Tensor, high: float, low: float,
) -> Tensor:
    out = torch.full(cams.shape[:1] + cams.shape[2:], IGN, dtype=torch.long, device=cams.device)
    for i in range(cams.shape[0]):
        valid = cams[i] * labels[i][:, None, None]
        score, index = valid.max(dim=0)
        label = index + 1
        label[score <= high] = IGN
        label[score <= low] = 0
        t, b, l, r = boxes[i].tolist()
        out[i, t:b, l:r] = label[t:b, l:r]
    return out


# --- §5 PAR -------------------------------------------------------------------------------

def _neighbours(x: Tensor, dilations: Sequence[int]) -> Tensor:
    """(1, c, h, w) -> (1, c, 8·len(dilations), h, w), replicate padding, one by one."""
    _, _, h, w = x.shape
    stacked = []
    for d in dilations:
        padded = F.pad(x, [d, d, d, d], mode="replicate")
        for dy, dx in DIRECTIONS:
            top, left = d + dy * d, d + dx * d
            stacked.append(padded[:, :, top:top + h, left:left + w])
    return torch.stack(stacked, dim=2)


def reference_par_single(
    image: Tensor, masks: Tensor, dilations: Sequence[int] = DILATIONS, num_iterations: int = 10,
    w1: float = 0.3, w2: float = 0.01,
) -> Tensor:
    """PAR on one image: image (1, 3, h, w), masks (1, K', h', w') -> (1, K', h, w)."""
    masks = F.interpolate(masks, size=image.shape[-2:], mode="bilinear", align_corners=True)
    image_neighbours = _neighbours(image, dilations)  # (1, 3, n, h, w)
    sigma = torch.std(image_neighbours, dim=2, keepdim=True)
    appearance = -((image_neighbours - image.unsqueeze(2)).abs() / (sigma + 1e-8) / w1) ** 2
    appearance = appearance.mean(dim=1, keepdim=True)  # (1, 1, n, h, w)
    distances = []
    for d in dilations:
        for dy, dx in DIRECTIONS:
            distances.append(d * math.sqrt(2) if dy != 0 and dx != 0 else float(d))
    position = torch.tensor(distances, dtype=torch.float32, device=image.device).view(1, 1, -1, 1, 1)
    position = -(position / (torch.std(position, dim=2, keepdim=True) + 1e-8) / w1) ** 2
    kernel = F.softmax(appearance, dim=2) + w2 * F.softmax(position, dim=2)
    for _ in range(num_iterations):
        masks = (_neighbours(masks, dilations) * kernel).sum(dim=2)
    return masks


def reference_par(images: Tensor, masks: Tensor, **kwargs) -> Tensor:
    """PAR image by image."""
    return torch.cat([reference_par_single(images[i:i + 1], masks[i:i + 1], **kwargs)
                      for i in range(images.shape[0])])


def _combine(label_high: Tensor, label_low: Tensor) -> Tensor:
    label = label_high.clone()
    label[label_high == 0] = IGN
    label[(label_high + label_low) == 0] = 0
    return label


def _keys(labels_row: Tensor) -> Tensor:
    zero = torch.zeros(1, dtype=torch.long, device=labels_row.device)
    return torch.cat([zero, torch.nonzero(labels_row)[:, 0] + 1])


def reference_refine_cams_with_par(
    images: Tensor, cams: Tensor, labels: Tensor, boxes: Tensor, thresholds=(0.55, 0.35), **kwargs,
) -> Tensor:
    """§5 "Refining CAMs with PAR", image by image and threshold by threshold."""
    b, _, h, w = cams.shape
    high, low = max(thresholds), min(thresholds)
    small_images = F.interpolate(images, size=(h // 2, w // 2), mode="bilinear", align_corners=False)
    out = torch.full((b, h, w), IGN, dtype=torch.long, device=cams.device)
    for i in range(b):
        keys = _keys(labels[i])
        per_threshold = []
        for tau in (high, low):
            planes = torch.cat([torch.full((1, 1, h, w), tau, device=cams.device), cams[i:i + 1]], dim=1)
            planes = F.interpolate(planes, size=(h // 2, w // 2), mode="bilinear", align_corners=False)
            planes = planes.index_select(1, keys).softmax(dim=1)
            refined = reference_par_single(small_images[i:i + 1], planes, **kwargs)
            refined = F.interpolate(refined, size=(h, w), mode="bilinear", align_corners=False)
            per_threshold.append(keys[refined.argmax(dim=1)[0]])
        label = _combine(*per_threshold)
        t, bo, l, r = boxes[i].tolist()
        out[i, t:bo, l:r] = label[t:bo, l:r]
    return out


def reference_par_in_boxes(images: Tensor, masks: Tensor, boxes: Tensor, **kwargs) -> Tensor:
    """PAR per image on its valid box downsampled by 2, pasted into zeros (reference
    refine_cams_with_cls_label structure)."""
    out = torch.zeros_like(masks)
    for i in range(images.shape[0]):
        t, b, l, r = boxes[i].tolist()
        crop = images[i:i + 1, :, t:b, l:r]
        small = F.interpolate(crop, size=((b - t) // 2, (r - l) // 2), mode="bilinear", align_corners=False)
        refined = reference_par_single(small, masks[i:i + 1, :, t:b, l:r], **kwargs)
        out[i, :, t:b, l:r] = F.interpolate(refined, size=(b - t, r - l), mode="bilinear", align_corners=False)[0]
    return out


# --- §6 -----------------------------------------------------------------------------------

def reference_window_mask(h: int, w: int, radius: int, device: torch.device | str = "cpu") -> Tensor:
    """The reference's double loop over nodes and their window, in NumPy."""
    mask = np.zeros((h * w, h * w), dtype=bool)
    for i in range(h * w):
        row, col = i // w, i % w
        for r in range(max(0, row - radius), min(h, row + radius + 1)):
            for c in range(max(0, col - radius), min(w, col + radius + 1)):
                mask[i, r * w + c] = True
                mask[r * w + c, i] = True
    return torch.from_numpy(mask).to(device)


def reference_affinity_labels(
    labels: Tensor, grid: tuple[int, int], radius: int, window: Tensor | None = None,
) -> Tensor:
    """Per image; `window` may be built once beforehand, as the reference trainer does."""
    if window is None:
        window = reference_window_mask(grid[0], grid[1], radius, labels.device)
    out = []
    for i in range(labels.shape[0]):
        small = F.interpolate(labels[i][None, None].float(), size=grid, mode="nearest").reshape(-1).long()
        target = (small[:, None] == small[None, :]).long()
        target[:, small == IGN] = IGN
        target[small == IGN, :] = IGN
        target[~window] = IGN
        out.append(target)
    return torch.stack(out)


def reference_affinity_loss(affinity: Tensor, targets: Tensor) -> Tensor:
    positive = (targets == 1).float()
    negative = (targets == 0).float()
    positive_loss = (positive * (1 - affinity)).sum() / (positive.sum() + 1)
    negative_loss = (negative * affinity).sum() / (negative.sum() + 1)
    return 0.5 * positive_loss + 0.5 * negative_loss


# --- §7 -----------------------------------------------------------------------------------

def reference_transition(affinity: Tensor, window: Tensor, power: int = 2) -> Tensor:
    out = []
    for i in range(affinity.shape[0]):
        a = affinity[i].clone()
        a[~window] = 0  # boolean-index masking, image by image
        a = a ** power
        out.append(a / (a.sum(dim=0, keepdim=True) + 0.1))
    return torch.stack(out)


def reference_propagate(
    cams_on_grid: Tensor, labels: Tensor, affinity: Tensor, window: Tensor, tau: float,
) -> Tensor:
    """cams_on_grid (B, C, h, w) -> (B, K, N): τ prepended, softmax over present channels, X T."""
    b, c = cams_on_grid.shape[:2]
    transition = reference_transition(affinity, window)
    out = torch.zeros(b, c + 1, transition.shape[-1], device=transition.device)
    for i in range(b):
        background = torch.full((1,) + cams_on_grid.shape[2:], tau, device=cams_on_grid.device)
        x = torch.cat([background, cams_on_grid[i]]).reshape(c + 1, -1)
        keys = _keys(labels[i])
        x = F.softmax(x.index_select(0, keys), dim=0)
        out[i, keys] = x @ transition[i]
    return out


def reference_propagate_with_affinity(
    cams: Tensor, labels: Tensor, affinity: Tensor, images: Tensor, boxes: Tensor,
    thresholds=(0.35, 0.55), radius: int = 8, grid: tuple[int, int] = (4, 4), window: Tensor | None = None,
    **kwargs,
) -> Tensor:
    """§7's training label, image by image and threshold by threshold; `window` may be
    built once beforehand (`reference_window_mask`), as the reference trainer does."""
    b, c, h, w = cams.shape
    high, low = max(thresholds), min(thresholds)
    if window is None:
        window = reference_window_mask(grid[0], grid[1], radius, cams.device)
    valid = cams * labels[:, :, None, None]
    on_grid = F.interpolate(valid, size=grid, mode="bilinear", align_corners=False)
    out = torch.full((b, h, w), IGN, dtype=torch.long, device=cams.device)
    for i in range(b):
        keys = _keys(labels[i])
        per_threshold = []
        for tau in (high, low):
            propagated = reference_propagate(on_grid[i:i + 1], labels[i:i + 1], affinity[i:i + 1], window, tau)
            propagated = F.interpolate(
                propagated.view(1, c + 1, *grid), size=(h, w), mode="bilinear", align_corners=False)
            t, bo, l, r = boxes[i].tolist()
            refined = torch.zeros(1, c + 1, h, w, device=cams.device)
            crop = images[i:i + 1, :, t:bo, l:r]
            small = F.interpolate(crop, size=((bo - t) // 2, (r - l) // 2), mode="bilinear", align_corners=False)
            part = reference_par_single(small, propagated[:, :, t:bo, l:r].index_select(1, keys), **kwargs)
            part = F.interpolate(part, size=(bo - t, r - l), mode="bilinear", align_corners=False)
            refined[0, keys, t:bo, l:r] = part[0]
            per_threshold.append(refined.argmax(dim=1)[0])
        label = _combine(*per_threshold)
        t, bo, l, r = boxes[i].tolist()
        out[i, t:bo, l:r] = label[t:bo, l:r]
    return out


def reference_propagate_for_evaluation(
    cams: Tensor, labels: Tensor, affinity: Tensor, tau: float = 0.35, radius: int = 8,
) -> Tensor:
    """§10: grid ⌈h/16⌉×⌈w/16⌉, random walk, upsample, argmax; no PAR."""
    b, c, h, w = cams.shape
    grid = (math.ceil(h / 16), math.ceil(w / 16))
    window = reference_window_mask(grid[0], grid[1], radius, cams.device)
    out = []
    for i in range(b):
        on_grid = F.interpolate(cams[i:i + 1], size=grid, mode="bilinear", align_corners=False)
        propagated = reference_propagate(on_grid, labels[i:i + 1], affinity[i:i + 1], window, tau)
        propagated = F.interpolate(propagated.view(1, c + 1, *grid), size=(h, w), mode="bilinear", align_corners=False)
        out.append(propagated.argmax(dim=1)[0])
    return torch.stack(out)


# --- §8 -----------------------------------------------------------------------------------

def reference_multilabel_soft_margin_loss(logits: Tensor, labels: Tensor) -> Tensor:
    per_class = -(labels * F.logsigmoid(logits) + (1 - labels) * F.logsigmoid(-logits))
    return per_class.mean(dim=1).mean()


def reference_balanced_segmentation_loss(logits: Tensor, target: Tensor) -> Tensor:
    """The reference's two cross-entropies, with the empty-part guard (NaN → 0)."""
    logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    background = target.clone()
    background[target != 0] = IGN
    foreground = target.clone()
    foreground[target == 0] = IGN
    total = logits.sum() * 0.0
    for part in (background, foreground):
        if (part != IGN).any():
            total = total + F.cross_entropy(logits, part, ignore_index=IGN)
    return 0.5 * total

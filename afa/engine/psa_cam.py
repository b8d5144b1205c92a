"""The PSA mode's CAM-stage outputs (PSA.md §1, §2, §5): what the affinity and random-walk
stages read, written once per training image.

For each image of the split: the multi-scale + flip CAM (§1); the confident-region label on
the stride-8 grid (§2, optionally from CRF-refined scores), saved as a palette PNG; the
random walk's input X = [M_bg(α = 16); M_c] pooled to the grid (§5), saved for the present
classes only (``.npz``: kilobytes per image, where the reference writes a full-resolution
float array per image); and the CAM label with a constant background score (0.2, §5's
quality measure), scored against the masks when the split has them.

The affinity stage crops its images at multiples of the stride, so a crop's pooled cells are
cells of the full image's grid and its label is a window of the saved grid label (the
reference crops anywhere and pools after cropping: the same values, crop positions rounded
to 8 px).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from afa import viz
from afa.crf import CRFOptions, CRFPool, dense_crf
from afa.data.readers import write_index_mask
from afa.metrics import ConfusionMatrix, ReduceSum
from afa.models.network import AFANetwork
from afa.ops import cam_scores_on_grid, cam_to_label, confident_region_label, psa_multi_scale_cams, scores_with_background

# PSA.md §2: the reference's CRF for the background/CAM scores.
PSA_CRF = CRFOptions(iterations=10, gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=80.0, bilateral_srgb=13.0,
                     bilateral_compat=10.0)
AFFINITY_LABELS = "affinity_labels"
WALK_SCORES = "walk_scores"


@dataclass(frozen=True)
class CAMStageOptions:
    """PSA.md §1, §2, §5 with the reference's values."""

    scales: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0)
    flip: bool = True
    alpha_low: float = 4.0
    alpha_high: float = 32.0
    alpha_walk: float = 16.0
    crf: CRFOptions | None = None  # PSA_CRF to refine both score maps (needs pydensecrf2)
    cam_label_bkg_score: float = 0.2


@dataclass
class CAMStageOutput:
    """One batch's outputs (same-size images).

    Attributes:
        cams: (B, C, H, W) the multi-scale CAMs (§1).
        cam_label: (B, H, W) int64, the CAM label with the constant background score; None
            when not asked for.
        affinity_label: (B, h, w) int64 on the grid: 0, 1..C, or IGN; None when the CRF is
            left to the caller.
        walk_scores: (B, 1 + C, h, w) float32 X of §5 (absent classes 0).
    """

    cams: Tensor
    cam_label: Tensor | None
    affinity_label: Tensor | None
    walk_scores: Tensor


@dataclass
class CRFJob:
    """One image's CRF input: its uint8 pixels (H, W, 3), the [M_bg(α); M_c] scores over its
    present channels for α_low and α_high (2, K, H, W), and those channels' indices (K,)."""

    pixels: np.ndarray
    scores: np.ndarray
    channels: Tensor


def crf_jobs(images: Tensor, cams: Tensor, labels: Tensor, options: CAMStageOptions) -> list[CRFJob]:
    """The CRF inputs of a batch (PSA.md §2): per image over its present classes only, as the
    reference does, so an absent class can never win.

    Args:
        images: (B, 3, H, W) normalised; the CRF sees their uint8 RGB.
        cams: (B, C, H, W) normalised CAMs.
        labels: (B, C) multi-hot.
    """
    scores = torch.stack([scores_with_background(cams, options.alpha_low),
                          scores_with_background(cams, options.alpha_high)], dim=1).float().cpu().numpy()
    pixels = viz.denormalize_image(images.cpu())
    present = torch.cat([torch.ones_like(labels[:, :1]), labels], dim=1).bool().cpu()
    jobs = []
    for k in range(scores.shape[0]):  # the CRF is a per-image CPU computation
        channels = present[k].nonzero().flatten()
        jobs.append(CRFJob(pixels[k], np.ascontiguousarray(scores[k][:, channels.numpy()]), channels))
    return jobs


def crf_score_pair(image: np.ndarray, scores: np.ndarray, options: CRFOptions) -> np.ndarray:
    """(2, K, H, W) float32 CRF marginals of the α_low and α_high scores of one image (a
    module-level function: it runs in `afa.crf.CRFPool` workers)."""
    return np.stack([dense_crf(image, alpha_scores, options) for alpha_scores in scores])


def crf_region_label(job: CRFJob, refined: np.ndarray, labels: Tensor, options: CAMStageOptions) -> Tensor:
    """One image's confident-region label on the grid (h, w) from its CRF marginals: absent
    channels stay 0.

    Args:
        refined: (2, K, H, W) from :func:`crf_score_pair`.
        labels: (C,) the image's multi-hot label.
    """
    full = torch.zeros((2, 1 + labels.shape[0], *refined.shape[-2:]))
    full[:, job.channels] = torch.from_numpy(refined)
    return confident_region_label(None, labels[None].cpu(), options.alpha_low, options.alpha_high,
                                  scores_low=full[:1], scores_high=full[1:])[0]


@torch.no_grad()
def cam_stage_outputs(network: AFANetwork, images: Tensor, labels: Tensor, options: CAMStageOptions,
                      inline_crf: bool = True, with_cam_label: bool = True) -> CAMStageOutput:
    """The CAM stage's outputs for a batch of same-size images with their image labels. With
    the CRF on, ``inline_crf`` runs it here image by image; otherwise the affinity label is
    left to the caller (`write_cam_stage` runs the CRF on worker processes)."""
    cams = psa_multi_scale_cams(network.forward_cam, images, labels, options.scales, options.flip)
    if options.crf is None:
        affinity_label = confident_region_label(cams, labels, options.alpha_low, options.alpha_high)
    elif inline_crf:
        affinity_label = torch.stack([
            crf_region_label(job, crf_score_pair(job.pixels, job.scores, options.crf), labels[k], options)
            for k, job in enumerate(crf_jobs(images, cams, labels, options))
        ]).to(cams.device)
    else:
        affinity_label = None
    return CAMStageOutput(
        cams=cams,
        cam_label=cam_to_label(cams, labels, options.cam_label_bkg_score) if with_cam_label else None,
        affinity_label=affinity_label,
        walk_scores=cam_scores_on_grid(cams, options.alpha_walk),
    )


def save_walk_scores(path: Path, scores: Tensor, labels: Tensor) -> None:
    """X of one image (host tensors), (1 + C, h, w), stored for the background and its present
    classes (float16)."""
    classes = labels.nonzero().flatten() + 1
    channels = torch.cat([classes.new_zeros(1), classes])
    np.savez(path, classes=classes.numpy().astype(np.int16), scores=scores[channels].numpy().astype(np.float16))


def load_walk_scores(path: Path, num_classes: int) -> Tensor:
    """(1 + C, h, w) float32 X of one image from :func:`save_walk_scores` (absent classes 0)."""
    with np.load(path) as stored:
        classes, scores = stored["classes"].astype(np.int64), torch.from_numpy(stored["scores"].astype(np.float32))
    full = scores.new_zeros((1 + num_classes, *scores.shape[1:]))
    full[torch.from_numpy(np.concatenate([[0], classes]))] = scores
    return full


def write_cam_stage(network: AFANetwork, batches: Iterable[dict], out_dir: Path, num_classes: int,
                    options: CAMStageOptions, device: torch.device, crf_workers: int = 0,
                    scored: bool | None = None, reduce_sum: ReduceSum | None = None) -> dict | None:
    """Writes every image's affinity label and walk scores under ``out_dir``; returns the CAM
    label's metrics (``ConfusionMatrix.compute``, summed over ranks by ``reduce_sum``) when
    ``scored`` (None: when the batches carried masks, for one process), else None.

    With the CRF on, each image's CRF runs on one of ``crf_workers`` processes (0: inline)
    while the network computes the next batch's CAMs; its label is written when it returns.

    Args:
        batches: samples collated by size (``name``, ``image``, ``labels``, optionally ``mask``).
    """
    for folder in (AFFINITY_LABELS, WALK_SCORES):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    matrix, carried_masks = ConfusionMatrix(num_classes + 1, device=device), False
    pool = CRFPool(crf_workers, options.crf, job=crf_score_pair) if options.crf is not None else None

    def finish(key: tuple[str, CRFJob, Tensor], refined: np.ndarray) -> None:
        name, job, labels = key
        grid_label = crf_region_label(job, refined, labels, options).numpy().astype(np.uint8)
        write_index_mask(out_dir / AFFINITY_LABELS / f"{name}.png", grid_label)

    network.eval()
    try:
        for batch in batches:
            images, labels = batch["image"].to(device), batch["labels"].to(device)
            output = cam_stage_outputs(network, images, labels, options, inline_crf=False,
                                       with_cam_label="mask" in batch)
            if "mask" in batch:
                matrix.update(output.cam_label, batch["mask"].to(device))
                carried_masks = True
            walk_scores, labels_host = output.walk_scores.cpu(), labels.cpu()
            if pool is None:
                for name, grid_label in zip(batch["name"], output.affinity_label.cpu().numpy().astype(np.uint8)):
                    write_index_mask(out_dir / AFFINITY_LABELS / f"{name}.png", grid_label)
            else:
                for k, job in enumerate(crf_jobs(images, output.cams, labels, options)):
                    for done in pool.submit((batch["name"][k], job, labels_host[k]), job.pixels, job.scores):
                        finish(*done)
                for done in pool.completed():
                    finish(*done)
            for k, name in enumerate(batch["name"]):
                save_walk_scores(out_dir / WALK_SCORES / f"{name}.npz", walk_scores[k], labels_host[k])
        if pool is not None:
            for done in pool.drain():
                finish(*done)
    finally:
        if pool is not None:
            pool.close()
    scored = carried_masks if scored is None else scored  # given by the caller: the reduce is collective
    return matrix.reduce_(reduce_sum).compute() if scored else None

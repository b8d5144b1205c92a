"""The PSA two-stage mode as pure, batched tensor functions (PSA.md §1–§5).

CAM normalisation (§1), confident-region labels on the stride-8 grid (§2), affinity pairs
within radius γ and their labels (§3), the AffinityNet affinity and loss (§4), and the random
walk with its score input and final label (§5). The §5 CAM-quality label with a constant
background score of 0.2 is `afa.ops.cam_to_label(cams, labels, bkg_score=0.2)`.

Grid convention (§2, §5): an (H, W) map is zero-padded at the bottom and right to a multiple
of the stride and average-pooled with kernel = stride, so the grid is (⌈H/8⌉, ⌈W/8⌉) and every
cell is divided by 8·8, padding included (the reference pads, then pools).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from afa.constants import IGNORE_INDEX
from afa.ops.cam import CamFunction

# PSA.md §2, §3, §5: the reference's values.
PSA_RADIUS: int = 5
PSA_STRIDE: int = 8


def normalize_cams_by_max(cams: Tensor, labels: Tensor, valid: Tensor | None = None) -> Tensor:
    """M_c = ReLU(cam_c) / (max ReLU(cam_c) + 1e-5), 0 for absent classes (PSA.md §1).

    The reference applies ReLU to every scale's CAM before summing; the ReLU here is then a
    no-op, and otherwise applies it to the sum as §1 states.

    Args:
        cams: (B, C, H, W) CAMs summed over scales and flips.
        labels: (B, C) multi-hot image labels.
        valid: optional (B, H, W) bool, the real pixels of zero-padded images; outside it
            the result is 0 and the maximum is taken inside it only.

    Returns:
        (B, C, H, W) float32 in [0, 1).
    """
    positive = cams.float().relu()
    if valid is not None:
        positive = positive * valid[:, None].to(positive.dtype)
    peak = positive.flatten(2).amax(dim=2)[:, :, None, None]  # (B, C, 1, 1)
    return positive / (peak + 1e-5) * labels[:, :, None, None].to(positive.dtype)


def psa_multi_scale_cams(
    cam_fn: CamFunction, images: Tensor, labels: Tensor, scales: Sequence[float] = (1.0, 0.5, 1.5, 2.0),
    flip: bool = True,
) -> Tensor:
    """PSA's inference CAMs (PSA.md §1): every scale (and its flip) through the classifier,
    ReLU per pass as PSA's ``forward_cam``, upsampled to the image, summed, then each
    present class divided by its spatial max (:func:`normalize_cams_by_max`).

    One ``cam_fn`` call per scale on [images; flipped images]; no gradients.

    Args:
        cam_fn: the CAM-only forward (see `afa.ops.cam.CamFunction`); raw CAMs, no ReLU.
        images: (B, 3, H, W) normalised, same size.
        labels: (B, C) multi-hot image labels.
        scales: resize factors; the image at scale s is (⌊sH⌋, ⌊sW⌋) as in AFA.md §3.
        flip: add each scale's horizontal flip (flipped back before summing).

    Returns:
        (B, C, H, W) float32 M_c in [0, 1), 0 for absent classes.
    """
    if not scales:
        raise ValueError("afa/ops/psa.py psa_multi_scale_cams: scales is empty; pass e.g. (1.0, 0.5, 1.5, 2.0)")
    batch, _, height, width = images.shape
    total: Tensor | None = None
    with torch.no_grad():
        for scale in scales:
            size = (int(scale * height), int(scale * width))
            scaled = images if size == (height, width) else F.interpolate(
                images, size=size, mode="bilinear", align_corners=False)
            raw, _ = cam_fn(torch.cat([scaled, scaled.flip(-1)]) if flip else scaled, 0)
            cams = F.interpolate(raw.float().relu(), size=(height, width), mode="bilinear", align_corners=False)
            summed = cams[:batch] + cams[batch:].flip(-1) if flip else cams
            total = summed if total is None else total.add_(summed)
    assert total is not None  # scales is non-empty, checked above
    return normalize_cams_by_max(total, labels)


def background_score(cams: Tensor, alpha: float) -> Tensor:
    """M_bg = (1 − max_c M_c)^α (PSA.md §2); 1 where no class is present.

    Args:
        cams: (B, C, H, W) normalised CAMs M_c in [0, 1], absent classes 0.
        alpha: the power α (§2: 4 or 32; §5: 16).

    Returns:
        (B, 1, H, W), cams' dtype.
    """
    return (1 - cams.amax(dim=1, keepdim=True)).clamp_min(0).pow(alpha)


def scores_with_background(cams: Tensor, alpha: float) -> Tensor:
    """[M_bg; M_c]: channel 0 is the background, channel c the class id c (PSA.md §2, §5).

    Args:
        cams: (B, C, H, W) normalised CAMs, absent classes 0.
        alpha: the background power α.

    Returns:
        (B, 1 + C, H, W).
    """
    return torch.cat([background_score(cams, alpha), cams], dim=1)


def pool_to_grid(scores: Tensor, stride: int = PSA_STRIDE) -> Tensor:
    """Zero-pads bottom/right to a multiple of `stride`, then average-pools stride × stride (PSA.md §2, §5).

    Every cell is divided by stride², padding included, as the reference (which pads first).

    Args:
        scores: (B, K, H, W).
        stride: pooling kernel and stride (8).

    Returns:
        (B, K, ⌈H/stride⌉, ⌈W/stride⌉).
    """
    height, width = scores.shape[-2:]
    padded = F.pad(scores, (0, -width % stride, 0, -height % stride))
    return F.avg_pool2d(padded, kernel_size=stride, stride=stride)


def grid_valid_mask(valid: Tensor, stride: int = PSA_STRIDE) -> Tensor:
    """Grid cells that hold at least one real pixel (PSA.md §2: padding is IGN).

    Args:
        valid: (B, H, W) bool, real pixels.
        stride: grid stride.

    Returns:
        (B, ⌈H/stride⌉, ⌈W/stride⌉) bool.
    """
    return pool_to_grid(valid[:, None].float(), stride)[:, 0] > 0


def cam_scores_on_grid(
    cams: Tensor, alpha: float, stride: int = PSA_STRIDE, valid: Tensor | None = None,
) -> Tensor:
    """X: [M_bg(α); M_c] zeroed outside the image and average-pooled to the grid (PSA.md §5).

    The background is computed before the padding, so padding is 0 in every channel, as
    the reference's zero-padded CAM.

    Args:
        cams: (B, C, H, W) normalised CAMs, absent classes 0.
        alpha: the background power (§5: 16).
        stride: grid stride (8).
        valid: optional (B, H, W) bool, real pixels of zero-padded images.

    Returns:
        (B, 1 + C, ⌈H/stride⌉, ⌈W/stride⌉).
    """
    scores = scores_with_background(cams, alpha)
    if valid is not None:
        scores = scores * valid[:, None].to(scores.dtype)
    return pool_to_grid(scores, stride)


def _present_channels(labels: Tensor) -> Tensor:
    """(B, C) multi-hot → (B, 1 + C) bool: the background and the present classes."""
    background = torch.ones_like(labels[:, :1], dtype=torch.bool)
    return torch.cat([background, labels.bool()], dim=1)


def _argmax_present(scores: Tensor, labels: Tensor) -> Tensor:
    """Argmax over [bg; classes] (B, 1 + C, h, w) with absent classes excluded; ties → lower id."""
    present = _present_channels(labels)[:, :, None, None]
    return scores.masked_fill(~present, float("-inf")).argmax(dim=1)


def confident_region_label(
    cams: Tensor | None, labels: Tensor, alpha_low: float = 4, alpha_high: float = 32,
    stride: int = PSA_STRIDE, valid: Tensor | None = None, ignore_index: int = IGNORE_INDEX,
    scores_low: Tensor | None = None, scores_high: Tensor | None = None,
) -> Tensor:
    """The confident-region label on the grid (PSA.md §2).

    l_la = argmax [M_bg(α_low); M_c], l_ha = argmax [M_bg(α_high); M_c], each on the scores
    zeroed outside `valid` and average-pooled stride × stride (`pool_to_grid`). Absent
    classes never win (ties go to the lower id, background first). Label: l_la where it is
    a foreground class; 0 where l_ha = 0 (wins where they disagree); IGN elsewhere and in
    cells without a real pixel.

    Args:
        cams: (B, C, H, W) normalised CAMs, absent classes 0; may be None when both score
            maps are given.
        labels: (B, C) multi-hot.
        alpha_low: α of l_la (4).
        alpha_high: α of l_ha (32).
        stride: grid stride (8).
        valid: optional (B, H, W) bool, real pixels of zero-padded images; None: all.
        ignore_index: label of neutral and padding cells.
        scores_low: optional (B, 1 + C, H, W) precomputed scores for l_la (e.g. CRF
            refined) instead of [M_bg(α_low); M_c].
        scores_high: the same for l_ha.

    Returns:
        (B, ⌈H/stride⌉, ⌈W/stride⌉) int64: 0, class ids 1..C, or ignore_index.
    """
    grid_labels = []
    for alpha, scores in ((alpha_low, scores_low), (alpha_high, scores_high)):
        if scores is None:
            if cams is None:
                raise ValueError("afa/ops/psa.py confident_region_label: cams is None and a score map is "
                                 "missing; pass cams or both scores_low and scores_high")
            scores = scores_with_background(cams, alpha)
        if scores.shape[1] != labels.shape[1] + 1:
            raise ValueError(f"afa/ops/psa.py confident_region_label: scores have {scores.shape[1]} channels, "
                             f"labels {labels.shape[1]} classes; pass [background; classes] (1 + C channels)")
        if valid is not None:
            scores = scores * valid[:, None].to(scores.dtype)
        grid_labels.append(_argmax_present(pool_to_grid(scores, stride), labels))
    low, high = grid_labels  # (B, h, w) each
    label = torch.where(low > 0, low, ignore_index)
    label = torch.where(high == 0, 0, label)
    if valid is not None:
        label = torch.where(grid_valid_mask(valid, stride), label, ignore_index)
    return label


@functools.lru_cache(maxsize=8)
def affinity_pair_offsets(radius: int = PSA_RADIUS) -> tuple[tuple[int, int], ...]:
    """Offsets (dy, dx) from a pair's origin to its partner, distance < γ, each unordered pair once (PSA.md §3).

    Order (the reference's): (0, 1) … (0, γ−1); then for dy = 1 … γ−1, dx = −(γ−1) … γ−1
    with dy² + dx² < γ². Partners lie right on the same row or on a row below. γ = 5: 34.

    Args:
        radius: γ.

    Returns:
        tuple of (dy, dx).
    """
    reach = radius - 1
    same_row = [(0, dx) for dx in range(1, reach + 1)]
    below = [(dy, dx) for dy in range(1, reach + 1) for dx in range(-reach, reach + 1)
             if dy * dy + dx * dx < radius * radius]
    return tuple(same_row + below)


@functools.lru_cache(maxsize=16)
def _pair_indices(height: int, width: int, radius: int, device: torch.device) -> tuple[Tensor, Tensor]:
    reach = radius - 1
    rows = torch.arange(max(height - reach, 0), device=device)  # origin rows [0, H − γ + 1)
    cols = torch.arange(reach, max(width - reach, reach), device=device)  # origin cols [γ − 1, W − γ + 1)
    origin_rows, origin_cols = (rows[:, None].expand(-1, cols.numel()).flatten(),
                                cols[None, :].expand(rows.numel(), -1).flatten())  # (O,) row-major
    offsets = torch.tensor(affinity_pair_offsets(radius), dtype=torch.long, device=device).view(-1, 2)  # (K, 2)
    partner_rows = origin_rows[None, :] + offsets[:, :1]  # (K, O)
    partner_cols = origin_cols[None, :] + offsets[:, 1:]
    origins = (origin_rows * width + origin_cols).repeat(offsets.shape[0])  # (K·O,) offset-major
    return origins, (partner_rows * width + partner_cols).flatten()


def affinity_pair_indices(
    height: int, width: int, radius: int = PSA_RADIUS, device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """The pairs (i, j) of grid nodes within radius γ, each unordered pair once (PSA.md §3).

    Origins i come only from rows [0, H − γ + 1) and columns [γ − 1, W − γ + 1) (the
    reference's border rule: every partner lies inside the grid); partner j = i + offset for
    each of `affinity_pair_offsets(radius)`. Order: offset-major, then origins row-major, so
    P = K · (H − γ + 1) · (W − 2γ + 2); P = 0 on a grid too small for γ. Nodes are flattened
    row-major (i = row · W + col). Built once per (height, width, radius, device) and cached:
    treat it as read-only.

    Args:
        height: grid rows h.
        width: grid columns w.
        radius: γ.
        device: where the indices live.

    Returns:
        origins: (P,) int64.
        partners: (P,) int64.
    """
    return _pair_indices(height, width, radius, torch.device(device))


def affinity_pair_labels(
    grid_labels: Tensor, origins: Tensor, partners: Tensor, ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pair labels from the confident-region label (PSA.md §3).

    Positive background: both 0. Positive foreground: the same foreground class. Negative:
    different labels. Pairs with an IGN end are in none of the three.

    Args:
        grid_labels: (B, h, w) int64 from `confident_region_label`.
        origins: (P,) int64 from `affinity_pair_indices`.
        partners: (P,) int64.
        ignore_index: label of ignored cells.

    Returns:
        background_positive, foreground_positive, negative: (B, P) bool each.
    """
    flat = grid_labels.flatten(1)  # (B, N)
    first, second = flat[:, origins], flat[:, partners]  # (B, P)
    known = (first != ignore_index) & (second != ignore_index)
    same = first == second
    background = known & same & (first == 0)
    return background, known & same & (first != 0), known & ~same


def feature_affinity(features: Tensor, origins: Tensor, partners: Tensor) -> Tensor:
    """W_ij = exp(−mean_channels |f_i − f_j|) for each pair (PSA.md §4).

    Memory: two (B, D, P) gathers (γ = 5 on a 56 × 56 grid: P = 84,864).

    Args:
        features: (B, D, h, w) AffinityNet feature map f.
        origins: (P,) int64 from `affinity_pair_indices`.
        partners: (P,) int64.

    Returns:
        (B, P) in (0, 1], features' dtype.
    """
    flat = features.flatten(2)  # (B, D, N)
    return (flat[:, :, origins] - flat[:, :, partners]).abs().mean(dim=1).neg().exp()


def window_feature_affinity(features: Tensor, radius: int = PSA_RADIUS) -> Tensor:
    """`feature_affinity` of every pair of `affinity_pair_indices(h, w, radius)`, in its order,
    computed by one shifted slice per offset instead of gathering nodes (PSA.md §4): the
    same values to float rounding (the channel mean summed in another order), 4-6× faster
    with its backward on a CPU, where the gathers had taken 40 % of the random-walk pass.

    Memory: one (B, D, h − γ + 1, w − 2γ + 2) difference per offset at a time.

    Args:
        features: (B, D, h, w) AffinityNet feature map f.
        radius: γ.

    Returns:
        (B, P) in (0, 1], features' dtype; P = 0 on a grid too small for γ.
    """
    reach = radius - 1
    height, width = features.shape[-2:]
    rows, cols = height - reach, width - 2 * reach
    if rows <= 0 or cols <= 0:
        return features.flatten(1)[:, :0]  # no pairs, still on the autograd graph as the gather was
    origins = features[:, :, :rows, reach:reach + cols]
    distances = [
        (origins - features[:, :, dy:dy + rows, reach + dx:reach + dx + cols]).abs().mean(dim=1).flatten(1)
        for dy, dx in affinity_pair_offsets(radius)
    ]
    return torch.cat(distances, dim=1).neg().exp()


def _pair_mean(terms: Tensor, mask: Tensor) -> Tensor:
    """Mean of terms over the mask; 0 (not NaN) when the mask is empty."""
    return torch.where(mask, terms, 0.0).sum() / mask.sum().clamp_min(1)


def psa_affinity_loss(
    affinity: Tensor, background_positive: Tensor, foreground_positive: Tensor, negative: Tensor,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L = L_bg+/4 + L_fg+/4 + L_−/2 (PSA.md §4).

    L_+ = −mean log(W + 1e-5) over its pairs, L_− = −mean log(1 + 1e-5 − W); each mean runs
    over the pairs of that kind across the whole batch, and a kind without pairs gives 0.

    Args:
        affinity: (B, P) W from `feature_affinity`.
        background_positive: (B, P) bool from `affinity_pair_labels`.
        foreground_positive: (B, P) bool.
        negative: (B, P) bool.

    Returns:
        loss: scalar float32.
        parts: {"background_positive", "foreground_positive", "negative"}: the three
            unweighted means, scalar float32.
    """
    weights = affinity.float()  # means over B·P terms in float32 under autocast
    positive_terms = -torch.log(weights + 1e-5)
    parts = {
        "background_positive": _pair_mean(positive_terms, background_positive),
        "foreground_positive": _pair_mean(positive_terms, foreground_positive),
        "negative": _pair_mean(-torch.log(1 + 1e-5 - weights), negative),
    }
    loss = parts["background_positive"] / 4 + parts["foreground_positive"] / 4 + parts["negative"] / 2
    return loss, parts


def dense_pair_affinity(affinity: Tensor, origins: Tensor, partners: Tensor, num_nodes: int) -> Tensor:
    """Dense symmetric W from the pair affinities: W_ij = W_ji = w, W_ii = 1, else 0 (PSA.md §5).

    Args:
        affinity: (B, P) pair affinities.
        origins: (P,) int64 (pairs unique and unordered, as `affinity_pair_indices`).
        partners: (P,) int64.
        num_nodes: N = h · w.

    Returns:
        (B, N, N) float32; N × N per image.
    """
    batch = affinity.shape[0]
    dense = affinity.new_zeros(batch, num_nodes * num_nodes, dtype=torch.float32)
    values = affinity.float()
    dense[:, origins * num_nodes + partners] = values
    dense[:, partners * num_nodes + origins] = values
    dense[:, torch.arange(num_nodes, device=affinity.device) * (num_nodes + 1)] = 1.0
    return dense.view(batch, num_nodes, num_nodes)


def psa_random_walk(
    scores: Tensor, affinity: Tensor, origins: Tensor, partners: Tensor, beta: float = 8, logt: int = 8,
) -> Tensor:
    """X* = X T^t, t = 2^logt, T_ij = W^∘β_ij / Σ_i W^∘β_ij (PSA.md §5).

    W from `dense_pair_affinity` (diagonal 1, so no column sum is 0); T^t by logt squarings
    as batched matmuls, in float32 with autocast off. Memory: about three (N, N) float32
    matrices per image (N = h · w; a 500 × 375 image: N = 2,961, 35 MB each).

    Args:
        scores: (B, K, h, w) X on the grid (`cam_scores_on_grid`).
        affinity: (B, P) pair affinities on the same grid.
        origins: (P,) int64 from `affinity_pair_indices(h, w)`.
        partners: (P,) int64.
        beta: Hadamard power β (8).
        logt: number of squarings (8: t = 256).

    Returns:
        (B, K, h, w) float32 X*.
    """
    batch, channels, height, width = scores.shape
    nodes = height * width
    with torch.autocast(device_type=scores.device.type, enabled=False):
        weights = dense_pair_affinity(affinity, origins, partners, nodes).pow_(beta)  # (B, N, N)
        transition = weights.div_(weights.sum(dim=1, keepdim=True))  # columns sum to 1
        for _ in range(logt):
            transition = torch.bmm(transition, transition)
        walked = torch.bmm(scores.float().reshape(batch, channels, nodes), transition)  # (B, K, N)
    return walked.view(batch, channels, height, width)


def random_walk_label(
    walked: Tensor, labels: Tensor, image_size: tuple[int, int], stride: int = PSA_STRIDE,
    valid: Tensor | None = None, ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """The pseudo label: X* upsampled to the padded image, cropped back, argmax (PSA.md §5).

    Bilinear (align_corners=False) to (stride · h, stride · w), the zero-padded size, then
    cropped to image_size; absent classes never win (ties → lower id, background first).

    Args:
        walked: (B, 1 + C, h, w) X* from `psa_random_walk`.
        labels: (B, C) multi-hot.
        image_size: (H, W) with H ≤ stride · h and W ≤ stride · w.
        stride: grid stride (8).
        valid: optional (B, H, W) bool; IGN outside it (images of a padded batch).
        ignore_index: label outside `valid`.

    Returns:
        (B, H, W) int64 class ids.
    """
    height, width = walked.shape[-2:]
    if image_size[0] > stride * height or image_size[1] > stride * width:
        raise ValueError(f"afa/ops/psa.py random_walk_label: image_size {tuple(image_size)} exceeds the "
                         f"grid {height}×{width} at stride {stride}; pass the size the grid was pooled from")
    upsampled = F.interpolate(walked.float(), size=(stride * height, stride * width), mode="bilinear",
                              align_corners=False)
    label = _argmax_present(upsampled[:, :, :image_size[0], :image_size[1]], labels)
    return label if valid is None else torch.where(valid, label, ignore_index)

"""PSA operators (PSA.md §1–§5) against per-pixel, per-cell and per-pair Python-loop references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from afa.ops import (
    affinity_pair_indices,
    affinity_pair_labels,
    affinity_pair_offsets,
    background_score,
    cam_scores_on_grid,
    confident_region_label,
    dense_pair_affinity,
    feature_affinity,
    window_feature_affinity,
    grid_valid_mask,
    normalize_cams_by_max,
    psa_affinity_loss,
    psa_multi_scale_cams,
    psa_random_walk,
    random_walk_label,
)

IGN = 255


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _labels(batch: int, classes: int, seed: int) -> torch.Tensor:
    """(B, C) multi-hot: image 0 background-only, the last with classes 1–2 present."""
    labels = (torch.rand(batch, classes, generator=_generator(seed)) < 0.5).float()
    labels[0] = 0
    labels[-1, :2] = 1
    return labels


def _valid(batch: int, height: int, width: int, sizes: list[tuple[int, int]]) -> torch.Tensor:
    """(B, H, W) bool: image b occupies the top-left sizes[b] of the padded batch."""
    valid = torch.zeros(batch, height, width, dtype=torch.bool)
    for index, (rows, cols) in enumerate(sizes):
        valid[index, :rows, :cols] = True
    return valid


# --- references ----------------------------------------------------------------------------

def reference_offsets(radius: int) -> list[tuple[int, int]]:
    """(dy, dx) to raster-later partners within distance < γ, in the reference's order."""
    offsets = []
    for dy in range(radius):
        for dx in range(-radius + 1, radius):
            if (dy == 0 and dx <= 0) or dy * dy + dx * dx >= radius * radius:
                continue
            offsets.append((dy, dx))
    return offsets


def reference_pairs(height: int, width: int, radius: int) -> list[tuple[int, int]]:
    """Offset-major, then origins row-major, origins inside the reference's border rule."""
    pairs = []
    for dy, dx in reference_offsets(radius):
        for row in range(0, height - radius + 1):
            for col in range(radius - 1, width - radius + 1):
                pairs.append((row * width + col, (row + dy) * width + col + dx))
    return pairs


def reference_cell_label(
    scores_low: torch.Tensor, scores_high: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, stride: int,
) -> torch.Tensor:
    """Per image, per cell: mean of the real pixels' scores over stride² (padding counts as 0),
    argmax over present channels (first maximum), then the §2 rule."""
    batch, channels, height, width = scores_low.shape
    rows, cols = math.ceil(height / stride), math.ceil(width / stride)
    result = torch.full((batch, rows, cols), IGN, dtype=torch.long)
    for b in range(batch):
        present = [0] + [c + 1 for c in range(labels.shape[1]) if labels[b, c] > 0]
        for r in range(rows):
            for q in range(cols):
                pixels = [(y, x) for y in range(r * stride, min((r + 1) * stride, height))
                          for x in range(q * stride, min((q + 1) * stride, width)) if valid[b, y, x]]
                if not pixels:
                    continue  # padding cell: IGN
                winners = []
                for scores in (scores_low, scores_high):
                    means = {k: sum(float(scores[b, k, y, x]) for y, x in pixels) / stride ** 2 for k in present}
                    best = present[0]
                    for k in present:
                        if means[k] > means[best]:
                            best = k
                    winners.append(best)
                low, high = winners
                if high == 0:
                    result[b, r, q] = 0
                elif low > 0:
                    result[b, r, q] = low
    return result


def reference_random_walk(
    scores: np.ndarray, affinity: np.ndarray, pairs: list[tuple[int, int]], beta: float, logt: int,
) -> np.ndarray:
    """One image, float64: W built pair by pair, W^∘β, column-normalised, numpy matrix_power."""
    channels, height, width = scores.shape
    nodes = height * width
    weights = np.zeros((nodes, nodes))
    for i in range(nodes):
        weights[i, i] = 1.0
    for p, (i, j) in enumerate(pairs):
        weights[i, j] = weights[j, i] = affinity[p]
    weights = weights ** beta
    transition = weights / weights.sum(axis=0, keepdims=True)
    walked = scores.reshape(channels, nodes) @ np.linalg.matrix_power(transition, 2 ** logt)
    return walked.reshape(channels, height, width)


# --- §1 ----------------------------------------------------------------------------------------

def test_normalize_cams_by_max_matches_per_class_loop():
    batch, classes, height, width = 3, 4, 9, 11
    cams = torch.randn(batch, classes, height, width, generator=_generator(0)) * 3
    labels = _labels(batch, classes, seed=1)
    valid = _valid(batch, height, width, [(9, 11), (5, 7), (9, 4)])
    for mask in (None, valid):
        ours = normalize_cams_by_max(cams, labels, mask)
        expected = torch.zeros_like(cams)
        for b in range(batch):
            for c in range(classes):
                if labels[b, c] == 0:
                    continue
                inside = torch.ones(height, width, dtype=torch.bool) if mask is None else mask[b]
                positive = torch.where(inside, cams[b, c].clamp_min(0), 0.0)
                expected[b, c] = positive / (positive.max() + 1e-5)
        assert torch.allclose(ours, expected, atol=1e-6)
        assert ours.min() >= 0 and ours.max() < 1


# --- §2 ----------------------------------------------------------------------------------------

def test_background_score_per_pixel():
    cams = torch.rand(2, 3, 4, 5, generator=_generator(2))
    ours = background_score(cams, 4)
    for b in range(2):
        for y in range(4):
            for x in range(5):
                assert math.isclose(float(ours[b, 0, y, x]), (1 - float(cams[b, :, y, x].max())) ** 4, rel_tol=1e-5)


def _random_cams(batch: int, classes: int, height: int, width: int, labels: torch.Tensor, seed: int) -> torch.Tensor:
    cams = torch.rand(batch, classes, height, width, generator=_generator(seed)) ** 2
    return cams * labels[:, :, None, None]


@pytest.mark.parametrize("height,width,stride", [(21, 30, 8), (16, 24, 8), (10, 7, 4)])
def test_confident_region_label_matches_per_cell_loop(height: int, width: int, stride: int):
    batch, classes = 3, 4
    labels = _labels(batch, classes, seed=3)
    cams = _random_cams(batch, classes, height, width, labels, seed=4)
    valid = _valid(batch, height, width, [(height, width), (height // 2 + 1, width // 3 + 1), (height - 3, width)])
    cams = cams * valid[:, None]
    scores_low = torch.cat([background_score(cams, 4), cams], dim=1) * valid[:, None]
    scores_high = torch.cat([background_score(cams, 32), cams], dim=1) * valid[:, None]
    ours = confident_region_label(cams, labels, stride=stride, valid=valid)
    expected = reference_cell_label(scores_low, scores_high, labels, valid, stride)
    assert ours.shape == (batch, math.ceil(height / stride), math.ceil(width / stride))
    assert torch.equal(ours, expected)
    # Cells without a real pixel are IGN; image 0 (background only) is all 0 on its real cells.
    cell_valid = grid_valid_mask(valid, stride)
    assert not cell_valid[1].all() and torch.all(ours[~cell_valid] == IGN)
    assert torch.all(ours[0] == 0)


def test_confident_region_label_background_wins_and_absent_classes_never_win():
    batch, classes, height, width = 3, 5, 19, 26
    labels = _labels(batch, classes, seed=5)
    generator = _generator(6)
    scores_low = torch.rand(batch, classes + 1, height, width, generator=generator)
    scores_high = torch.rand(batch, classes + 1, height, width, generator=generator)
    absent = torch.cat([torch.zeros(batch, 1, dtype=torch.bool), labels == 0], dim=1)[:, :, None, None]
    scores_low = scores_low.masked_fill(absent, 5.0)  # absent classes score highest everywhere
    scores_high = scores_high.masked_fill(absent, 5.0)
    valid = _valid(batch, height, width, [(height, width), (11, 9), (height, 17)])
    ours = confident_region_label(None, labels, stride=8, valid=valid, scores_low=scores_low, scores_high=scores_high)
    expected = reference_cell_label(scores_low * valid[:, None], scores_high * valid[:, None], labels, valid, 8)
    assert torch.equal(ours, expected)
    for b in range(batch):
        allowed = {0, IGN} | {c + 1 for c in range(classes) if labels[b, c] > 0}
        assert set(ours[b].unique().tolist()) <= allowed
    # The disagreement l_la foreground, l_ha background occurs and resolves to 0.
    only_low = confident_region_label(None, labels, valid=valid, scores_low=scores_low, scores_high=scores_low)
    disagree = (only_low > 0) & (only_low != IGN) & (ours == 0)
    assert disagree.any()


def test_confident_region_label_batched_equals_per_image_and_none_valid_is_all_valid():
    batch, classes, height, width = 3, 4, 20, 27
    labels = _labels(batch, classes, seed=7)
    cams = _random_cams(batch, classes, height, width, labels, seed=8)
    batched = confident_region_label(cams, labels)
    everywhere = confident_region_label(cams, labels, valid=torch.ones(batch, height, width, dtype=torch.bool))
    assert torch.equal(batched, everywhere)
    for b in range(batch):
        assert torch.equal(batched[b:b + 1], confident_region_label(cams[b:b + 1], labels[b:b + 1]))


def test_confident_region_label_rejects_wrong_channels():
    with pytest.raises(ValueError, match="1 \\+ C"):
        confident_region_label(None, torch.ones(1, 3), scores_low=torch.rand(1, 3, 8, 8),
                               scores_high=torch.rand(1, 3, 8, 8))


# --- §3 ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("radius", [1, 2, 3, 5, 6])
def test_pair_offsets_cover_each_unordered_neighbour_once(radius: int):
    offsets = affinity_pair_offsets(radius)
    assert list(offsets) == reference_offsets(radius)
    both = set(offsets) | {(-dy, -dx) for dy, dx in offsets}
    assert len(both) == 2 * len(offsets)  # no offset and its negation both present
    everything = {(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
                  if 0 < dy * dy + dx * dx < radius * radius}
    assert both == everything
    if radius == 5:
        assert len(offsets) == 34


@pytest.mark.parametrize("height,width,radius", [(9, 12, 5), (7, 11, 3), (6, 9, 5), (5, 5, 2), (4, 8, 5), (3, 3, 1)])
def test_pair_indices_match_double_loop(height: int, width: int, radius: int):
    origins, partners = affinity_pair_indices(height, width, radius)
    expected = reference_pairs(height, width, radius)
    assert origins.dtype == partners.dtype == torch.long
    assert list(zip(origins.tolist(), partners.tolist())) == expected
    rows, cols = max(height - radius + 1, 0), max(width - 2 * radius + 2, 0)
    assert origins.numel() == len(reference_offsets(radius)) * rows * cols
    # Every node pair within distance < γ whose raster-earlier end obeys the border rule, once.
    in_rule = set()
    for a in range(height * width):
        for b in range(a + 1, height * width):
            (ya, xa), (yb, xb) = divmod(a, width), divmod(b, width)
            inside = ya < height - radius + 1 and radius - 1 <= xa < width - radius + 1
            if inside and (ya - yb) ** 2 + (xa - xb) ** 2 < radius * radius:
                in_rule.add((a, b))
    found = {(min(i, j), max(i, j)) for i, j in expected}
    assert found == in_rule and len(found) == len(expected)
    assert affinity_pair_indices(height, width, radius)[0] is origins  # cached


def test_pair_labels_match_per_pair_loop():
    height, width, radius = 8, 11, 3
    choices = torch.tensor([0, 1, 2, 3, IGN])
    grid_labels = choices[torch.randint(0, 5, (3, height, width), generator=_generator(9))]
    origins, partners = affinity_pair_indices(height, width, radius)
    background, foreground, negative = affinity_pair_labels(grid_labels, origins, partners)
    assert background.shape == (3, origins.numel()) and background.dtype == torch.bool
    for b in range(3):
        flat = grid_labels[b].flatten().tolist()
        for p, (i, j) in enumerate(zip(origins.tolist(), partners.tolist())):
            first, second = flat[i], flat[j]
            known = first != IGN and second != IGN
            assert bool(background[b, p]) == (known and first == second == 0)
            assert bool(foreground[b, p]) == (known and first == second != 0)
            assert bool(negative[b, p]) == (known and first != second)
    assert background.any() and foreground.any() and negative.any()
    assert not ((background & foreground) | (background & negative) | (foreground & negative)).any()


# --- §4 ----------------------------------------------------------------------------------------

def test_feature_affinity_matches_per_pair_loop():
    batch, channels, height, width, radius = 2, 5, 7, 10, 3
    features = torch.randn(batch, channels, height, width, generator=_generator(10))
    origins, partners = affinity_pair_indices(height, width, radius)
    ours = feature_affinity(features, origins, partners)
    flat = features.flatten(2)
    for b in range(batch):
        for p, (i, j) in enumerate(zip(origins.tolist(), partners.tolist())):
            distance = sum(abs(float(flat[b, d, i]) - float(flat[b, d, j])) for d in range(channels)) / channels
            assert math.isclose(float(ours[b, p]), math.exp(-distance), rel_tol=1e-5)


@pytest.mark.parametrize("height, width, radius", [(7, 10, 3), (16, 16, 5), (9, 5, 2), (4, 4, 5), (5, 12, 5)])
def test_window_feature_affinity_equals_the_gathered_pairs_with_gradients(height, width, radius):
    features = torch.randn(3, 6, height, width, generator=_generator(11), requires_grad=True)
    origins, partners = affinity_pair_indices(height, width, radius)
    gathered = feature_affinity(features, origins, partners)
    windowed = window_feature_affinity(features, radius)
    assert windowed.shape == gathered.shape == (3, origins.numel())
    torch.testing.assert_close(windowed, gathered, rtol=1e-6, atol=1e-7)  # channel means summed in another order
    assert windowed.requires_grad  # a loss over no pairs still backpropagates
    if origins.numel():
        weights = torch.rand(gathered.shape, generator=_generator(12))
        expected, = torch.autograd.grad((gathered * weights).sum(), features)
        ours, = torch.autograd.grad((windowed * weights).sum(), features)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def _hand_loss(affinity, background, foreground, negative):
    def mean(values):
        return sum(values) / len(values) if values else 0.0
    w = affinity.flatten().tolist()
    bg = mean([-math.log(v + 1e-5) for v, m in zip(w, background.flatten().tolist()) if m])
    fg = mean([-math.log(v + 1e-5) for v, m in zip(w, foreground.flatten().tolist()) if m])
    neg = mean([-math.log(1 + 1e-5 - v) for v, m in zip(w, negative.flatten().tolist()) if m])
    return bg / 4 + fg / 4 + neg / 2, (bg, fg, neg)


def test_affinity_loss_matches_hand_computation_and_empty_kinds_give_zero():
    generator = _generator(11)
    affinity = torch.rand(3, 40, generator=generator).clamp(0.01, 0.99)
    kind = torch.randint(0, 4, (3, 40), generator=generator)  # 3: ignored
    cases = [
        (kind == 0, kind == 1, kind == 2),
        (kind == 0, torch.zeros_like(kind, dtype=torch.bool), kind == 2),  # no foreground pairs
        (torch.zeros(3, 40, dtype=torch.bool),) * 3,  # no pairs at all
    ]
    for background, foreground, negative in cases:
        weights = affinity.clone().requires_grad_(True)
        loss, parts = psa_affinity_loss(weights, background, foreground, negative)
        loss.backward()
        loss, parts = loss.detach(), {name: part.detach() for name, part in parts.items()}
        expected, expected_parts = _hand_loss(affinity, background, foreground, negative)
        assert math.isclose(float(loss), expected, rel_tol=1e-5, abs_tol=1e-7)
        got = (parts["background_positive"], parts["foreground_positive"], parts["negative"])
        for value, reference in zip(got, expected_parts):
            assert math.isclose(float(value), reference, rel_tol=1e-5, abs_tol=1e-7)
        assert torch.isfinite(weights.grad).all()
        assert torch.all(weights.grad[~(background | foreground | negative)] == 0)


# --- §5 ----------------------------------------------------------------------------------------

def test_dense_pair_affinity_is_symmetric_with_unit_diagonal():
    height, width, radius = 6, 9, 3
    origins, partners = affinity_pair_indices(height, width, radius)
    affinity = torch.rand(2, origins.numel(), generator=_generator(12))
    dense = dense_pair_affinity(affinity, origins, partners, height * width)
    assert torch.equal(dense, dense.transpose(1, 2))
    assert torch.all(dense.diagonal(dim1=1, dim2=2) == 1)
    assert int((dense > 0).sum()) == 2 * (2 * origins.numel() + height * width)


@pytest.mark.parametrize("height,width,radius,logt", [(6, 9, 3, 8), (5, 10, 2, 3), (3, 4, 5, 8)])
def test_random_walk_matches_dense_reference(height: int, width: int, radius: int, logt: int):
    batch, channels, beta = 2, 4, 8
    generator = _generator(13)
    origins, partners = affinity_pair_indices(height, width, radius)
    affinity = torch.rand(batch, origins.numel(), generator=generator) * 0.6 + 0.4
    scores = torch.rand(batch, channels, height, width, generator=generator)
    ours = psa_random_walk(scores, affinity, origins, partners, beta=beta, logt=logt)
    assert ours.shape == (batch, channels, height, width) and ours.dtype == torch.float32
    pairs = list(zip(origins.tolist(), partners.tolist()))
    for b in range(batch):
        expected = reference_random_walk(scores[b].double().numpy(), affinity[b].double().numpy(), pairs, beta, logt)
        assert np.allclose(ours[b].numpy(), expected, rtol=1e-4, atol=1e-5)
        alone = psa_random_walk(scores[b:b + 1], affinity[b:b + 1], origins, partners, beta=beta, logt=logt)
        assert torch.allclose(alone[0], ours[b], rtol=1e-5, atol=1e-6)
    # Columns of T^t sum to 1: each X*_kj is a convex combination of X_k's nodes.
    low, high = scores.flatten(2).amin(dim=2), scores.flatten(2).amax(dim=2)  # (B, K)
    assert torch.all(ours >= low[:, :, None, None] - 1e-5) and torch.all(ours <= high[:, :, None, None] + 1e-5)


def test_cam_scores_on_grid_matches_per_cell_loop():
    batch, classes, height, width, stride = 2, 3, 13, 18, 8
    labels = _labels(batch, classes, seed=14)
    cams = _random_cams(batch, classes, height, width, labels, seed=15)
    valid = _valid(batch, height, width, [(height, width), (7, 9)])
    ours = cam_scores_on_grid(cams, 16, stride, valid)
    assert ours.shape == (batch, classes + 1, 2, 3)
    for b in range(batch):
        for r in range(2):
            for q in range(3):
                totals = [0.0] * (classes + 1)
                for y in range(r * stride, min((r + 1) * stride, height)):
                    for x in range(q * stride, min((q + 1) * stride, width)):
                        if not valid[b, y, x]:
                            continue
                        totals[0] += (1 - float(cams[b, :, y, x].max())) ** 16
                        for c in range(classes):
                            totals[c + 1] += float(cams[b, c, y, x])
                for k in range(classes + 1):
                    assert math.isclose(float(ours[b, k, r, q]), totals[k] / stride ** 2, rel_tol=1e-5, abs_tol=1e-7)


def test_random_walk_label_crops_the_padded_upsampling_and_skips_absent_classes():
    batch, classes, grid, stride = 2, 3, (3, 4), 8
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    walked = torch.rand(batch, classes + 1, *grid, generator=_generator(16))
    walked[0, 2] = 10.0  # absent class 2 of image 0 scores highest everywhere
    image_size = (19, 29)
    valid = _valid(batch, *image_size, [image_size, (10, 20)])
    ours = random_walk_label(walked, labels, image_size, stride, valid)
    assert ours.shape == (batch, *image_size)
    for b in range(batch):
        upsampled = torch.nn.functional.interpolate(
            walked[b:b + 1], size=(stride * grid[0], stride * grid[1]), mode="bilinear", align_corners=False)[0]
        present = [0] + [c + 1 for c in range(classes) if labels[b, c] > 0]
        for y in range(image_size[0]):
            for x in range(image_size[1]):
                if not valid[b, y, x]:
                    assert ours[b, y, x] == IGN
                    continue
                values = [float(upsampled[k, y, x]) for k in present]
                assert ours[b, y, x] == present[values.index(max(values))]
    with pytest.raises(ValueError, match="image_size"):
        random_walk_label(walked, labels, (25, 29), stride)


@pytest.mark.parametrize("flip", [True, False])
def test_psa_multi_scale_cams_match_per_image_loop(flip: bool):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, kernel_size=4, stride=4)

    def cam_fn(images, affinity_images):
        return conv(images), None

    images = torch.randn(2, 3, 36, 44)
    labels = torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 1]])
    scales = (1.0, 0.5, 1.5, 2.0)
    expected = []
    with torch.no_grad():
        for image, label in zip(images, labels):
            total = torch.zeros(4, 36, 44)
            for scale in scales:
                size = (int(scale * 36), int(scale * 44))
                scaled = torch.nn.functional.interpolate(image[None], size=size, mode="bilinear", align_corners=False)
                passes = [conv(scaled).relu()] + ([conv(scaled.flip(-1)).relu().flip(-1)] if flip else [])
                for cam in passes:
                    total += torch.nn.functional.interpolate(cam, size=(36, 44), mode="bilinear", align_corners=False)[0]
            for c in range(4):
                total[c] = total[c] / (total[c].max() + 1e-5) * label[c]
            expected.append(total)
        cams = psa_multi_scale_cams(cam_fn, images, labels, scales, flip=flip)
    torch.testing.assert_close(cams, torch.stack(expected), atol=1e-5, rtol=1e-5)
    assert cams.max() < 1 and (cams[0, 1] == 0).all()

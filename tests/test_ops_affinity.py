"""Affinity labels and the affinity loss (AFA.md §6)."""
from __future__ import annotations

import torch

from afa.ops import affinity_labels_from_segmentation, affinity_loss
from tests.reference_ops import IGN, reference_affinity_labels, reference_affinity_loss

TOLERANCE = 1e-5


def _segmentation(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (batch, height, width), generator=generator)
    labels[torch.rand(batch, height, width, generator=generator) < 0.2] = IGN
    return labels


def test_affinity_labels_match_reference():
    labels = _segmentation(3, 96, 112, seed=0)
    ours = affinity_labels_from_segmentation(labels, (6, 7), radius=2)
    expected = reference_affinity_labels(labels, (6, 7), radius=2)
    assert ours.dtype == torch.uint8 and ours.shape == (3, 42, 42)
    assert torch.equal(ours.long(), expected)
    assert torch.equal(ours, ours.transpose(1, 2))
    square = affinity_labels_from_segmentation(labels[:, :96, :96], 6, radius=8)
    assert torch.equal(square.long(), reference_affinity_labels(labels[:, :96, :96], (6, 6), radius=8))


def test_affinity_loss_matches_reference_and_counts_pairs():
    targets = affinity_labels_from_segmentation(_segmentation(2, 64, 64, seed=1), (4, 4), radius=1)
    prediction = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(2), requires_grad=True)
    loss, counts = affinity_loss(prediction, targets)
    assert abs(loss.item() - reference_affinity_loss(prediction, targets.long()).item()) <= TOLERANCE
    assert counts["positive_pairs"].item() == int((targets == 1).sum())
    assert counts["negative_pairs"].item() == int((targets == 0).sum())
    loss.backward()
    assert torch.isfinite(prediction.grad).all()


def test_all_ignore_affinity_loss_is_zero_with_finite_gradient():
    targets = torch.full((2, 9, 9), IGN, dtype=torch.uint8)
    prediction = torch.rand(2, 9, 9, requires_grad=True)
    loss, counts = affinity_loss(prediction, targets)
    loss.backward()
    assert loss.item() == 0 and counts["positive_pairs"].item() == 0
    assert torch.isfinite(prediction.grad).all() and torch.all(prediction.grad == 0)

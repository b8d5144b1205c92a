"""Classification and balanced segmentation losses (AFA.md §8)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from afa.ops import balanced_segmentation_loss, multilabel_soft_margin_loss
from tests.reference_ops import (
    IGN,
    reference_balanced_segmentation_loss,
    reference_multilabel_soft_margin_loss,
)

TOLERANCE = 1e-5


def test_multilabel_soft_margin_matches_formula():
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4, 20, generator=generator)
    labels = (torch.rand(4, 20, generator=generator) < 0.3).float()
    ours = multilabel_soft_margin_loss(logits, labels)
    assert abs(ours.item() - reference_multilabel_soft_margin_loss(logits, labels).item()) <= TOLERANCE


def _logits_and_target(seed: int):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, 8, 10, generator=generator, requires_grad=True)
    target = torch.randint(0, 5, (2, 32, 40), generator=generator)
    target[torch.rand(2, 32, 40, generator=generator) < 0.3] = IGN
    return logits, target


def test_balanced_segmentation_loss_matches_reference():
    logits, target = _logits_and_target(seed=1)
    ours = balanced_segmentation_loss(logits, target)
    assert abs(ours.item() - reference_balanced_segmentation_loss(logits, target).item()) <= TOLERANCE
    # Same-size logits skip the resize.
    full = F.interpolate(logits.detach(), size=(32, 40), mode="bilinear", align_corners=False)
    assert abs(balanced_segmentation_loss(full, target).item() - ours.item()) <= TOLERANCE


def test_balanced_segmentation_loss_with_one_empty_part():
    logits, target = _logits_and_target(seed=2)
    only_background = torch.where(target == IGN, IGN, 0)
    ours = balanced_segmentation_loss(logits, only_background)
    upsampled = F.interpolate(logits, size=(32, 40), mode="bilinear", align_corners=False)
    expected = 0.5 * F.cross_entropy(upsampled, only_background, ignore_index=IGN)
    assert abs(ours.item() - expected.item()) <= TOLERANCE


def test_all_ignore_batch_gives_zero_loss_and_finite_gradient():
    logits, target = _logits_and_target(seed=3)
    loss = balanced_segmentation_loss(logits, torch.full_like(target, IGN))
    loss.backward()
    assert loss.item() == 0
    assert torch.isfinite(logits.grad).all() and torch.all(logits.grad == 0)

"""Windows, transitions and propagation (AFA.md §6, §7, §10) against per-image references."""
from __future__ import annotations

import pytest
import torch

from afa.ops import (
    class_channel_index,
    local_window_mask,
    local_window_neighbours,
    propagate_cams_with_affinity,
    random_walk_transition,
)
from afa.ops.random_walk import _random_walk
from tests.reference_ops import (
    IGN,
    random_images,
    random_labels_and_boxes,
    reference_propagate,
    reference_propagate_for_evaluation,
    reference_propagate_with_affinity,
    reference_transition,
    reference_window_mask,
)

TOLERANCE = 1e-5
IMPLEMENTATIONS = ("dense", "windowed")


def _symmetric_affinity(batch: int, nodes: int, seed: int) -> torch.Tensor:
    affinity = torch.rand(batch, nodes, nodes, generator=torch.Generator().manual_seed(seed))
    return (affinity + affinity.transpose(1, 2)) / 2


@pytest.mark.parametrize("height,width,radius", [(5, 7, 2), (6, 6, 8), (4, 9, 1)])
def test_window_matches_double_loop(height: int, width: int, radius: int):
    assert torch.equal(local_window_mask(height, width, radius), reference_window_mask(height, width, radius))


def test_window_is_cached_per_size_and_device():
    assert local_window_mask(7, 8, 3, "cpu") is local_window_mask(7, 8, 3, torch.device("cpu"))
    assert local_window_mask(7, 8, 3) is not local_window_mask(7, 8, 2)


def test_transition_matches_reference():
    affinity = torch.rand(3, 30, 30, generator=torch.Generator().manual_seed(0))  # not symmetric
    window = local_window_mask(5, 6, 2)
    before = affinity.clone()
    ours = random_walk_transition(affinity, window)
    assert (ours - reference_transition(affinity, window)).abs().max() <= TOLERANCE
    assert torch.equal(affinity, before)  # the input is left intact


def test_symmetric_affinity_gives_symmetric_weights_and_column_stochastic_bound():
    affinity = _symmetric_affinity(2, 42, seed=1)
    window = local_window_mask(6, 7, 2)
    transition = random_walk_transition(affinity, window)
    weights = (affinity * window) ** 2
    column_sums = weights.sum(dim=1, keepdim=True)
    # T = W D⁻¹ with D = diag(Σ_i W_ij + 0.1): undoing the column scaling gives back W, symmetric.
    recovered = transition * (column_sums + 0.1)
    assert torch.allclose(recovered, recovered.transpose(1, 2), atol=1e-6)
    assert torch.allclose(recovered, weights, atol=1e-6)
    assert torch.all(transition[:, ~window] == 0)
    totals = transition.sum(dim=1)
    assert torch.all(totals < 1) and torch.allclose(totals, (column_sums / (column_sums + 0.1))[:, 0], atol=1e-6)


def _walk(cams_on_grid, labels, affinity, radius, thresholds, implementation):
    """The random-walk step on all classes: (B, C, h, w) -> (B, len(thresholds), K, h·w)."""
    grid = tuple(cams_on_grid.shape[-2:])
    return _random_walk(cams_on_grid.flatten(2), labels, class_channel_index(labels), affinity, grid, radius,
                        tuple(thresholds), implementation)


# "windowed" takes the sparse product on (8, 9) and (12, 12); on (5, 6) and (3, 4) the window
# covers over half the grid and it takes the dense one.
@pytest.mark.parametrize("grid,radius", [((5, 6), 2), ((8, 9), 2), ((12, 12), 3), ((3, 4), 8)])
def test_random_walk_matches_reference_in_both_implementations(grid: tuple[int, int], radius: int):
    batch, classes = 3, 4
    generator = torch.Generator().manual_seed(14)
    nodes = grid[0] * grid[1]
    cams = torch.rand(batch, classes, *grid, generator=generator)
    labels = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    affinity = torch.rand(batch, nodes, nodes, generator=generator)  # not symmetric: columns matter
    window = local_window_mask(*grid, radius)
    walked = {choice: _walk(cams, labels, affinity, radius, (0.3, 0.6), choice) for choice in IMPLEMENTATIONS}
    assert walked["dense"].shape == (batch, 2, classes + 1, nodes)
    assert (walked["dense"] - walked["windowed"]).abs().max() <= TOLERANCE
    absent = torch.cat([torch.zeros(batch, 1, dtype=torch.bool), labels == 0], dim=1)
    for choice, both in walked.items():
        for index, tau in enumerate((0.3, 0.6)):
            assert (both[:, index] - reference_propagate(cams, labels, affinity, window, tau)).abs().max() <= TOLERANCE
            # Stacked thresholds equal one call per threshold.
            alone = _walk(cams, labels, affinity, radius, (tau,), choice)[:, 0]
            assert (both[:, index] - alone).abs().max() <= 1e-6
        assert torch.all(both[absent[:, None, :, None].expand_as(both)] == 0), choice


# On (3, 4) with r = 1 the window covers over half the grid, so "windowed" takes the dense product.
@pytest.mark.parametrize("grid,radius", [((3, 4), 1), ((8, 10), 2)])
def test_propagate_with_affinity_matches_reference(grid: tuple[int, int], radius: int):
    batch, classes, height, width = 3, 5, 48, 64
    images = random_images(batch, height, width, seed=4)
    cams = torch.rand(batch, classes, height, width, generator=torch.Generator().manual_seed(5))
    labels, boxes = random_labels_and_boxes(batch, classes, height, width, seed=6)
    affinity = _symmetric_affinity(batch, grid[0] * grid[1], seed=7)
    expected = reference_propagate_with_affinity(cams, labels, affinity, images, boxes, radius=radius, grid=grid)
    most = int(labels.sum(dim=1).max())
    for choice in IMPLEMENTATIONS:
        ours = propagate_cams_with_affinity(
            cams, labels, affinity, images, boxes, implementation=choice, radius=radius, grid_size=grid)
        assert ours.dtype == torch.int64
        assert torch.equal(ours, expected), choice
        compact = propagate_cams_with_affinity(
            cams, labels, affinity, images, boxes, implementation=choice, thresholds=(0.55, 0.35), radius=radius,
            grid_size=grid, max_classes_per_image=most)
        assert torch.equal(compact, expected), choice


def test_propagate_with_affinity_square_grid_default_and_bad_arguments():
    images = random_images(1, 32, 32, seed=8)
    cams = torch.rand(1, 3, 32, 32)
    labels = torch.tensor([[1.0, 0.0, 1.0]])
    boxes = torch.tensor([[0, 32, 0, 32]])
    affinity = _symmetric_affinity(1, 16, seed=9)
    ours = propagate_cams_with_affinity(cams, labels, affinity, images, boxes, implementation="dense", radius=2)
    assert torch.equal(ours, reference_propagate_with_affinity(cams, labels, affinity, images, boxes, radius=2))
    with pytest.raises(ValueError, match="grid_size"):
        propagate_cams_with_affinity(cams, labels, affinity, images, boxes, implementation="dense", grid_size=(2, 4))
    with pytest.raises(ValueError, match="grid_size"):
        propagate_cams_with_affinity(cams, labels, _symmetric_affinity(1, 12, 0), images, boxes, implementation="dense")
    with pytest.raises(ValueError, match="implementation 'sparse'"):
        propagate_cams_with_affinity(cams, labels, affinity, images, boxes, implementation="sparse")
    with pytest.raises(ValueError, match="two thresholds"):  # the training label needs both τ
        propagate_cams_with_affinity(cams, labels, affinity, images, boxes, implementation="dense", thresholds=(0.35,))
    with pytest.raises(ValueError, match="two thresholds"):  # images without their boxes
        propagate_cams_with_affinity(cams, labels, affinity, images, implementation="dense", thresholds=(0.35, 0.55))
    with pytest.raises(ValueError, match="two thresholds"):  # evaluation takes one τ
        propagate_cams_with_affinity(cams, labels, affinity, implementation="dense", thresholds=(0.35, 0.55))


# (40, 50) with r = 8: the window covers the 3×4 grid, so "windowed" takes the dense product.
@pytest.mark.parametrize("height,width,radius", [(40, 50, 8), (150, 170, 2)])
def test_propagate_for_evaluation_matches_reference(height: int, width: int, radius: int):
    batch, classes = 2, 4
    grid = (-(-height // 16), -(-width // 16))  # ⌈h/16⌉×⌈w/16⌉
    cams = torch.rand(batch, classes, height, width, generator=torch.Generator().manual_seed(10))
    labels = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]])
    affinity = _symmetric_affinity(batch, grid[0] * grid[1], seed=11)
    expected = reference_propagate_for_evaluation(cams, labels, affinity, tau=0.35, radius=radius)
    for choice in IMPLEMENTATIONS:
        ours = propagate_cams_with_affinity(
            cams, labels, affinity, implementation=choice, thresholds=(0.35,), radius=radius, grid_size=grid)
        assert torch.equal(ours, expected), choice
        assert ours.max() < IGN


def test_window_neighbours_list_the_window():
    index, valid = local_window_neighbours(5, 7, 2)
    mask = torch.zeros(35, 35, dtype=torch.bool)
    mask[torch.arange(35)[:, None].expand_as(index)[valid], index[valid]] = True
    assert torch.equal(mask, local_window_mask(5, 7, 2))
    assert valid.sum(dim=1).eq(mask.sum(dim=1)).all()  # no node listed twice

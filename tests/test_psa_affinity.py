"""PSA affinity loss and random-walk labels on an AffinityNet (PSA.md §3-§5)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from afa.engine.builders import build_affinity_network
from afa.engine.psa_affinity import WalkOptions, affinity_training_loss, random_walk_labels
from afa.ops import random_walk_label
from tests.test_train import compose_config

GRID = (8, 10)  # 64 x 80 images on the stride-8 grid


def segment_grid() -> torch.Tensor:
    """(h, w) int64: class 2 in rows 2-5, columns 3-7; background elsewhere."""
    grid = torch.zeros(GRID, dtype=torch.long)
    grid[2:6, 3:8] = 2
    return grid


class SegmentFeatures(nn.Module):
    """Features that separate the segments perfectly: affinity 1 within, e^-10 across."""

    def __init__(self, grid: torch.Tensor) -> None:
        super().__init__()
        self.features = 20.0 * torch.stack([grid == 0, grid == 2]).float()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.shape[-2] % 8 == 0 and images.shape[-1] % 8 == 0  # padded to the grid
        return self.scale * self.features.expand(images.shape[0], -1, -1, -1)


def test_random_walk_spreads_a_partial_cam_over_its_segment():
    grid = segment_grid()
    scores = torch.zeros(1, 4, *GRID)  # background + 3 classes
    scores[0, 0] = 0.3
    scores[0, 2, 2:6, 3:6] = 1.0  # the CAM covers 3 of the object's 5 columns
    labels = torch.tensor([[0.0, 1.0, 0.0]])  # class id 2 is index 1
    images = torch.zeros(1, 3, 61, 77)  # not multiples of 8: padded inside, cropped back
    before = random_walk_label(scores, labels, (61, 77))
    after = random_walk_labels(SegmentFeatures(grid), images, labels, scores, WalkOptions())
    truth = torch.nn.functional.interpolate(grid[None, None].float(), size=(64, 80), mode="nearest")[0, 0, :61, :77].long()
    assert after.shape == (1, 61, 77)
    error_after, error_before = ((after[0] != truth).float().mean(), (before[0] != truth).float().mean())
    assert error_after < 0.04 and error_after < error_before / 3  # what remains: bilinear upsampling at the edges


def test_perfect_features_have_a_lower_loss_than_random_ones():
    grid = segment_grid()
    labels = grid.clone()
    labels[0, :] = 255  # a neutral row: its pairs are ignored
    images = torch.zeros(2, 3, 64, 80)
    perfect, parts = affinity_training_loss(SegmentFeatures(grid), images, labels.expand(2, -1, -1))
    assert parts["background_positive_pairs"] > 0 and parts["foreground_positive_pairs"] > 0 and parts["negative_pairs"] > 0

    class RandomFeatures(nn.Module):
        def forward(self, images):
            return torch.randn(images.shape[0], 2, *GRID, generator=torch.Generator().manual_seed(0))

    random_loss, _ = affinity_training_loss(RandomFeatures(), images, labels.expand(2, -1, -1))
    assert perfect < 0.01 < random_loss


def test_affinity_net_trains_end_to_end():
    torch.manual_seed(0)
    network = build_affinity_network(compose_config(["model=mit_tiny"]).model)
    images = torch.randn(2, 3, 64, 80)
    labels = segment_grid().expand(2, -1, -1)
    loss, _ = affinity_training_loss(network, images, labels)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in network.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="stride"):
        affinity_training_loss(network, images, labels[:, :4])


def test_cam_stage_then_random_walk_writes_pseudo_labels(tmp_path):
    from afa.data import FullImageEvalDataset, SameSizeBatchSampler, build_loader, read_mask, voc_index
    from afa.data.readers import DatasetError
    from afa.engine.builders import build_network
    from afa.engine.psa_affinity import PSEUDO_LABELS, WithWalkScores, write_walk_labels
    from afa.engine.psa_cam import CAMStageOptions, write_cam_stage
    from tests.fixtures import write_voc_fixture

    folder = write_voc_fixture(tmp_path / "voc", {"a": [1], "b": [3, 5]}, size=(61, 77))  # PNG images
    index = voc_index(folder, "ab", split_file=_write_list(tmp_path / "ab.txt", ["a", "b"]),
                      labels_file=folder / "cls_labels.json", image_ext=".png", with_masks=True)
    dataset = FullImageEvalDataset(index)
    dataset.prepare()

    def batches(data):
        return build_loader(data, batch_sampler=SameSizeBatchSampler(data.image_sizes, 2), num_workers=0)

    torch.manual_seed(0)
    model = compose_config(["model=mit_tiny"]).model
    cam_metrics = write_cam_stage(build_network(model, 20).eval(), batches(dataset), tmp_path / "cam", 20,
                                  CAMStageOptions(scales=(1.0,)), torch.device("cpu"))
    assert cam_metrics is not None
    affinity_net = build_affinity_network(model).eval()
    walk_data = WithWalkScores(dataset, tmp_path / "cam", 20)
    metrics = write_walk_labels(affinity_net, batches(walk_data), tmp_path / "rw", 20, WalkOptions(), torch.device("cpu"))
    assert metrics is not None and 0.0 <= metrics["miou"] <= 1.0
    for k, name in enumerate(["a", "b"]):
        written = read_mask(tmp_path / "rw" / PSEUDO_LABELS / f"{name}.png")
        sample = walk_data[k]
        direct = random_walk_labels(affinity_net, sample["image"][None], sample["labels"][None], sample["walk_scores"][None])
        assert written.shape == (61, 77) and (torch.from_numpy(written.astype("int64")) == direct[0]).all()
        present = {0} | {int(c) + 1 for c in sample["labels"].nonzero().flatten()}
        assert set(written.flatten().tolist()) <= present
    with pytest.raises(DatasetError, match="run the CAM stage first"):
        WithWalkScores(dataset, tmp_path / "nowhere", 20)[0]


def _write_list(path, names):
    path.write_text("".join(f"{n}\n" for n in names))
    return path

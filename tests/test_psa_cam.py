"""The PSA CAM stage's outputs: batched = per image, files round-trip, CRF per present class."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from afa.crf import CRFUnavailableError, dense_crf, require_crf
from afa.data.readers import read_mask
from afa.engine.builders import build_network
from afa.engine.psa_cam import (
    AFFINITY_LABELS,
    PSA_CRF,
    WALK_SCORES,
    CAMStageOptions,
    cam_stage_outputs,
    crf_jobs,
    crf_region_label,
    crf_score_pair,
    load_walk_scores,
    write_cam_stage,
)
from afa.ops import confident_region_label, psa_multi_scale_cams, scores_with_background
from afa.viz import denormalize_image
from tests.test_train import compose_config

CLASSES = 4


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    return build_network(compose_config(["model=mit_tiny"]).model, CLASSES).eval()


def batch_of(count: int, height: int = 64, width: int = 88, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.zeros(count, CLASSES)
    labels[torch.arange(count), torch.arange(count) % CLASSES] = 1
    labels[0, 3] = 1
    return {"name": [f"img{seed}_{k}" for k in range(count)], "image": torch.randn(count, 3, height, width, generator=generator),
            "labels": labels, "mask": torch.randint(0, CLASSES + 1, (count, height, width), generator=generator)}


def test_batched_outputs_equal_per_image(network):
    batch = batch_of(3)
    options = CAMStageOptions(scales=(1.0, 0.5, 1.5))
    together = cam_stage_outputs(network, batch["image"], batch["labels"], options)
    assert together.affinity_label.shape == (3, 8, 11) and together.walk_scores.shape == (3, 1 + CLASSES, 8, 11)
    assert together.cam_label.shape == (3, 64, 88)
    for k in range(3):
        alone = cam_stage_outputs(network, batch["image"][k : k + 1], batch["labels"][k : k + 1], options)
        assert torch.equal(alone.cam_label[0], together.cam_label[k])
        assert torch.equal(alone.affinity_label[0], together.affinity_label[k])
        torch.testing.assert_close(alone.walk_scores[0], together.walk_scores[k], atol=1e-5, rtol=1e-5)
    absent = batch["labels"] == 0
    assert (together.walk_scores[:, 1:][absent] == 0).all()  # absent classes carry no score
    labels_present = set(together.affinity_label.unique().tolist()) - {0, 255}
    assert all(c - 1 < CLASSES for c in labels_present)


def test_written_files_round_trip_and_cam_label_is_scored(network, tmp_path):
    batches = [batch_of(2, seed=1), batch_of(1, 72, 64, seed=2)]
    options = CAMStageOptions(scales=(1.0, 0.5))
    metrics = write_cam_stage(network, batches, tmp_path, CLASSES, options, torch.device("cpu"))
    assert metrics is not None and 0.0 <= metrics["miou"] <= 1.0
    for batch in batches:
        output = cam_stage_outputs(network, batch["image"], batch["labels"], options)
        for k, name in enumerate(batch["name"]):
            np.testing.assert_array_equal(read_mask(tmp_path / AFFINITY_LABELS / f"{name}.png"),
                                          output.affinity_label[k].numpy())
            stored = load_walk_scores(tmp_path / WALK_SCORES / f"{name}.npz", CLASSES)
            torch.testing.assert_close(stored, output.walk_scores[k], atol=2e-3, rtol=2e-3)  # float16 on disk
    unscored = write_cam_stage(network, [{k: v for k, v in batches[0].items() if k != "mask"}], tmp_path / "u",
                               CLASSES, options, torch.device("cpu"))
    assert unscored is None


def crf_available() -> bool:
    try:
        require_crf()
    except CRFUnavailableError:
        return False
    return True


@pytest.mark.skipif(not crf_available(), reason="pydensecrf2 not installed (pip install -r requirements-crf.txt)")
def test_crf_scores_refine_the_present_classes_only(network):
    batch = batch_of(2, 64, 72, seed=3)
    options = CAMStageOptions(scales=(1.0,), crf=PSA_CRF)
    cams = psa_multi_scale_cams(network.forward_cam, batch["image"], batch["labels"], (1.0,))
    pixels = denormalize_image(batch["image"])
    jobs = crf_jobs(batch["image"], cams, batch["labels"], options)
    expected_labels = []
    for k, job in enumerate(jobs):
        channels = torch.cat([torch.zeros(1, dtype=torch.long), batch["labels"][k].nonzero().flatten() + 1])
        assert torch.equal(job.channels, channels)
        refined = crf_score_pair(job.pixels, job.scores, PSA_CRF)
        full = torch.zeros(2, 1 + CLASSES, 64, 72)  # absent channels stay 0 so they never win
        for a, alpha in enumerate((options.alpha_low, options.alpha_high)):
            expected = dense_crf(pixels[k], scores_with_background(cams, alpha)[k, channels].numpy(), PSA_CRF)
            np.testing.assert_allclose(refined[a], expected, atol=1e-6)
            full[a, channels] = torch.from_numpy(expected)
        expected_labels.append(confident_region_label(None, batch["labels"][k:k + 1], scores_low=full[:1],
                                                      scores_high=full[1:])[0])
        assert torch.equal(crf_region_label(job, refined, batch["labels"][k], options), expected_labels[-1])
    with_crf = cam_stage_outputs(network, batch["image"], batch["labels"], options)
    assert with_crf.affinity_label.shape == (2, 8, 9)
    assert torch.equal(with_crf.affinity_label, torch.stack(expected_labels))


@pytest.mark.skipif(not crf_available(), reason="pydensecrf2 not installed (pip install -r requirements-crf.txt)")
def test_crf_on_worker_processes_writes_what_the_inline_crf_computes(network, tmp_path):
    batches = [batch_of(3, 64, 72, seed=4), batch_of(2, 72, 64, seed=5), batch_of(1, 64, 80, seed=6)]
    options = CAMStageOptions(scales=(1.0, 0.5), crf=PSA_CRF)
    pooled = write_cam_stage(network, batches, tmp_path / "pooled", CLASSES, options, torch.device("cpu"), crf_workers=2)
    inline = write_cam_stage(network, batches, tmp_path / "inline", CLASSES, options, torch.device("cpu"))
    assert pooled == inline
    for batch in batches:
        output = cam_stage_outputs(network, batch["image"], batch["labels"], options)
        for k, name in enumerate(batch["name"]):
            for folder in ("pooled", "inline"):
                np.testing.assert_array_equal(read_mask(tmp_path / folder / AFFINITY_LABELS / f"{name}.png"),
                                              output.affinity_label[k].numpy())

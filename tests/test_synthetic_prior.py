"""The tiny MiT's synthetic prior: the shipped weights, the pretraining data's disjointness
from the benchmark, and the pretraining script (docs/synthetic.md)."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from afa.data.synthetic import SPLIT_CODES, SYNTHETIC_CLASSES, generate_split_image, image_seed
from afa.data.synthetic_prior import (
    NUM_PRIOR_CLASSES,
    PRIOR_CLASSES,
    PRIOR_VAL_OFFSET,
    SyntheticPriorDataset,
    generate_prior_image,
    prior_seed,
)
from afa.engine.builders import build_network
from afa.models.mit import build_mit
from afa.models.weights import load_pretrained_encoder, read_state_dict

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "weights" / "mit_tiny_synthetic_prior.pth"


def mark_like(image: np.ndarray) -> np.ndarray:
    """Pixels as saturated and bright as a benchmark mark (its colours: saturation and value 0.8-1)."""
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    return (hsv[..., 1] >= 0.6 * 255) & (hsv[..., 2] >= 0.6 * 255)


def test_shipped_prior_loads_strictly_through_its_experiment():
    state = read_state_dict(WEIGHTS)
    encoder = build_mit("tiny", strides=(4, 2, 1, 1))
    assert set(state) == set(encoder.state_dict())  # the SegFormer mit_*.pth key layout, encoder only
    load_pretrained_encoder(encoder, WEIGHTS)  # strict
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, state[key].float()), key
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        prior = compose(config_name="config", overrides=["experiment=synthetic_prior"])
        default = compose(config_name="config")
    assert Path(prior.model.pretrained) == WEIGHTS and default.model.pretrained is None
    network = build_network(prior.model, 8)  # what train.py builds: the prior in the encoder
    assert torch.equal(network.encoder.block4[1].mlp.fc2.weight, state["block4.1.mlp.fc2.weight"].float())
    record = json.loads(WEIGHTS.with_suffix(".json").read_text())
    assert record["command"].startswith("python benchmarks/pretrain_tiny.py") and record["prior_val"]["miou"] > 0.5


def test_prior_shares_no_class_seed_or_image_with_the_benchmark():
    assert set(PRIOR_CLASSES[1:]).isdisjoint(SYNTHETIC_CLASSES[1:])
    # Benchmark keys are [seed, split, index]; prior keys have four words.
    assert len(prior_seed(0)) == 4 and len(image_seed(0, "train", 0)) == 3
    benchmark = {generate_split_image(0, split, i).image.tobytes() for split in SPLIT_CODES for i in range(30)}
    prior = [generate_prior_image(i) for i in (*range(60), *range(PRIOR_VAL_OFFSET, PRIOR_VAL_OFFSET + 20))]
    assert not benchmark & {sample.image.tobytes() for sample in prior}


def test_prior_images_hold_no_marks():
    marked = [mark_like(generate_split_image(0, "val", i).image).sum() for i in range(20)]
    assert min(marked) > 10  # the detector finds every benchmark image's mark
    for index in range(80):
        sample = generate_prior_image(index)
        assert mark_like(sample.image).sum() == 0, index
        assert set(np.unique(sample.mask)) <= set(range(NUM_PRIOR_CLASSES + 1)) | {255}
        assert sample.classes and set(sample.classes) == set(np.unique(sample.mask)) - {0, 255}


def test_prior_images_are_a_function_of_their_index():
    first, again = generate_prior_image(7), generate_prior_image(7)
    assert np.array_equal(first.image, again.image) and np.array_equal(first.mask, again.mask)
    item = SyntheticPriorDataset(start=5, length=3)[2]
    assert item["image"].shape == (3, 128, 128) and item["labels"].shape == (NUM_PRIOR_CLASSES,)
    assert torch.equal(item["mask"], torch.from_numpy(generate_prior_image(7).mask.astype(np.int64)))


def _pretrain(tmp_path: Path, work: str, *extra: str) -> dict:
    from benchmarks import pretrain_tiny

    return pretrain_tiny.main(["--iterations", "4", "--batch-size", "2", "--val-images", "4", "--eval-every", "2",
                               "--workers", "0", "--warmup", "1", "--out", str(tmp_path / work / "prior.pth"),
                               "--work-dir", str(tmp_path / work), *extra])


def test_pretraining_writes_loadable_weights_and_resumes_bit_identically(tmp_path, monkeypatch):
    from benchmarks import pretrain_tiny

    record = _pretrain(tmp_path, "whole")
    assert [entry["iteration"] for entry in record["history"]] == [2, 4] and "positive_recall" not in record["prior_val"]
    with_affinity = _pretrain(tmp_path, "affinity", "--aff-weight", "1", "--iterations", "2")
    assert 0 <= with_affinity["prior_val"]["negative_recall"] <= 1
    load_pretrained_encoder(build_mit("tiny"), tmp_path / "whole" / "prior.pth")

    calls = {"n": 0}
    original = pretrain_tiny.losses

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # the 4th iteration: after the checkpoint at iteration 2
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(pretrain_tiny, "losses", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _pretrain(tmp_path, "resumed", "--checkpoint-every", "2")
    assert (tmp_path / "resumed" / "last.pt").is_file()
    monkeypatch.setattr(pretrain_tiny, "losses", original)
    with pytest.raises(SystemExit, match="other options"):
        _pretrain(tmp_path, "resumed", "--checkpoint-every", "2", "--lr", "0.5")
    _pretrain(tmp_path, "resumed", "--checkpoint-every", "2")
    whole, resumed = (read_state_dict(tmp_path / name / "prior.pth") for name in ("whole", "resumed"))
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)
    assert not (tmp_path / "resumed" / "last.pt").exists()  # removed once the weights are written

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
from afa.engine.checkpoint import load_checkpoint
from afa.models.mit import AttentionFactors, build_mit
from afa.ops import affinity_labels_from_segmentation
from afa.models.network import build_afa_network
from afa.models.weights import load_pretrained_encoder, read_state_dict
from tests.test_eval import trained  # noqa: F401  (fixture: the tiny synthetic run)

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "weights" / "mit_tiny_synthetic_prior.pth"


def mark_like(image: np.ndarray, least: float = 0.6) -> np.ndarray:
    """Pixels as saturated and bright as a benchmark mark (its colours: saturation and value 0.8-1)."""
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    return (hsv[..., 1] >= least * 255) & (hsv[..., 2] >= least * 255)


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
    prior = [generate_prior_image(i, style=style) for style in ("plain", "parts")
             for i in (*range(60), *range(PRIOR_VAL_OFFSET, PRIOR_VAL_OFFSET + 20))]
    assert not benchmark & {sample.image.tobytes() for sample in prior}


def class_hue_distance(image: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Each selected pixel's hue distance (fraction of the circle) to the nearest mark hue k/8."""
    hue = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL)[..., 0][pixels].astype(np.float64) / 256.0
    return np.abs((hue[:, None] - np.arange(8) / 8 + 0.5) % 1.0 - 0.5).min(axis=1)


def test_prior_images_hold_no_marks():
    benchmark = [generate_split_image(0, "val", i).image for i in range(20)]
    assert min(mark_like(image).sum() for image in benchmark) > 10  # the detector finds every benchmark image's mark
    for index in range(80):
        sample = generate_prior_image(index)
        assert mark_like(sample.image).sum() == 0, index
        assert set(np.unique(sample.mask)) <= set(range(NUM_PRIOR_CLASSES + 1)) | {255}
        assert sample.classes and set(sample.classes) == set(np.unique(sample.mask)) - {0, 255}


def test_parts_style_colours_are_never_a_marks_colour():
    # A mark's own pixels (saturation and value >= 0.8) lie within 0.025 of its class hue.
    marks = np.concatenate([class_hue_distance(image, mark_like(image, 0.8))
                            for image in (generate_split_image(0, "val", i).image for i in range(40))])
    assert marks.size > 1000 and marks.max() < 0.025
    saturated, shown = [], 0
    for index in (*range(80), *range(PRIOR_VAL_OFFSET, PRIOR_VAL_OFFSET + 20)):
        sample = generate_prior_image(index, style="parts")
        pixels = mark_like(sample.image)
        saturated.append(class_hue_distance(sample.image, pixels))
        shown += bool(pixels.any())
        assert sample.classes and set(sample.classes) == set(np.unique(sample.mask)) - {0, 255}
    assert shown > 40  # the style does paint saturated parts, as bright as marks
    assert np.concatenate(saturated).min() >= 0.04  # halfway between two mark hues, give or take 0.02
    assert not np.array_equal(generate_prior_image(3, style="parts").image, generate_prior_image(3).image)
    with pytest.raises(ValueError, match="plain, parts"):
        generate_prior_image(0, style="marks")


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


@pytest.mark.parametrize("extra", [(), ("--colour-weight", "1", "--logit-rms-max", "0.5")], ids=["plain", "colour-rms"])
def test_pretraining_writes_loadable_weights_and_resumes_bit_identically(tmp_path, monkeypatch, extra):
    from benchmarks import pretrain_tiny

    record = _pretrain(tmp_path, "whole", *extra)
    assert [entry["iteration"] for entry in record["history"]] == [2, 4] and "positive_recall" not in record["prior_val"]
    if not extra:
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
        _pretrain(tmp_path, "resumed", "--checkpoint-every", "2", *extra)
    assert (tmp_path / "resumed" / "last.pt").is_file()
    monkeypatch.setattr(pretrain_tiny, "losses", original)
    with pytest.raises(SystemExit, match="other options"):
        _pretrain(tmp_path, "resumed", "--checkpoint-every", "2", "--lr", "0.5", *extra)
    _pretrain(tmp_path, "resumed", "--checkpoint-every", "2", *extra)
    whole, resumed = (read_state_dict(tmp_path / name / "prior.pth") for name in ("whole", "resumed"))
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)
    assert not (tmp_path / "resumed" / "last.pt").exists()  # removed once the weights are written


def test_colour_loss_reads_the_cells_mean_colour():
    from benchmarks.pretrain_tiny import colour_loss

    images = torch.randn(2, 3, 16, 16)
    means = torch.nn.functional.avg_pool2d(images, 8)  # (2, 3, 2, 2)
    features = torch.cat([means, torch.zeros(2, 5, 2, 2)], dim=1)  # the colour in the first 3 of 8 channels
    head = torch.nn.Conv2d(8, 3, 1, bias=False)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[:, :3, 0, 0] = torch.eye(3)
    assert colour_loss(head, features, images).item() < 1e-12
    assert colour_loss(head, torch.zeros_like(features), images).item() == pytest.approx(means.pow(2).mean().item())


def test_logit_rms_is_the_formed_logits_root_mean_square_and_penalised_above_its_bound():
    from benchmarks.pretrain_tiny import logit_rms, losses

    factors = AttentionFactors(torch.randn(2, 3, 10, 4, dtype=torch.float64), torch.randn(2, 3, 10, 4, dtype=torch.float64))
    assert logit_rms(factors).item() == pytest.approx(factors.logits().pow(2).mean().sqrt().item(), rel=1e-12)

    torch.manual_seed(0)
    network = build_afa_network("tiny", NUM_PRIOR_CLASSES, strides=(4, 2, 1, 1)).eval()  # no stochastic draws
    batch = {"image": torch.randn(2, 3, 64, 64), "mask": torch.randint(0, NUM_PRIOR_CLASSES + 1, (2, 64, 64)),
             "labels": torch.randint(0, 2, (2, NUM_PRIOR_CLASSES)).float()}
    plain = losses(network, batch, 0.0, None)
    _, attention = network.encoder(batch["image"], attention_images=2)
    rms = attention.logits().pow(2).mean().sqrt()
    below, above = (losses(network, batch, 0.0, None, logit_rms_max=bound) for bound in (rms.item() + 1, 0.0))
    assert torch.allclose(below["loss"], plain["loss"]) and torch.allclose(below["logit_rms"], rms, rtol=1e-5)
    assert torch.allclose(above["loss"], plain["loss"] + rms.square(), rtol=1e-5)


def test_attention_scale_shows_the_shipped_prior_saturating_the_affinity(capsys):
    from benchmarks import attention_scale

    lines = attention_scale.main([str(WEIGHTS), "--images", "2"])
    assert lines[2].startswith("| random weights |") and lines[3].startswith(f"| {WEIGHTS} |")
    random_start = attention_scale.attention_scale(None, torch.randn(1, 3, 128, 128))
    assert random_start["logit_std"] < 5 and random_start["p_below_0.01"] + random_start["p_above_0.99"] < 0.1
    rows = [[float(cell) for cell in line.strip("|").split("|")[1:]] for line in lines[2:]]
    assert rows[1][0] > 10 * rows[0][0] and rows[1][2] + rows[1][3] > 0.5  # docs/synthetic.md: std 47.8 vs 0.57
    assert capsys.readouterr().out.splitlines()[:2] == lines[:2]


def test_attention_scale_names_a_missing_weights_file(tmp_path):
    from benchmarks import attention_scale

    with pytest.raises(SystemExit, match=r"error: weights file .*missing\.pth does not exist"):
        attention_scale.main([str(tmp_path / "missing.pth"), "--images", "1"])


def test_attention_scale_and_proxy_name_a_bad_file_in_one_line(tmp_path):
    from benchmarks import attention_scale
    from benchmarks.synthetic_proxy import load_network

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(SystemExit) as raised:
        attention_scale.main([str(corrupt), "--images", "1"])
    message = str(raised.value)
    assert message.startswith(f"error: {corrupt} is not a readable checkpoint") and "\n" not in message
    with pytest.raises(SystemExit, match=r"error: checkpoint .*missing\.pt does not exist: give a train\.py checkpoint"):
        load_network(str(tmp_path / "missing.pt"))
    with pytest.raises(SystemExit) as raised:
        load_network(str(corrupt))
    assert str(raised.value).startswith(f"error: {corrupt} is not a readable checkpoint") and "\n" not in str(raised.value)


def test_attention_scale_reads_a_training_checkpoint_with_its_own_projection(trained):  # noqa: F811
    from benchmarks import attention_scale
    from benchmarks.synthetic_proxy import load_network

    checkpoint, _ = trained
    images = torch.randn(2, 3, 128, 128)
    assert attention_scale.is_training_checkpoint(load_checkpoint(checkpoint))
    assert not attention_scale.is_training_checkpoint(load_checkpoint(WEIGHTS))
    numbers = attention_scale.attention_scale(checkpoint, images, seed=0)
    network, _ = load_network(str(checkpoint))
    with torch.no_grad():
        _, attention = network.encoder(images, attention_images=2)
        affinity = network.attn_proj(attention)
    assert numbers["logit_std"] == pytest.approx(attention.logits().std().item(), rel=1e-5)
    assert numbers["p_above_0.99"] == pytest.approx((affinity > 0.99).float().mean().item())


def test_label_affinity_is_the_labels_where_they_speak_and_the_learned_p_elsewhere():
    from benchmarks.synthetic_proxy import label_affinity

    learned = torch.rand(1, 64, 64)  # an 8x8 grid
    train_label = torch.zeros(1, 64, 64, dtype=torch.long)
    train_label[:, :, 32:] = 3  # two regions: the grid's left and right halves
    train_label[:, :8, :8] = 255  # one ignored corner node
    wanted = label_affinity(learned, train_label, (8, 8), radius=2)
    targets = affinity_labels_from_segmentation(train_label, (8, 8), radius=2)
    assert (targets == 0).any() and (targets == 1).any() and (targets == 255).any()
    assert torch.equal(wanted[targets == 255], learned[targets == 255])
    assert torch.all(wanted[targets == 1] == torch.tensor(0.95)) and torch.all(wanted[targets == 0] == torch.tensor(0.05))


def test_mark_pair_means_against_a_hand_count():
    from benchmarks.synthetic_proxy import PAIR_KINDS, mark_pair_means

    instances = np.zeros((4, 4), np.int64)
    instances[:, :2] = 1  # object 1: the left half; its mark the top-left cell
    marks = np.zeros((4, 4), np.int64)
    marks[0, 0] = 1
    learned = torch.arange(256, dtype=torch.float32).reshape(1, 16, 16) / 256
    sums = np.zeros((3, len(PAIR_KINDS), 2))
    mark_pair_means([{"parts": {"instances": instances, "marks": marks, "classes": [2]}}], learned, (4, 4), 1, sums)
    # radius 1: node 0's window holds nodes 0, 1, 4, 5; of them 1, 4, 5 are body, none background
    assert sums[2, 0].tolist() == [0.0, 1] and sums[2, 1].tolist() == [pytest.approx((1 + 4 + 5) / 256), 3]
    assert sums[2, 2].tolist() == [0.0, 0] and sums[1].sum() == 0
    body, background = [1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]
    pairs = [(i, j) for i in body for j in background if abs(i // 4 - j // 4) <= 1 and abs(i % 4 - j % 4) <= 1]
    assert sums[2, 3].tolist() == [pytest.approx(sum(16 * i + j for i, j in pairs) / 256), len(pairs)]

"""The AFA step's fidelity options (AFA.md §8, the reference implementation's behaviour)."""

from dataclasses import replace

import pytest
import torch
from hydra import compose, initialize_config_dir

from afa.engine.afa_step import (
    AFAOptions,
    afa_losses,
    pseudo_labels,
    reference_classification_cam_passes,
    resolve_propagation,
)
from afa.engine import afa_step as step_module
from afa.engine.evaluator import autocast_context, predict_afa_batch_with_cams
from afa.ops import random_walk as random_walk_module
from afa.models.network import build_afa_network
from tests.test_train import CONF


def preset(experiment: str) -> AFAOptions:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={experiment}"])
    return AFAOptions.from_config(cfg.method)


def test_phase_boundaries_are_the_references():
    voc = preset("afa_voc")
    # reference: classification while i <= 2000; propagated label once i > 6000
    assert [voc.phase(i) for i in (0, 2000, 2001, 6000, 6001)] == [
        "classification", "classification", "par_label", "par_label", "propagated_label"]
    assert voc.inactive_losses == "zero" and voc.cam_reference_mode is False


def test_coco_affinity_labels_switch_to_the_propagated_label():
    coco, voc = preset("afa_coco"), preset("afa_voc")
    assert [coco.affinity_source(i) for i in (15000, 15001)] == ["refined", "propagated"]
    assert coco.phase(15001) == "propagated_label"
    assert voc.affinity_source(19999) == "refined"


@pytest.fixture
def small():
    torch.manual_seed(0)
    network = build_afa_network("tiny", num_classes=3, decoder_dim=16, strides=(4, 2, 2, 1)).train()
    images = torch.randn(2, 3, 64, 64)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    boxes = torch.tensor([[0, 64, 0, 64], [0, 64, 0, 64]])
    options = replace(preset("synthetic"), par=replace(preset("synthetic").par, num_iterations=2))
    return network, images, labels, boxes, options


def grads_after_classification_step(network, images, labels, options):
    network.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same stochastic-depth draws in both modes
    full = options.inactive_losses == "zero"
    output = network(images, with_segmentation=full, with_affinity=full)
    losses, _ = afa_losses(output, labels, None, "classification", options, network.affinity_grid(64, 64))
    losses["loss"].backward()
    return losses


def test_zero_weighted_losses_give_zero_gradients(small):
    network, images, labels, _, options = small
    zero = grads_after_classification_step(network, images, labels, replace(options, inactive_losses="zero"))
    decoder_grads = [p.grad for p in network.decoder.parameters()]
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in decoder_grads)
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in network.attn_proj.parameters())
    encoder_grad = next(network.encoder.parameters()).grad.clone()
    skip = grads_after_classification_step(network, images, labels, replace(options, inactive_losses="skip"))
    assert all(p.grad is None for p in network.decoder.parameters())
    torch.testing.assert_close(zero["loss"], skip["loss"])  # the same classification loss
    assert torch.count_nonzero(encoder_grad) > 0


def test_zero_gradients_let_adamw_decay_the_decoder(small):
    network, images, labels, _, options = small
    optimizer = torch.optim.AdamW(network.decoder.parameters(), lr=0.1, weight_decay=0.5)
    before = [p.detach().clone() for p in network.decoder.parameters()]
    grads_after_classification_step(network, images, labels, replace(options, inactive_losses="zero"))
    optimizer.step()
    assert optimizer.state[next(network.decoder.parameters())]["step"] == 1
    assert any(not torch.equal(a, p) for a, p in zip(before, network.decoder.parameters()))


def bn_stats(network):
    return [b.clone() for m in network.decoder.modules() if isinstance(m, torch.nn.BatchNorm2d)
            for b in (m.running_mean, m.running_var)]


def test_reference_mode_cam_passes_update_decoder_batchnorm(small):
    network, images, labels, boxes, options = small
    before = bn_stats(network)
    default = pseudo_labels(network, images, labels, boxes, options, propagate=True)
    assert all(torch.equal(a, b) for a, b in zip(before, bn_stats(network)))  # eval-mode passes change nothing
    assert network.training
    reference = pseudo_labels(network, images, labels, boxes, replace(options, cam_reference_mode=True), propagate=True)
    assert any(not torch.equal(a, b) for a, b in zip(before, bn_stats(network)))
    assert reference["refined"].shape == default["refined"].shape == (2, 64, 64)
    assert reference["propagated"].shape == (2, 64, 64)


def test_reference_mode_equals_train_mode_cam_of_the_network(small):
    _, images, labels, boxes, options = small
    # no stochastic depth: the train-mode pass is then deterministic
    network = build_afa_network("tiny", num_classes=3, decoder_dim=16, drop_path_rate=0.0).train()
    reference = pseudo_labels(network, images, labels, boxes, replace(options, cam_reference_mode=True), propagate=False)
    network.train()
    with torch.no_grad():
        from afa.ops import multi_scale_cam
        cams, _ = multi_scale_cam(network.forward_cam, images, options.cam_scales, with_affinity=False)
    torch.testing.assert_close(reference["cams"], cams)


def test_reference_mode_runs_cam_passes_in_the_classification_phase(small):
    network, images, _, _, options = small
    before = bn_stats(network)
    reference_classification_cam_passes(network, images, replace(options, cam_reference_mode=True))
    # the reference's BatchNorm statistics move from iteration 0, as its CAM passes run then too
    assert any(not torch.equal(a, b) for a, b in zip(before, bn_stats(network)))
    assert all(p.grad is None for p in network.parameters())


def test_propagation_option_resolves_by_device():
    assert preset("afa_voc").propagation == "auto"
    assert resolve_propagation("auto", "cpu") == "windowed"
    assert resolve_propagation("auto", torch.device("cuda", 0)) == "dense"
    assert resolve_propagation("dense", "cpu") == "dense" and resolve_propagation("windowed", "cuda") == "windowed"
    with pytest.raises(ValueError, match="method.affinity.propagation='sparse'"):
        resolve_propagation("sparse", "cpu")


def test_dense_and_windowed_propagation_give_the_same_labels(small, monkeypatch):
    sparse_products = []  # "windowed" on a window smaller than half the grid builds a sparse matrix
    original = random_walk_module.fixed_width_csr
    monkeypatch.setattr(random_walk_module, "fixed_width_csr", lambda *a: sparse_products.append(1) or original(*a))
    network, _, labels, _, options = small
    options = replace(options, radius=1)  # a 3×3 window on the 8×8 grid: the sparse product runs
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    boxes = torch.tensor([[0, 128, 0, 128], [0, 96, 16, 128]])
    propagated = {
        choice: pseudo_labels(network, images, labels, boxes, replace(options, propagation=choice), propagate=True)
        ["propagated"] for choice in ("dense", "windowed")}
    assert torch.equal(propagated["dense"], propagated["windowed"]) and len(sparse_products) == 1
    network.eval()
    evaluated = {
        choice: predict_afa_batch_with_cams(network, images, labels, (128, 128), (1.0,), 0.45, 0.35, 1,
                                            propagation=choice)[1]["propagated"]
        for choice in ("dense", "windowed")}
    assert torch.equal(evaluated["dense"], evaluated["windowed"]) and len(sparse_products) == 2


def test_bf16_autocast_on_cpu_keeps_the_label_operators_in_float32(small, monkeypatch):
    """train.amp on CPU: bf16 CAM passes, but PAR and the random walk see float32 inputs
    and run outside autocast; the labels match the float32 step's almost everywhere."""
    network, _, labels, _, options = small
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    boxes = torch.tensor([[0, 128, 0, 128], [0, 96, 16, 128]])
    seen = []
    par, propagate = step_module.refine_cams_with_par, step_module.propagate_cams_with_affinity
    monkeypatch.setattr(step_module, "refine_cams_with_par", lambda images, cams, *a, **k: seen.append(
        ("par", cams.dtype, torch.is_autocast_enabled("cpu"))) or par(images, cams, *a, **k))
    monkeypatch.setattr(step_module, "propagate_cams_with_affinity", lambda cams, labels, affinity, *a, **k: seen.append(
        ("walk", affinity.dtype, torch.is_autocast_enabled("cpu"))) or propagate(cams, labels, affinity, *a, **k))
    result = {}
    for amp in (False, True):
        with autocast_context(torch.device("cpu"), amp):
            result[amp] = pseudo_labels(network, images, labels, boxes, options, propagate=True)
    assert seen == [("par", torch.float32, False), ("walk", torch.float32, False)] * 2
    assert result[True]["cams"].dtype == torch.float32
    assert (result[True]["cams"] - result[False]["cams"]).abs().max() < 0.05  # bf16 rounding of the passes
    for key in ("refined", "propagated"):
        assert (result[True][key] == result[False][key]).float().mean() > 0.98


def test_eval_label_operators_ignore_autocast(small, monkeypatch):
    """eval.py amp=true: the PAR and propagated targets are computed in float32 (the same labels)."""
    from afa.engine import predict
    from afa.engine.predict import PAROptions, par_label, propagate_label

    states = []
    for name in ("refine_cams_with_par", "propagate_cams_with_affinity"):
        original = getattr(predict, name)
        monkeypatch.setattr(predict, name, lambda *a, _f=original, **k: states.append(
            (torch.is_autocast_enabled("cpu"), a[1].dtype)) or _f(*a, **k))
    network, _, labels, _, _ = small
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(4))
    cams = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    affinity = network(images, with_segmentation=False, with_affinity=True).affinity.detach()
    par = PAROptions(dilations=(1, 2), num_iterations=2, w1=0.3, w2=0.01)
    results = []
    for amp in (False, True):
        with autocast_context(torch.device("cpu"), amp):
            results.append((par_label(images, cams, labels, 0.45, par),
                            propagate_label(network, images, cams, labels, affinity, 0.35, 1, "dense")))
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert states == [(False, torch.float32)] * 4

"""benchmarks/speed.py: its straightforward implementation computes what afa's step computes."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import speed  # noqa: E402

from afa.engine.afa_step import AFAOptions, pseudo_labels  # noqa: E402
from afa.engine.builders import build_network, build_optimizer_from_config  # noqa: E402


def test_straightforward_labels_equal_afa_labels():
    cfg = speed.compose_setting("tiny")
    torch.manual_seed(0)
    network = build_network(cfg.model, 6)
    optimizer, _ = build_optimizer_from_config(network, cfg.optimizer, 10)
    options = AFAOptions.from_config(cfg.method)
    batch = speed.synthetic_batch(3, 64, 6, torch.device("cpu"))
    batch["image"] = 3 * batch["image"]  # spread the CAMs so the labels hold classes and background
    afa = pseudo_labels(network, batch["image"], batch["labels"], batch["valid_box"], options, propagate=True,
                        max_classes=batch["max_classes"])
    straightforward = speed.StraightforwardIteration(network, optimizer, options, amp=False, crop=64)
    network.eval()  # afa's CAM passes run in eval mode; the reference's in train mode (stochastic depth)
    plain = straightforward.pseudo_labels(batch, lambda phase: None)
    torch.testing.assert_close(plain["cams"], afa["cams"], atol=1e-5, rtol=1e-4)
    for key in ("refined", "propagated"):
        agree = (plain[key] == afa[key]).float().mean().item()
        assert agree > 0.999, (key, agree)
    assert len(afa["refined"].unique()) > 1


def test_one_timed_iteration_of_each(tmp_path):
    for implementation in speed.IMPLEMENTATIONS:
        row = speed.measure_worker("tiny", implementation, 1, "cpu", False, batch_size=2, crop=64)
        assert set(row["phases"]) == set(speed.PHASES) and row["seconds"] > 0
        assert abs(sum(row["phases"].values()) - row["seconds"]) < 0.05 * row["seconds"] + 0.05


def test_profile_counts_flops_and_operators():
    row = speed.measure_worker("tiny", "afa", 1, "cpu", False, batch_size=2, crop=64, profile=True)
    profiled = row["profile"]
    assert profiled["flops"] > 1e8 and profiled["achieved_tflops"] > 0  # a tiny MiT step at 64 px: ~1 GFLOP
    assert len(profiled["top_ops"]) > 3 and all(op["calls"] >= 1 for op in profiled["top_ops"])
    assert profiled["kernel_launches"] == 0 and profiled["host_syncs"] == 0  # none on CPU

"""benchmarks/quality.py without training: log parsing, the reuse rule, the eval cache and the table."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks import quality

AFA_LOG = """\
2026-12-03 09:29:14 | INFO | run directory: {run}
2026-12-03 09:31:36 | INFO | train 100/800 (12.5%) | 2.10 it/s | elapsed 02:22 | ETA 16:37 | loss=0.4031
2026-12-03 09:56:53 | INFO | train 800/800 (100.0%) | 0.08 it/s | elapsed 27:39 | ETA 00:00 | loss=0.05082
2026-12-03 10:00:03 | INFO | validation at 800: cls F1 0.998 | CAM mIoU {cam} | propagated mIoU 0.505 | segmentation mIoU 0.639
val mIoU — CAM {cam} | propagated 0.505 | segmentation 0.639 (classification F1 0.998)
checkpoint: {run}/checkpoints/last.pt
"""
PSA_LOG = """\
2026-12-03 16:44:58 | INFO | train.resume=auto: no checkpoint in runs/psa-seed0/cam/checkpoints, starting fresh
2026-12-03 16:51:55 | INFO | psa: stage cam done: {'cam_label_miou': 0.659, 'crf': True}
2026-12-03 17:01:45 | INFO | psa: stage seg done: {'segmentation_miou': 0.670}
PSA — CAM label mIoU (train) 0.659 | random-walk label mIoU (train) 0.624 | segmentation mIoU (val) 0.670
"""
UNFINISHED_LOG = "2026-12-03 18:28:50 | INFO | run directory: x\n2026-12-03 18:41:14 | INFO | train 575/800 (71.9%)\n"


def write_run(out: Path, variant: str, seed: int, text: str, checkpoint: bool = True) -> Path:
    log, _, ckpt = quality.run_paths(out, quality.VARIANTS[variant], seed)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(text)
    if checkpoint:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        ckpt.write_bytes(b"weights")
    return ckpt


def test_log_seconds_spans_the_timestamped_lines():
    assert quality.log_seconds(AFA_LOG.format(run="r", cam=0.587)) == 1849.0  # 09:29:14 -> 10:00:03
    assert quality.log_seconds(PSA_LOG) == 1007.0
    assert quality.log_seconds("val mIoU — CAM 0.5\n") is None


def test_reuse_rule_needs_the_result_line_and_the_checkpoint(tmp_path):
    afa, psa = quality.VARIANTS["afa"], quality.VARIANTS["psa"]
    assert quality.finished_run(tmp_path, afa, 0) is None  # nothing there
    write_run(tmp_path, "afa", 0, AFA_LOG.format(run="r", cam=0.587))
    assert quality.finished_run(tmp_path, afa, 0) == {
        "cam": 0.587, "propagated": 0.505, "segmentation": 0.639, "cls_f1": 0.998, "seconds": 1849.0}
    write_run(tmp_path, "afa", 1, AFA_LOG.format(run="r", cam=0.6), checkpoint=False)
    assert quality.finished_run(tmp_path, afa, 1) is None  # no checkpoint
    write_run(tmp_path, "afa", 2, UNFINISHED_LOG)
    assert quality.finished_run(tmp_path, afa, 2) is None  # still training (no result line)
    ckpt = write_run(tmp_path, "psa", 0, PSA_LOG)
    assert ckpt == tmp_path / "psa-seed0" / "seg" / "checkpoints" / "last.pt"  # the PSA seg stage's
    assert quality.finished_run(tmp_path, psa, 0) == {
        "cam": 0.659, "propagated": 0.624, "segmentation": 0.670, "seconds": 1007.0}


def test_train_or_reuse_trains_only_what_is_not_finished(tmp_path, monkeypatch):
    calls = []

    def fake_run_one(name, overrides, seed, out):
        calls.append((name, overrides, seed))
        write_run(out, name, seed, UNFINISHED_LOG.replace("x\n", "x\nval mIoU — CAM 0.500 | propagated 0.400 | "
                                                         "segmentation 0.600 (classification F1 0.990)\n"))
        return {"cam": 0.5, "propagated": 0.4, "segmentation": 0.6, "cls_f1": 0.99, "seconds": 900.0}

    monkeypatch.setattr(quality, "run_one", fake_run_one)
    write_run(tmp_path, "afa", 0, AFA_LOG.format(run="r", cam=0.587))
    numbers, reused = quality.train_or_reuse(tmp_path, quality.VARIANTS["afa"], 0)
    assert reused and numbers["cam"] == 0.587 and calls == []
    write_run(tmp_path, "no_par", 1, UNFINISHED_LOG)  # an interrupted run: trained again
    numbers, reused = quality.train_or_reuse(tmp_path, quality.VARIANTS["no_par"], 1)
    assert not reused and numbers["cam"] == 0.5 and numbers["seconds"] == 744.0
    assert calls == [("no_par", ["method.par.num_iterations=0"], 1)]


def test_table_columns_and_format():
    afa, psa = quality.VARIANTS["afa"], quality.VARIANTS["psa"]
    runs = []
    for cam, par, seconds in ((0.5, 0.6, 600.0), (0.6, 0.62, 720.0)):
        run = quality.table_columns(afa, {"cam": cam, "propagated": 0.4, "segmentation": 0.7, "cls_f1": 0.99,
                                          "seconds": seconds})
        runs.append({**run, "val_par": par, "val_affinity_positive": 0.9, "val_affinity_objects": 0.85,
                     "val_affinity_negative": 0.8,
                     "train_cam": 0.55, "train_par": 0.65, "train_propagated": 0.45})
    psa_run = quality.table_columns(psa, {"cam": 0.659, "propagated": 0.624, "segmentation": 0.670, "seconds": None})
    assert psa_run == {"train_cam": 0.659, "train_propagated": 0.624, "segmentation": 0.670, "seconds": None}
    lines = quality.format_table({"afa": runs, "psa": [psa_run]}).splitlines()
    assert lines[0] == ("| variant | seeds | CAM (val) | PAR (val) | propagated (val) | segmentation (val) | "
                        "classification F1 (val) | "
                        "affinity recall + (val) | affinity recall +, objects (val) | affinity recall − (val) | "
                        "CAM (train) | PAR (train) | propagated (train) | minutes per run |")
    assert lines[1] == "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    assert lines[2] == ("| afa | 2 | 0.550 ± 0.050 | 0.610 ± 0.010 | 0.400 ± 0.000 | 0.700 ± 0.000 | 0.990 ± 0.000 | "
                        "0.900 ± 0.000 | 0.850 ± 0.000 | 0.800 ± 0.000 | 0.550 ± 0.000 | 0.650 ± 0.000 | 0.450 ± 0.000 | "
                        "11.0 ± 1.0 |")
    assert lines[3] == "| psa | 1 | - | - | - | 0.670 | - | - | - | - | 0.659 | - | 0.624 | - |"
    # Without the train split the train columns are left out, not printed empty.
    val_only = [{key: value for key, value in run.items() if not key.startswith("train_")} for run in runs]
    lines = quality.format_table({"afa": val_only}).splitlines()
    assert "(train)" not in lines[0] and lines[0].endswith("| minutes per run |")
    assert lines[2] == ("| afa | 2 | 0.550 ± 0.050 | 0.610 ± 0.010 | 0.400 ± 0.000 | 0.700 ± 0.000 | 0.990 ± 0.000 | "
                        "0.900 ± 0.000 | 0.850 ± 0.000 | 0.800 ± 0.000 | 11.0 ± 1.0 |")


def test_eval_cache_is_keyed_by_the_checkpoint_file_and_images(tmp_path):
    ckpt = tmp_path / "last.pt"
    ckpt.write_bytes(b"weights")
    path = quality.cache_path(tmp_path, "train", "par")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"miou": 0.6, "max_images": None, **quality.checkpoint_stamp(ckpt)}))
    assert quality.read_cache(path, ckpt, None, "par") is None  # written before miou_standard was kept
    path.write_text(json.dumps({"miou": 0.6, "miou_standard": 0.6, "max_images": None, **quality.checkpoint_stamp(ckpt)}))
    assert quality.read_cache(path, ckpt, None, "par")["miou"] == 0.6
    assert quality.read_cache(path, ckpt, 10, "par") is None  # other images
    ckpt.write_bytes(b"retrained weights")
    assert quality.read_cache(path, ckpt, None, "par") is None  # another checkpoint at the same path


def test_eval_overrides_are_the_eval_py_command():
    options = type("Options", (), {"device": "cpu", "batch_size": 8, "num_workers": 1, "max_images": None,
                                   "train_max_images": 400})()
    val = quality.eval_overrides(Path("c.pt"), "val", "par", Path("d"), options)
    assert val[:3] == ["ckpt=c.pt", "target=par", "eval=ss"] and not any(o.startswith("split=") for o in val)
    assert not any(o.startswith("max_images=") for o in val)  # val stays whole
    train = quality.eval_overrides(Path("c.pt"), "train", "cam", Path("d"), options)
    assert "split=train" in train and "max_images=400" in train


def test_evaluate_target_caches_the_affinity_recalls(tmp_path, monkeypatch):
    from afa.engine import evaluate as evaluate_module

    ckpt = tmp_path / "last.pt"
    ckpt.write_bytes(b"weights")
    calls = []

    def fake_evaluate(cfg, chosen_groups):
        calls.append((cfg.target, cfg.get("split")))
        return {"target": "affinity", "positive_recall": 0.9, "foreground_positive_recall": 0.8,
                "negative_recall": 0.7, "positives": 120, "foreground_positives": 40, "negatives": 30, "radius": 4,
                "num_images": 3, "seconds": 1.5}

    monkeypatch.setattr(evaluate_module, "evaluate", fake_evaluate)
    options = type("Options", (), {"device": "cpu", "batch_size": 8, "num_workers": 1, "max_images": None,
                                   "train_max_images": None})()
    entry, cached = quality.evaluate_target(ckpt, tmp_path, "val", "affinity", options)
    assert not cached and calls == [("affinity", None)] and "miou" not in entry
    assert {k: entry[k] for k in ("positive_recall", "negative_recall", "positives", "negatives", "radius")} == {
        "positive_recall": 0.9, "negative_recall": 0.7, "positives": 120, "negatives": 30, "radius": 4}
    again, cached = quality.evaluate_target(ckpt, tmp_path, "val", "affinity", options)
    assert cached and again == entry and len(calls) == 1  # from <run>/quality/val-affinity.json


def test_afa_prior_is_the_default_run_from_the_prior():
    variant = quality.VARIANTS["afa_prior"]
    assert variant.overrides == ("experiment=synthetic_prior",) and not variant.psa
    assert list(quality.VARIANTS) == ["cam_only", "no_par", "afa", "afa_prior", "psa"]


def test_main_reuses_runs_and_writes_the_table(tmp_path, monkeypatch, capsys):
    for seed in (0, 1):
        write_run(tmp_path, "psa", seed, PSA_LOG)
        write_run(tmp_path, "cam_only", seed, AFA_LOG.format(run="r", cam=0.58 + seed / 100))
    monkeypatch.setattr(quality, "run_one", lambda *args: pytest.fail("a finished run was trained again"))
    targets = []

    def fake_evaluate(checkpoint, run_dir, split, target, options):
        targets.append((split, target))
        if target == "affinity":
            return {"positive_recall": 0.9, "foreground_positive_recall": 0.8, "negative_recall": 0.7,
                    "seconds": 1.0}, False
        return {"miou": 0.5, "seconds": 1.0}, False

    monkeypatch.setattr(quality, "evaluate_target", fake_evaluate)
    monkeypatch.setattr(sys, "argv", ["quality.py", "--seeds", "0", "1", "--variants", "cam_only", "psa",
                                      "--out", str(tmp_path)])
    quality.main()
    assert targets == [("val", "par"), ("val", "affinity"), ("train", "cam"), ("train", "par"),
                       ("train", "propagated")] * 2  # none for psa
    table = (tmp_path / "quality.md").read_text()
    assert "| cam_only | 2 | 0.585 ± 0.005 | 0.500 ± 0.000 |" in table and "| psa | 2 | - | - | - | 0.670 ± 0.000 |" in table
    # segmentation, classification F1, recalls, train
    assert "| 0.639 ± 0.000 | 0.998 ± 0.000 | 0.900 ± 0.000 | 0.800 ± 0.000 | 0.700 ± 0.000 | 0.500 ± 0.000 |" in table
    assert table.splitlines()[2] in capsys.readouterr().out
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert saved["variants"]["cam_only"]["overrides"] == ["method.switch_iters=800", "method.loss.aff_weight=0"]
    assert [run["reused"] for run in saved["variants"]["psa"]["runs"]] == [True, True]


def test_prior_option_starts_afa_prior_from_other_weights(tmp_path, monkeypatch):
    trained = []

    def fake_run_one(name, overrides, seed, out):
        trained.append((name, overrides))
        write_run(out, name, seed, AFA_LOG.format(run="r", cam=0.5))
        return {"seconds": 60.0}

    monkeypatch.setattr(quality, "run_one", fake_run_one)
    scores = {"miou": 0.5, "positive_recall": 0.9, "foreground_positive_recall": 0.8, "negative_recall": 0.7}
    monkeypatch.setattr(quality, "evaluate_target", lambda *args: ({**scores, "seconds": 1.0}, False))
    weights = tmp_path / "other.pth"
    weights.write_bytes(b"weights")  # run_one is faked: the file is only checked to exist
    monkeypatch.setattr(sys, "argv", ["quality.py", "--seeds", "0", "--variants", "afa_prior", "--prior", str(weights),
                                      "--no-train-split", "--out", str(tmp_path)])
    quality.main()
    assert trained == [("afa_prior", ["experiment=synthetic_prior", f"model.pretrained={weights.resolve()}"])]
    assert f"afa_prior starts from {weights}." in (tmp_path / "quality.md").read_text()
    assert quality.VARIANTS["afa_prior"].overrides == ("experiment=synthetic_prior",)  # the module's stays


def test_finished_only_tables_what_is_there_and_names_the_rest(tmp_path, monkeypatch):
    write_run(tmp_path, "psa", 0, PSA_LOG)
    monkeypatch.setattr(quality, "run_one", lambda *args: pytest.fail("--finished-only trained a run"))
    monkeypatch.setattr(sys, "argv", ["quality.py", "--seeds", "0", "1", "--variants", "psa", "--finished-only",
                                      "--out", str(tmp_path)])
    quality.main()
    assert "| psa | 1 |" in (tmp_path / "quality.md").read_text()
    assert json.loads((tmp_path / "quality.json").read_text())["missing"] == ["psa seed 1"]


def test_prior_option_refuses_a_missing_file(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["quality.py", "--variants", "afa_prior", "--prior", str(tmp_path / "no.pth"),
                                      "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="does not exist"):
        quality.main()

"""eval.py: the test protocol against per-image references, targets, outputs, sharding, bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from afa.crf import CRFOptions, CRFUnavailableError, crf_label, require_crf
from afa.data.classes import VOC_CLASSES
from afa.data.readers import DatasetError, read_mask
from afa.engine.builders import build_dataset, build_network
from afa.engine.cli import stored_group_overrides
from afa.engine.config import ConfigError
from afa.engine.evaluate import SERVER_FOLDER, evaluate
from afa.engine.predict import TestProtocol as Protocol  # not collected as a test class
from afa.engine.predict import segmentation_logits
from afa.engine.trainer import train
from afa.models.weights import CheckpointError
from tests.fixtures import write_voc_fixture
from tests.test_run import free_port
from tests.test_train import compose_config, small_overrides

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
VOC_SAMPLES = {"a": [1], "b": [12, 15], "c": [3], "d": [7, 1], "e": [20], "f": [9]}


def compose_eval(overrides: list[str]):
    """The eval config as `python eval.py <overrides>` composes it, and the groups it chose."""
    overrides = stored_group_overrides(["eval.py", *overrides])[1:]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=overrides)
    chosen = {arg.split("=", 1)[0]: arg.split("=", 1)[1] for arg in overrides if arg.split("=", 1)[0] in ("model", "dataset", "method")}
    return cfg, chosen


def run_eval(ckpt: Path, out: Path, *overrides: str) -> dict:
    cfg, chosen = compose_eval([f"ckpt={ckpt}", f"run_dir={out}", "device=cpu", "num_workers=0", *overrides])
    return evaluate(cfg, chosen)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny synthetic run (6 iterations, final validation) and its training summary."""
    root = tmp_path_factory.mktemp("eval-synthetic")
    run_dir = tmp_path_factory.mktemp("eval-run")
    summary = train(compose_config(small_overrides(root, run_dir)))
    return Path(summary["checkpoint"]), summary


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> tuple[Path, Path]:
    """A VOC-layout fixture (val with masks, test without) and a 20-class checkpoint for it."""
    tmp = tmp_path_factory.mktemp("eval-voc")
    folder = write_voc_fixture(tmp, VOC_SAMPLES, splits={"val": ["a", "b", "c", "d"], "test": ["f", "e"]}, size=(40, 52),
                               image_ext=".jpg")
    for name in ("e", "f"):  # the test split: no masks published
        (folder / "SegmentationClass" / f"{name}.png").unlink()
    cfg = compose_config(["~experiment", "model=mit_tiny", "dataset=voc", *voc_keys(folder), "logger=none"])
    torch.manual_seed(3)
    network = build_network(cfg.model, 20)
    with torch.no_grad():  # a non-trivial prediction from random weights
        network.decoder.linear_pred.bias.copy_(torch.linspace(0, 1, 21))
    ckpt = tmp / "voc.pt"
    torch.save({"model": network.state_dict(), "config_source": OmegaConf.to_container(cfg, resolve=False),
                "class_names": list(VOC_CLASSES)}, ckpt)
    return folder, ckpt


def voc_keys(folder: Path) -> list[str]:
    """The fixture's own val list and labels (the packaged ones name the real VOC images)."""
    return [f"dataset.root={folder}", f"+dataset.val.index.labels_file={folder / 'cls_labels.json'}",
            f"+dataset.val.index.split_file={folder / 'ImageSets/Segmentation/val.txt'}"]


# ---------------------------------------------------------------------- protocol
def reference_fused_logits(network, image: torch.Tensor, scales, flip: bool, long_side: int) -> torch.Tensor:
    """AFA.md §10 for one image, written the obvious way: (K, h, w)."""
    height, width = image.shape[-2:]
    ratio = long_side / max(height, width)
    image = F.interpolate(image[None], size=(int(height * ratio), int(width * ratio)), mode="bilinear", align_corners=False)
    fused, base_size = None, None
    for scale in scales:  # scale 1 first: its logit size is the target size
        scaled = image if scale == 1.0 else F.interpolate(image, scale_factor=scale, mode="bilinear", align_corners=False)
        logits = network.forward_segmentation(scaled)
        if flip:
            logits = (logits + network.forward_segmentation(scaled.flip(-1)).flip(-1)) / 2
        base_size = base_size or logits.shape[-2:]
        logits = F.interpolate(logits, size=base_size, mode="bilinear", align_corners=False)
        fused = logits if fused is None else torch.maximum(fused, logits)
    return fused[0]


@pytest.mark.parametrize("flip", [True, False])
def test_multi_scale_flip_fusion_equals_per_image_reference(flip):
    cfg = compose_config(["model=mit_tiny"])
    torch.manual_seed(0)
    network = build_network(cfg.model, 5).eval()
    images = torch.randn(3, 3, 45, 61)
    protocol = Protocol(scales=(1.0, 0.5, 0.75), flip=flip, resize_long=80)
    with torch.no_grad():
        fused = segmentation_logits(network, images, protocol)
        expected = torch.stack([reference_fused_logits(network, image, protocol.scales, flip, 80) for image in images])
    assert fused.shape == expected.shape == (3, 6, 15, 20)
    torch.testing.assert_close(fused, expected, atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------- targets
def test_single_scale_targets_equal_the_training_validation(trained, tmp_path):
    ckpt, summary = trained
    for target in ("segmentation", "cam", "propagated"):
        results = run_eval(ckpt, tmp_path / target, "eval=ss", f"target={target}")
        assert results["resize_long"] is None and results["num_images"] == 12
        assert results["miou"] == pytest.approx(summary[f"{target}_miou"], abs=1e-6)
        written = json.loads((tmp_path / target / "metrics.json").read_text())
        assert written["miou"] == pytest.approx(results["miou"]) and len(written["iou"]) == len(results["class_names"])


def test_batching_and_multi_scale_on_the_train_split(trained, tmp_path):
    ckpt, _ = trained
    one = run_eval(ckpt, tmp_path / "one", "eval=ms", "split=train", "batch_size=1")
    four = run_eval(ckpt, tmp_path / "four", "eval=ms", "split=train", "batch_size=4")
    assert one["miou"] == pytest.approx(four["miou"], abs=1e-6) and one["num_images"] == 4
    cam = run_eval(ckpt, tmp_path / "cam", "target=cam", "split=train", "method.cam.bkg_score=0.3")
    assert 0.0 <= cam["miou"] <= 1.0


# ---------------------------------------------------------------------- CRF
def crf_available() -> bool:
    try:
        require_crf()
    except CRFUnavailableError:
        if os.environ.get("AFA_REQUIRE_CRF") == "1":  # CI installs it: a missing build must fail, not skip
            raise
        return False
    return True


needs_crf = pytest.mark.skipif(not crf_available(), reason="pydensecrf2 not installed (pip install -r requirements-crf.txt)")


@needs_crf
def test_crf_label_equals_a_direct_densecrf_call():
    import pydensecrf.densecrf as densecrf
    from pydensecrf.utils import unary_from_softmax

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 44, 3), dtype=np.uint8)
    logits = rng.normal(size=(4, 8, 11)).astype(np.float32)
    probabilities = torch.softmax(F.interpolate(torch.from_numpy(logits)[None], size=(30, 44), mode="bilinear",
                                                align_corners=False), dim=1)[0].numpy()
    crf = densecrf.DenseCRF2D(44, 30, 4)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probabilities)))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=64, srgb=5, rgbim=np.ascontiguousarray(image), compat=4)
    expected = np.asarray(crf.inference(10)).reshape(4, 30, 44).argmax(axis=0)
    np.testing.assert_array_equal(crf_label(image, logits, CRFOptions()), expected)


@needs_crf
def test_crf_snaps_a_coarse_label_to_colour_edges():
    image = np.zeros((48, 48, 3), np.uint8)
    image[:, 20:] = (220, 40, 40)  # the object starts at column 20
    logits = np.zeros((2, 12, 12), np.float32)
    logits[1, :, 6:] = 3.0  # a coarse prediction whose edge sits at column 24 (4 px off)
    logits[0, :, :6] = 3.0
    before = (F.interpolate(torch.from_numpy(logits)[None], size=(48, 48), mode="bilinear").argmax(1)[0].numpy() == 1)
    after = crf_label(image, logits) == 1
    truth = np.zeros((48, 48), bool)
    truth[:, 20:] = True
    assert (after != truth).sum() < (before != truth).sum() / 4


@needs_crf
def test_crf_on_worker_processes_equals_inline(voc, tmp_path):
    folder, ckpt = voc
    inline = run_eval(ckpt, tmp_path / "inline", "eval=ms_crf", "crf_workers=0")
    workers = run_eval(ckpt, tmp_path / "workers", "eval=ms_crf", "crf_workers=2", "save=[masks]")
    assert inline["crf"] and inline["miou"] == pytest.approx(workers["miou"], abs=1e-9)
    assert sorted(p.name for p in (tmp_path / "workers" / "masks").iterdir()) == ["a.png", "b.png", "c.png", "d.png"]


# ---------------------------------------------------------------------- outputs
def test_masks_are_readable_as_dataset_masks(voc, tmp_path):
    folder, ckpt = voc
    out = tmp_path / "out"
    results = run_eval(ckpt, out, "eval=ss", "save=[masks,overlays]")
    cfg = compose_config(["dataset=voc", *voc_keys(folder), f"+dataset.val.index.mask_dir={out / 'masks'}"])
    second_stage = build_dataset(cfg.dataset.val, "dataset.val")
    second_stage.prepare()
    first = second_stage[0]
    assert first["mask"].shape == first["image"].shape[-2:] == (40, 52)
    assert len(results["iou"]) == 21 and (out / "overlays" / "a.jpg").is_file()
    # Evaluating the saved masks against themselves: a perfect score.
    assert Image.open(out / "masks" / "a.png").mode == "P"
    again = run_eval(ckpt, tmp_path / "again", "eval=ss", f"+dataset.val.index.mask_dir={out / 'masks'}")
    assert again["miou"] == pytest.approx(1.0) and again["pixel_accuracy"] == pytest.approx(1.0)


def test_voc_test_split_server_layout_and_archive(voc, tmp_path):
    folder, ckpt = voc
    out = tmp_path / "server"
    with pytest.raises(ConfigError, match="split_file"):  # the stored val list is not the test split's
        run_eval(ckpt, out, "eval=ss", "split=test")
    test_list = folder / "ImageSets/Segmentation/test.txt"
    results = run_eval(ckpt, out, "eval=ss", "split=test", "save=[server]", f"dataset.val.index.split_file={test_list}")
    assert "miou" not in results and results["num_images"] == 2  # no masks: nothing to score
    files = sorted((out / SERVER_FOLDER).iterdir())
    assert [f.name for f in files] == ["e.png", "f.png"]
    label = read_mask(files[0])
    assert label.shape == (40, 52) and label.max() <= 20 and Image.open(files[0]).mode == "P"
    with tarfile.open(out / "results.tar.gz") as tar:
        assert sorted(tar.getnames())[-2:] == [f"results/VOC2012/Segmentation/comp6_test_cls/{n}" for n in ("e.png", "f.png")]


def test_inference_on_a_folder_of_images(trained, tmp_path):
    ckpt, _ = trained
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(1)
    for name, size in (("wide", (64, 96)), ("tall", (96, 64)), ("wide2", (64, 96))):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(photos / f"{name}.jpg")
    out = tmp_path / "out"
    results = run_eval(ckpt, tmp_path / "run", f"images={photos}", f"output_dir={out}", "save=[masks,overlays]", "eval=ms")
    assert results["num_images"] == 3
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["tall.png", "wide.png", "wide2.png"]
    assert read_mask(out / "masks" / "tall.png").shape == (96, 64)
    overlay = Image.open(out / "overlays" / "tall.jpg")
    assert overlay.size[1] >= 96  # the picture and its legend


# ---------------------------------------------------------------------- reference state dicts
def test_reference_state_dict_needs_and_takes_model_and_dataset(voc, tmp_path):
    folder, ckpt = voc
    reference = tmp_path / "wetr_iter_20000.pth"
    torch.save({f"module.{k}": v for k, v in torch.load(ckpt, weights_only=True)["model"].items()}, reference)
    with pytest.raises(ConfigError, match="stores no model config"):
        run_eval(reference, tmp_path / "bare", "eval=ss")
    ours = run_eval(ckpt, tmp_path / "ours", "eval=ss")
    theirs = run_eval(reference, tmp_path / "theirs", "eval=ss", "model=mit_tiny", "dataset=voc", *voc_keys(folder), "method=afa")
    assert theirs["miou"] == pytest.approx(ours["miou"], abs=1e-9)


# ---------------------------------------------------------------------- sharding
def shard_worker(rank: int, port: int, ckpt: str, out: str, queue) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    results = run_eval(Path(ckpt), Path(out), "eval=ms", "save=[masks]", "batch_size=1")  # both ranks get images
    queue.put((rank, results))


def test_two_gloo_processes_equal_one(voc, tmp_path):
    _, ckpt = voc
    alone = run_eval(ckpt, tmp_path / "alone", "eval=ms", "save=[masks]", "batch_size=1")
    context = mp.get_context("spawn")
    queue = context.Queue()
    mp.start_processes(shard_worker, args=(free_port(), str(ckpt), str(tmp_path / "sharded"), queue), nprocs=2,
                       join=True, start_method="spawn")
    results = dict(queue.get(timeout=30) for _ in range(2))
    for rank in (0, 1):
        assert results[rank]["num_images"] == 4
        for key in ("miou", "miou_standard", "pixel_accuracy", "mean_accuracy"):
            assert results[rank][key] == pytest.approx(alone[key], abs=1e-9)
    masks = sorted(p.name for p in (tmp_path / "sharded" / "masks").iterdir())
    assert masks == sorted(p.name for p in (tmp_path / "alone" / "masks").iterdir()) == ["a.png", "b.png", "c.png", "d.png"]
    for name in masks:
        np.testing.assert_array_equal(read_mask(tmp_path / "sharded" / "masks" / name),
                                      read_mask(tmp_path / "alone" / "masks" / name))


# ---------------------------------------------------------------------- bad input
def test_missing_and_unreadable_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        run_eval(tmp_path / "missing.pt", tmp_path / "out")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt cannot be read"):
        run_eval(garbage, tmp_path / "out")


def test_class_count_mismatch_names_both_counts(trained, voc, tmp_path):
    ckpt, _ = trained
    folder, _ = voc
    with pytest.raises(ConfigError, match=r"trained for \d+ classes but the dataset has 20"):
        run_eval(ckpt, tmp_path / "out", "dataset=voc", *voc_keys(folder))


def test_unreadable_image_fails_before_work(trained, tmp_path):
    ckpt, _ = trained
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (20, 20)).save(photos / "good.png")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DatasetError, match="broken.jpg"):
        run_eval(ckpt, tmp_path / "out", f"images={photos}", "save=[masks]", f"output_dir={tmp_path / 'out'}")
    assert not any((tmp_path / "out" / "masks").glob("*.png"))


def test_crf_without_pydensecrf_gets_the_install_command(trained, tmp_path, monkeypatch):
    ckpt, _ = trained
    monkeypatch.setitem(sys.modules, "pydensecrf", None)  # import pydensecrf raises ImportError
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(CRFUnavailableError, match="pip install -r requirements-crf.txt"):
        run_eval(ckpt, tmp_path / "out", "eval=ms_crf")


@pytest.mark.parametrize("case", ["missing", "crf"])
def test_command_line_errors_are_one_line(trained, tmp_path, case):
    ckpt, _ = trained
    env = dict(os.environ, WANDB_MODE="disabled", WANDB_ERROR_REPORTING="false")
    env.pop("HYDRA_FULL_ERROR", None)
    args = [f"ckpt={tmp_path / 'missing.pt'}"]
    if case == "crf":  # a pydensecrf that fails to import, first on the path
        fake = tmp_path / "fake" / "pydensecrf"
        fake.mkdir(parents=True)
        (fake / "__init__.py").write_text("raise ImportError('no pydensecrf here')\n")
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "fake"), str(REPO)])
        args = [f"ckpt={ckpt}", "eval=ms_crf", "device=cpu", f"run_dir={tmp_path / 'run'}"]
    done = subprocess.run([sys.executable, str(REPO / "eval.py"), *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=100)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert ("missing.pt does not exist" if case == "missing" else "pip install -r requirements-crf.txt") in lines[0]


@pytest.mark.parametrize("override, key", [
    ("batch_size=0", "batch_size"), ("crf_workers=-1", "crf_workers"), ("max_images=0", "max_images"),
    ("resize_long=big", "resize_long"), ("target=labels", "target"), ("save=[pictures]", "save"), ("scales=[]", "scales"),
])
def test_bad_eval_options_name_the_key(trained, tmp_path, override, key):
    ckpt, _ = trained
    with pytest.raises(ConfigError, match=key):
        run_eval(ckpt, tmp_path / "out", override)


def test_metrics_reach_the_experiment_logger(trained, tmp_path, monkeypatch):
    from afa.engine import run as run_module
    from afa.engine.log import Logger

    class Recorder(Logger):
        def __init__(self):
            self.scalars, self.tables = {}, {}

        def log_scalars(self, values, step):
            self.scalars.update(values)

        def log_table(self, name, columns, rows, step):
            self.tables[name] = (list(columns), [list(row) for row in rows])

    recorder = Recorder()
    monkeypatch.setattr(run_module, "build_logger", lambda *args, **kwargs: recorder)
    results = run_eval(trained[0], tmp_path / "out", "eval=ss")
    assert recorder.scalars["eval/miou"] == pytest.approx(results["miou"])
    assert set(recorder.scalars) == {"eval/miou", "eval/miou_standard", "eval/pixel_accuracy", "eval/mean_accuracy"}
    columns, rows = recorder.tables["eval/per_class_iou"]
    assert columns == ["index", "class", "iou"] and [row[1] for row in rows] == results["class_names"]
    assert all(len(row) == 3 for row in rows)

"""`eval.py target=affinity`: the recall of the attention affinity P > 0.5 on the ground
truth's same/different-class pairs (AFA.md §6), batched, equals a per-image count; the
metric against a hand count and its rank sum; the options it refuses."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from afa.engine.builders import build_dataset
from afa.engine.config import ConfigError
from afa.engine.evaluate import checkpoint_config, load_network, print_results, read_checkpoint, with_split
from afa.metrics import AffinityRecall
from afa.ops import affinity_labels_from_segmentation
from tests.test_eval import run_eval, trained, voc  # noqa: F401  (fixtures: the tiny synthetic run, the VOC layout)
from tests.test_run import free_port


def per_image_counts(ckpt: Path, num_images: int) -> tuple[dict[str, int], int]:
    """Pair counts over the first val images one image at a time:
    ({positives, positives_found, negatives, negatives_found}, the radius)."""
    state = read_checkpoint(ckpt)
    groups = checkpoint_config(OmegaConf.create({"ckpt": str(ckpt)}), state, {})
    dataset = build_dataset(with_split(groups.dataset.val, None), "dataset.val")
    network = load_network(ckpt, state, groups.model, len(dataset.class_names) - 1)
    radius = int(groups.method.affinity.radius)
    counts = dict.fromkeys(("positives", "positives_found", "negatives", "negatives_found", "inside", "inside_found"), 0)
    for index in range(num_images):
        sample = dataset[index]
        image, mask = sample["image"][None], sample["mask"][None]
        with torch.no_grad():
            _, affinity = network.forward_cam(image, affinity_images=1)
        targets = affinity_labels_from_segmentation(mask, network.affinity_grid(*image.shape[-2:]), radius=radius)[0]
        same = affinity[0] > 0.5  # (N, N)
        grid = network.affinity_grid(*image.shape[-2:])
        nodes = torch.nn.functional.interpolate(mask[None].float(), size=grid, mode="nearest").flatten().long()
        inside = (targets == 1) & ((nodes > 0) & (nodes != 255))[:, None]
        counts["inside"] += int(inside.sum())
        counts["inside_found"] += int(same[inside].sum())
        counts["positives"] += int((targets == 1).sum())
        counts["positives_found"] += int(same[targets == 1].sum())
        counts["negatives"] += int((targets == 0).sum())
        counts["negatives_found"] += int((~same[targets == 0]).sum())
    return counts, radius


def test_affinity_target_equals_a_per_image_count(trained, tmp_path, capsys, monkeypatch):  # noqa: F811
    from afa.engine import run as run_module
    from afa.engine.log import Logger

    class Recorder(Logger):
        def __init__(self):
            self.scalars = {}

        def log_scalars(self, values, step):
            self.scalars.update(values)

    recorder = Recorder()
    monkeypatch.setattr(run_module, "build_logger", lambda *args, **kwargs: recorder)
    ckpt, _ = trained
    results = run_eval(ckpt, tmp_path / "affinity", "target=affinity", "batch_size=2", "max_images=4")  # two batches
    expected, radius = per_image_counts(ckpt, 4)
    assert results["target"] == "affinity" and results["num_images"] == 4 and results["radius"] == radius
    assert results["positives"] == expected["positives"] > 0 and results["negatives"] == expected["negatives"] > 0
    assert results["positive_recall"] == expected["positives_found"] / expected["positives"]
    assert results["negative_recall"] == expected["negatives_found"] / expected["negatives"]
    assert 0 < results["foreground_positives"] == expected["inside"] < results["positives"]
    assert results["foreground_positive_recall"] == expected["inside_found"] / expected["inside"]
    assert set(results) == {"target", "split", "checkpoint", "radius", "positive_recall", "foreground_positive_recall",
                            "negative_recall", "positives", "foreground_positives", "negatives", "num_images", "seconds",
                            "images_per_second", "output_dir"}
    written = json.loads((tmp_path / "affinity" / "metrics.json").read_text())
    assert written["positives"] == results["positives"] and written["negative_recall"] == results["negative_recall"]
    assert recorder.scalars == {f"eval/{k}": results[k] for k in
                                ("positive_recall", "foreground_positive_recall", "negative_recall")}
    print_results(results, None)
    line = capsys.readouterr().out.splitlines()[-2]  # then the images/s line
    assert line.startswith(f"affinity on val (4 images, radius {radius}): positive recall ")
    assert line.endswith(f"(pairs within the window: {results['positives']} positive, {results['foreground_positives']} "
                         f"of them inside objects, {results['negatives']} negative)")


def shard_worker(rank: int, port: int, ckpt: str, out: str, queue) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    queue.put((rank, run_eval(Path(ckpt), Path(out), "target=affinity", "batch_size=1")))


def test_two_gloo_processes_sum_their_pairs(voc, tmp_path):  # noqa: F811
    _, ckpt = voc
    alone = run_eval(ckpt, tmp_path / "alone", "target=affinity", "batch_size=1")
    queue = mp.get_context("spawn").Queue()
    mp.start_processes(shard_worker, args=(free_port(), str(ckpt), str(tmp_path / "sharded"), queue), nprocs=2,
                       join=True, start_method="spawn")
    results = dict(queue.get(timeout=30) for _ in range(2))
    for rank in (0, 1):  # every rank returns the sums over both
        for key in ("num_images", "positives", "negatives", "positive_recall", "negative_recall"):
            assert results[rank][key] == alone[key], key


def test_affinity_recall_against_a_hand_count():
    affinity = torch.tensor([[[0.9, 0.2, 0.7],
                              [0.6, 0.5, 0.1],
                              [0.3, 0.8, 0.4]]])
    targets = torch.tensor([[[1, 1, 0],
                             [0, 1, 255],
                             [255, 0, 0]]], dtype=torch.uint8)
    recall = AffinityRecall()
    recall.update(affinity, targets)
    # Y=1: 0.9 (found), 0.2, 0.5 (not > 0.5): 1 of 3; Y=0: 0.7, 0.6, 0.8, 0.4 (found): 1 of 4; 255 skipped.
    first = recall.compute()
    assert first["foreground_positives"] == 0 and math.isnan(first.pop("foreground_positive_recall"))
    assert first == {"positive_recall": 1 / 3, "negative_recall": 1 / 4, "positives": 3, "negatives": 4,
                     "foreground_positives": 0}
    # Node 1 inside an object: its Y=1 pair (1, 1) has P 0.5, not found; node 0's pairs are background.
    recall.update(affinity.to(torch.bfloat16), targets, foreground=torch.tensor([[False, True, False]]))
    second = recall.compute()  # a second batch, the autocast dtype
    assert second["positives"] == 6 and second["foreground_positives"] == 1 and second["foreground_positive_recall"] == 0

    doubled = recall.reduce_(lambda counts: counts.mul_(2))  # two ranks with the same counts
    assert doubled is recall and recall.compute() == {"positive_recall": 1 / 3, "negative_recall": 1 / 4,
                                                      "foreground_positive_recall": 0.0, "positives": 12,
                                                      "negatives": 16, "foreground_positives": 2}
    with pytest.raises(RuntimeError, match="twice"):
        recall.reduce_(lambda counts: counts.mul_(2))
    with pytest.raises(RuntimeError, match="reset"):
        recall.update(affinity, targets)
    recall.reset()
    empty = recall.compute()
    assert math.isnan(empty["positive_recall"]) and math.isnan(empty["negative_recall"]) and empty["positives"] == 0
    with pytest.raises(ValueError, match="differ in shape"):
        recall.update(affinity, targets[:, :2])


@pytest.mark.parametrize("override, key", [
    ("crf=true", "crf"), ("save=[masks]", "save"), ("method=psa", "target=affinity: for a PSA checkpoint use target=segmentation"),
])
def test_affinity_refusals_name_the_key(trained, tmp_path, override, key):  # noqa: F811
    ckpt, _ = trained
    with pytest.raises(ConfigError, match=key) as error:
        run_eval(ckpt, tmp_path / "out", "target=affinity", override)
    assert "\n" not in str(error.value)


def test_affinity_needs_masks(trained, voc, tmp_path):  # noqa: F811
    ckpt, _ = trained
    with pytest.raises(ConfigError, match=r"images=\.\.\. has none"):
        run_eval(ckpt, tmp_path / "images", "target=affinity", f"images={tmp_path}")
    folder, voc_ckpt = voc
    test_list = folder / "ImageSets/Segmentation/test.txt"  # VOC test: masks withheld
    with pytest.raises(ConfigError, match="split=test of dataset voc has none"):
        run_eval(voc_ckpt, tmp_path / "test", "target=affinity", "split=test", f"dataset.val.index.split_file={test_list}")

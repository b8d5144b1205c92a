"""`eval.py target=par`: the PAR-refined CAM label (AFA.md §5) with both thresholds at
``method.cam.bkg_score``, batched, equals per-image calls of `refine_cams_with_par`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from afa.constants import IGNORE_INDEX
from afa.engine.afa_step import PAROptions
from afa.engine.builders import build_dataset, build_network
from afa.engine.evaluate import checkpoint_config, load_network, read_checkpoint, with_split
from afa.engine.predict import label_size_cams, target_label
from afa.ops import refine_cams_with_par
from tests.test_eval import run_eval, trained  # noqa: F401  (trained: the tiny synthetic run, a fixture)
from tests.test_train import compose_config

PAR = PAROptions(dilations=(1, 2, 4), num_iterations=3, w1=0.3, w2=0.01)


def per_image_par(images, cams, labels, bkg_score: float, par: PAROptions) -> torch.Tensor:
    """AFA.md §5 one image at a time, whole-image box, both thresholds at ``bkg_score``."""
    height, width = cams.shape[-2:]
    box = torch.tensor([[0, height, 0, width]])
    return torch.cat([
        refine_cams_with_par(images[k:k + 1], cams[k:k + 1], labels[k:k + 1], box, (bkg_score, bkg_score),
                             dilations=par.dilations, num_iterations=par.num_iterations, w1=par.w1, w2=par.w2)
        for k in range(images.shape[0])])


def test_batched_par_target_equals_per_image_refinement():
    torch.manual_seed(0)
    network = build_network(compose_config(["model=mit_tiny"]).model, 5).eval()
    images = torch.randn(3, 3, 64, 96)
    labels = torch.tensor([[1, 0, 0, 0, 0], [0, 1, 0, 1, 0], [1, 0, 1, 0, 1]], dtype=torch.float32)
    scales = (1.0, 0.5)
    with torch.no_grad():
        label = target_label(network, images, labels, (64, 96), "par", scales, 0.3, 0.35, 8, "windowed",
                             par=PAR, max_classes=int(labels.sum(dim=1).max()))
        cams = label_size_cams(network, images, (64, 96), scales)
    expected = per_image_par(images, cams, labels, 0.3, PAR)
    assert label.shape == (3, 64, 96) and label.dtype == torch.int64
    assert torch.equal(label, expected)
    assert not (label == IGNORE_INDEX).any()  # equal thresholds: nothing ignored
    for k in range(3):  # only the background and the image's classes
        allowed = {0, *(labels[k].nonzero().flatten() + 1).tolist()}
        assert set(label[k].unique().tolist()) <= allowed


def test_eval_target_par_on_a_checkpoint(trained, tmp_path):  # noqa: F811
    ckpt, _ = trained
    results = run_eval(ckpt, tmp_path / "par", "eval=ss", "target=par", "save=[masks]", "batch_size=4")
    assert results["target"] == "par" and results["num_images"] == 12 and results["resize_long"] is None
    assert 0.0 <= results["miou"] <= 1.0

    # The saved masks equal the PAR label computed directly from the checkpoint's method config.
    state = read_checkpoint(Path(ckpt))
    groups = checkpoint_config(OmegaConf.create({"ckpt": str(ckpt)}), state, {})
    dataset = build_dataset(with_split(groups.dataset.val, None), "dataset.val")
    network = load_network(Path(ckpt), state, groups.model, len(dataset.class_names) - 1)
    method = groups.method
    par = PAROptions(tuple(method.par.dilations), int(method.par.num_iterations), float(method.par.w1),
                     float(method.par.w2))
    for index in range(len(dataset)):
        sample = dataset[index]
        images, labels = sample["image"][None], sample["labels"][None]
        with torch.no_grad():
            cams = label_size_cams(network, images, tuple(images.shape[-2:]), tuple(method.cam.scales))
        expected = per_image_par(images, cams, labels, float(method.cam.bkg_score), par)[0].numpy()
        saved = np.array(Image.open(tmp_path / "par" / "masks" / f"{sample['name']}.png"))
        assert np.array_equal(saved, expected), sample["name"]

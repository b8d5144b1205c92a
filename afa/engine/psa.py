"""The PSA two-stage mode (`python train.py method=psa`, PSA.md): stages cam → aff → rw → seg.

Each stage runs on its own run context in ``<run_dir>/<stage>/`` (its log, checkpoints and
wandb run with the stage as job type) and ends by writing ``stage.json``: the stage's
fingerprint (its config and the fingerprints of the stages it reads) and its results. A
stage whose record matches is skipped; one interrupted resumes from its last checkpoint;
``method.stage=<stage>`` runs one stage alone on the outputs of the earlier ones.

- cam: a classifier (``model.pooling``, GAP by default as PSA) trained on crops of the
  training split, then for every image of that split the CAM-stage outputs
  (`afa.engine.psa_cam`: grid labels, random-walk input, CAM-label mIoU).
- aff: AffinityNet (`afa.models.psa`) on grid-aligned crops (`afa.data.AffinityCropDataset`).
- rw: random-walk pseudo labels of every training image (palette PNGs), their mIoU.
- seg: the MiT + SegFormer network trained fully supervised on the pseudo labels, then
  validated like an AFA checkpoint (and evaluated by ``eval.py``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import hydra.utils
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Subset

from afa import viz
from afa.constants import IGNORE_INDEX
from afa.crf import require_crf
from afa.data import AffinityCropDataset, CropTrainDataset, FullImageEvalDataset, SameSizeBatchSampler, build_loader
from afa.data.layouts import ImageIndex
from afa.data.readers import read_mask
from afa.engine.builders import build_affinity_network, build_network, build_optimizer_from_config
from afa.engine.config import ConfigError
from afa.engine.evaluate import with_split
from afa.engine.optim import poly_warmup_multiplier
from afa.engine.predict import upsample
from afa.engine.psa_affinity import PSEUDO_LABELS, WalkOptions, WithWalkScores, affinity_training_loss, write_walk_labels
from afa.engine.psa_cam import AFFINITY_LABELS, PSA_CRF, CAMStageOptions, write_cam_stage
from afa.engine.run import RunContext
from afa.engine.stage_loop import StageLoop, StageLoopOptions
from afa.metrics import ConfusionMatrix
from afa.ops import multilabel_soft_margin_loss

LOG = logging.getLogger("afa")
STAGES = ("cam", "aff", "rw", "seg")
UPSTREAM = {"cam": (), "aff": ("cam",), "rw": ("cam", "aff"), "seg": ("rw",)}
RECORD = "stage.json"
HOW_NOT_WHAT = {"crf_workers"}  # stage keys that change how fast, not what: outside the fingerprint


# ---------------------------------------------------------------------- records
def stage_fingerprint(cfg: DictConfig, stage: str, upstream: dict[str, str]) -> str:
    """A hash of what a stage's outputs depend on: model, dataset, seed, its own method node
    and the fingerprints of the stages it reads."""
    node = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "dataset": OmegaConf.to_container(cfg.dataset, resolve=True),
        "seed": int(cfg.seed), "train_split": cfg.method.train_split,
        "stage": {k: v for k, v in OmegaConf.to_container(cfg.method[stage], resolve=True).items()
                  if k not in HOW_NOT_WHAT},
        "upstream": upstream,
    }
    return hashlib.sha256(json.dumps(node, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_record(folder: Path) -> dict[str, Any] | None:
    path = folder / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("fingerprint"), str):
            raise ValueError("no fingerprint")
    except (ValueError, OSError) as error:  # written atomically, so only an edit or a disk fault breaks it
        raise ConfigError(f"{path} is not a readable stage record ({error}): delete it to run stage "
                          f"{folder.name} again") from None
    return record


def write_record(folder: Path, fingerprint: str, results: dict[str, Any]) -> None:
    """Written last, atomically: a stage without a record is unfinished."""
    temporary = folder / f".{RECORD}.tmp"
    temporary.write_text(json.dumps({"fingerprint": fingerprint, "results": results}, indent=2, default=float))
    temporary.replace(folder / RECORD)


# ---------------------------------------------------------------------- data
def resolved_index(node: DictConfig) -> ImageIndex:
    """The ImageIndex of an index config node (a pending one is prepared first)."""
    index = hydra.utils.instantiate(node, _convert_="all")
    if not isinstance(index, ImageIndex):
        index.prepare()
        index = index.resolve()
    return index


def train_split_index(cfg: DictConfig) -> ImageIndex:
    """The training split as full images with labels (and masks when the dataset has them)."""
    return resolved_index(with_split(cfg.dataset.val, str(cfg.method.train_split)).index)


def with_masks_from(index: ImageIndex, folder: Path) -> ImageIndex:
    """The same images with masks read from ``folder/<name>.png`` (the pseudo labels)."""
    return dataclasses.replace(index, mask_paths=tuple(folder / f"{name}.png" for name in index.names))


def full_image_batches(dataset: Any, cfg: DictConfig, run: RunContext, desc: str) -> Iterator[dict]:
    """Same-size batches of full images (this rank's shard), with a progress bar in images."""
    limit = cfg.method.get("max_images")
    sizes = dataset.image_sizes
    if limit is not None and limit < len(dataset):
        dataset, sizes = Subset(dataset, range(int(limit))), list(sizes)[: int(limit)]
    sampler = SameSizeBatchSampler(sizes, int(cfg.eval.batch_size), run.dist.rank, run.world_size)
    loader = build_loader(dataset, batch_sampler=sampler, num_workers=int(cfg.eval.num_workers),
                          pin_memory=run.device.type == "cuda")
    total = sum(len(batch) for batch in sampler)
    with run.progress(total, desc, log_every=max(1, total // 10), unit="img") as progress:
        for batch in loader:
            yield batch
            progress.update(len(batch["name"]))


def loop_options(node: DictConfig, cfg: DictConfig, find_unused_parameters: bool = False) -> StageLoopOptions:
    return StageLoopOptions(
        max_iters=int(node.max_iters), batch_size=int(node.batch_size), num_workers=int(cfg.train.num_workers),
        log_every=int(cfg.train.log_every), checkpoint_every=int(cfg.train.checkpoint_every),
        amp=bool(cfg.train.amp), seed=int(cfg.seed), find_unused_parameters=find_unused_parameters,
    )


def stage_config(cfg: DictConfig, folder: Path) -> DictConfig:
    stage_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    stage_cfg.run_dir = str(folder)
    return stage_cfg


# ---------------------------------------------------------------------- stages
def run_cam_stage(cfg: DictConfig, run: RunContext, root: Path) -> dict[str, Any]:
    """PSA.md §1-§2: train the classifier, then the CAM-stage outputs of the training split."""
    node = cfg.method.cam
    index = train_split_index(cfg)
    crop = CropTrainDataset(index, crop_size=int(cfg.dataset.crop_size), scale_range=cfg.dataset.train.get("scale_range"),
                            flip_prob=float(cfg.dataset.train.get("flip_prob", 0.5)))
    num_classes = len(index.class_names) - 1
    model = OmegaConf.merge(cfg.model, {"pooling": node.pooling})
    network = run.place(build_network(model, num_classes))
    optimizer, scheduler = build_optimizer_from_config(network, cfg.optimizer, int(node.max_iters))

    def classification_loss(model: torch.nn.Module, batch: dict) -> dict:
        output = model(batch["image"].to(run.device), with_segmentation=False, with_affinity=False)
        return {"loss": multilabel_soft_margin_loss(output.class_logits, batch["labels"].to(run.device))}

    StageLoop(run, network, optimizer, scheduler, crop, classification_loss,
              loop_options(node, cfg, find_unused_parameters=True), desc="psa-cam").fit(
        {"config": OmegaConf.to_container(cfg, resolve=True), "class_names": list(index.class_names)})
    use_crf = node.crf == "auto" and _crf_installed() or node.crf is True
    options = CAMStageOptions(scales=tuple(float(s) for s in node.scales), flip=bool(node.flip),
                              alpha_low=float(node.alpha_low), alpha_high=float(node.alpha_high),
                              alpha_walk=float(cfg.method.rw.alpha), crf=PSA_CRF if use_crf else None,
                              cam_label_bkg_score=float(node.eval_bkg_score))
    LOG.info("psa-cam: CAM outputs of split %s (%d images%s)", cfg.method.train_split, len(index.names),
             ", CRF-refined" if use_crf else "")
    images = FullImageEvalDataset(index)
    workers = node.get("crf_workers")
    metrics = write_cam_stage(network, full_image_batches(images, cfg, run, "psa-cam outputs"), run.run_dir,
                              num_classes, options, run.device,
                              crf_workers=(os.cpu_count() or 1) if workers is None else int(workers),
                              scored=images.with_masks, reduce_sum=run.reduce_sum_)
    run.barrier()  # every rank's files are written
    log_label_pictures(run, "psa/cam/affinity_label", images, {"affinity label (grid)": run.run_dir / AFFINITY_LABELS},
                       final_step(cfg, "cam"))
    return {"cam_label_miou": None if metrics is None else metrics["miou"], "crf": use_crf}


def _crf_installed() -> bool:
    try:
        require_crf()
    except ImportError:
        return False
    return True


def run_aff_stage(cfg: DictConfig, run: RunContext, root: Path) -> dict[str, Any]:
    """PSA.md §3-§4: AffinityNet on grid-aligned crops labelled by the CAM stage."""
    node = cfg.method.aff
    dataset = AffinityCropDataset(train_split_index(cfg), root / "cam" / AFFINITY_LABELS, crop_size=int(node.crop_size),
                                  color_jitter=OmegaConf.to_container(node.color_jitter) if node.color_jitter else None)
    network = run.place(build_affinity_network(cfg.model))
    groups = [{"params": g["params"], "lr": float(node.lr) * g["lr_mult"], "weight_decay": g["weight_decay"]}
              for g in network.parameter_groups(float(node.weight_decay)) if g["params"]]
    # PSA's reference passes its weight decay as SGD's momentum (PSA.md §4, a defect): momentum is its own key.
    optimizer = torch.optim.SGD(groups, lr=float(node.lr), momentum=float(node.momentum))
    max_iters = int(node.max_iters)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: poly_warmup_multiplier(step, max_iters, 0, 1.0, float(node.poly_power)))
    radius = int(node.radius)

    def affinity_loss(model: torch.nn.Module, batch: dict) -> dict:
        loss, parts = affinity_training_loss(model, batch["image"].to(run.device), batch["grid_label"].to(run.device), radius)
        return {"loss": loss, **{k: v.float() for k, v in parts.items()}}

    summary = StageLoop(run, network, optimizer, scheduler, dataset, affinity_loss, loop_options(node, cfg),
                        desc="psa-aff").fit({"config": OmegaConf.to_container(cfg, resolve=True)})
    return {"final_loss": summary.get("loss")}


def run_rw_stage(cfg: DictConfig, run: RunContext, root: Path) -> dict[str, Any]:
    """PSA.md §5: the random walk's pseudo labels of every training image."""
    node = cfg.method.rw
    index = train_split_index(cfg)
    network = build_affinity_network(OmegaConf.merge(cfg.model, {"pretrained": None}))
    state = torch.load(root / "aff" / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    network.load_state_dict(state["model"])
    network = run.place(network).eval()
    num_classes = len(index.class_names) - 1
    images = FullImageEvalDataset(index)
    data = WithWalkScores(images, root / "cam", num_classes)
    options = WalkOptions(radius=int(cfg.method.aff.radius), beta=float(node.beta), logt=int(node.logt))
    metrics = write_walk_labels(network, full_image_batches(data, cfg, run, "psa-rw labels"), run.run_dir, num_classes,
                                options, run.device, scored=images.with_masks, reduce_sum=run.reduce_sum_)
    run.barrier()  # every rank's files are written
    log_label_pictures(run, "psa/rw/pseudo_label", images, {"affinity label (grid)": root / "cam" / AFFINITY_LABELS,
                                                             "random-walk label": run.run_dir / PSEUDO_LABELS},
                       final_step(cfg, "rw"))
    return {"pseudo_label_miou": None if metrics is None else metrics["miou"]}


def run_seg_stage(cfg: DictConfig, run: RunContext, root: Path) -> dict[str, Any]:
    """PSA.md §6: the segmentation network trained on the pseudo labels, then validated."""
    node = cfg.method.seg
    index = with_masks_from(train_split_index(cfg), root / "rw" / PSEUDO_LABELS)
    crop = CropTrainDataset(index, crop_size=int(cfg.dataset.crop_size), scale_range=cfg.dataset.train.get("scale_range"),
                            flip_prob=float(cfg.dataset.train.get("flip_prob", 0.5)), return_mask=True)
    num_classes = len(index.class_names) - 1
    network = run.place(build_network(cfg.model, num_classes))
    optimizer, scheduler = build_optimizer_from_config(network, cfg.optimizer, int(node.max_iters))

    def segmentation_loss(model: torch.nn.Module, batch: dict) -> dict:
        images, masks = batch["image"].to(run.device), batch["mask"].to(run.device)
        logits = model(images, with_segmentation=True, with_affinity=False).seg_logits
        logits = F.interpolate(logits.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)
        return {"loss": F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX)}

    StageLoop(run, network, optimizer, scheduler, crop, segmentation_loss,
              loop_options(node, cfg, find_unused_parameters=True), desc="psa-seg").fit(
        {"config": OmegaConf.to_container(cfg, resolve=True), "class_names": list(index.class_names),
         "config_source": OmegaConf.to_container(cfg, resolve=False)})
    val = hydra.utils.instantiate(cfg.dataset.val, _convert_="all")
    run.prepare_datasets(val)
    network.eval()
    matrix = ConfusionMatrix(num_classes + 1, device=run.device)
    pictures: list[tuple[np.ndarray, str]] = []
    with torch.no_grad():  # the segmentation head only: eval.py's single scale (AFA.md §10)
        for batch in full_image_batches(val, cfg, run, "psa-seg validation"):
            images, masks = batch["image"].to(run.device), batch["mask"].to(run.device)
            predictions = upsample(network.forward_segmentation(images), tuple(masks.shape[-2:])).argmax(dim=1)
            matrix.update(predictions, masks)
            for k in range(min(len(batch["name"]), PICTURES - len(pictures))):
                pictures.append(label_panel(batch["image"][k], batch["name"][k], {"prediction": predictions[k].cpu().numpy()},
                                            batch["mask"][k].numpy()))
    if run.is_main:
        run.experiment.log_images({"psa/seg/val_prediction": pictures}, step=final_step(cfg, "seg"))
    miou = matrix.reduce_(run.reduce_sum_).compute()["miou"]
    return {"segmentation_miou": miou, "checkpoint": str(run.checkpoints.last_path)}


# ---------------------------------------------------------------------- pictures
PICTURES = 4  # images per stage shown in the logger


def final_step(cfg: DictConfig, stage: str) -> int:
    """The step of a stage's results and pictures: after its training's last logged step
    (wandb drops a step that goes back)."""
    return int(cfg.method[stage].get("max_iters") or 0)


def label_panel(image: torch.Tensor, name: str, labels: dict[str, np.ndarray], mask: np.ndarray | None) -> tuple[np.ndarray, str]:
    """One picture: the image, each label map (a coarser one repeated to the image's pixels,
    as its cells cover them) and the ground truth when there is one."""
    picture = viz.denormalize_image(image)
    height, width = picture.shape[:2]
    panels, titles = [picture], ["image"]
    for title, label in {**labels, **({} if mask is None else {"ground truth": mask})}.items():
        stride_y, stride_x = -(-height // label.shape[0]), -(-width // label.shape[1])  # 1, or the grid's 8
        rows = np.minimum(np.arange(height) // stride_y, label.shape[0] - 1)
        cols = np.minimum(np.arange(width) // stride_x, label.shape[1] - 1)
        panels.append(viz.colorize_labels(label[rows[:, None], cols[None, :]]))
        titles.append(title)
    return viz.make_panel(panels, titles), name


def log_label_pictures(run: RunContext, key: str, dataset: FullImageEvalDataset, folders: dict[str, Path],
                       step: int) -> None:
    """Logs the first images of a pass with the labels the stage wrote for them (main rank)."""
    if not run.is_main:
        return
    pictures = []
    for position in range(min(PICTURES, len(dataset))):
        name = dataset.index.names[position]
        if not all((folder / f"{name}.png").is_file() for folder in folders.values()):
            continue  # beyond method.max_images
        sample = dataset[position]
        labels = {title: read_mask(folder / f"{name}.png") for title, folder in folders.items()}
        mask = sample.get("mask")
        pictures.append(label_panel(sample["image"], sample["name"], labels, None if mask is None else mask.numpy()))
    run.experiment.log_images({key: pictures}, step=step)


RUNNERS = {"cam": run_cam_stage, "aff": run_aff_stage, "rw": run_rw_stage, "seg": run_seg_stage}


def run_psa(cfg: DictConfig) -> dict[str, Any]:
    """Runs the stages of ``method.stage`` (all: in order), skipping those already done."""
    stage = str(cfg.method.stage)
    if stage != "all" and stage not in STAGES:
        raise ConfigError(f"method.stage={stage}: choose all or one of {', '.join(STAGES)}")
    root = _root_dir(cfg)
    fingerprints: dict[str, str] = {}
    results: dict[str, Any] = {"run_dir": str(root)}
    for name in STAGES:
        upstream = {}
        for before in UPSTREAM[name]:
            record = read_record(root / before)
            if record is None:
                if stage == "all":
                    raise RuntimeError(f"stage {before} has no record")  # cannot happen: stages run in order
                raise ConfigError(f"method.stage={name} needs stage {before}'s outputs in {root / before}: "
                                  f"run method.stage={before} (or method.stage=all) first")
            upstream[before] = fingerprints.get(before, record["fingerprint"])
        fingerprint = stage_fingerprint(cfg, name, upstream)
        fingerprints[name] = fingerprint
        if stage not in ("all", name):
            continue
        folder = root / name
        record = read_record(folder)
        if record is not None and record["fingerprint"] == fingerprint:
            LOG.info("psa: stage %s already done with this config (%s): skipped", name, folder / RECORD)
            results[name] = record["results"]
            continue
        if record is not None:
            (folder / RECORD).unlink()  # another config made it: redo the stage
        _claim(folder, fingerprint)
        with RunContext(stage_config(cfg, folder), resume="auto", job=name) as run:
            stage_results = RUNNERS[name](cfg, run, root)
            run.barrier()  # the record says the stage is done: on every rank
            run.experiment.log_scalars({f"psa/{name}/{k}": v for k, v in stage_results.items()
                                        if isinstance(v, (int, float)) and not isinstance(v, bool)},
                                       step=final_step(cfg, name))
            if run.is_main:
                write_record(folder, fingerprint, stage_results)
        LOG.info("psa: stage %s done: %s", name, stage_results)
        results[name] = stage_results
    return results


def _claim(folder: Path, fingerprint: str) -> None:
    """Marks the stage folder as this config's; checkpoints another config left are removed,
    so resuming never continues someone else's training."""
    marker = folder / "started.json"
    if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") != fingerprint:
        LOG.info("psa: %s holds another config's partial stage: starting it afresh", folder)
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"fingerprint": fingerprint}))


def _root_dir(cfg: DictConfig) -> Path:
    if cfg.get("run_dir"):
        return Path(str(cfg.run_dir))
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)

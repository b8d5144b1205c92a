"""`eval.py`: a checkpoint's segmentation, CAM, PAR or propagated labels on a split or on
any images, with the reference's test protocol (AFA.md §10), metrics and outputs; or how
well its attention affinity separates the ground truth's pairs (``target=affinity``, §6).

Batches of same-size images stream through one prediction function per target, then
through sinks that each do one thing (confusion matrix, mask PNGs, VOC server layout,
overlays); the dense CRF runs on CPU worker processes between them while the device
works on the next batch.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Subset

from afa import viz
from afa.crf import CRFOptions, CRFPool, require_crf
from afa.data import SameSizeBatchSampler, build_loader, voc_palette
from afa.data.classes import COCO_CLASSES, VOC_CLASSES
from afa.data.images import ImageListDataset
from afa.engine.afa_step import PAROptions, resolve_propagation
from afa.engine.builders import build_dataset, build_network
from afa.engine.checkpoint import load_checkpoint
from afa.engine.config import ConfigError
from afa.engine.evaluator import autocast_context
from afa.engine.predict import (
    Target,
    TestProtocol,
    affinity_with_targets,
    segmentation_logits,
    target_label,
    upsample,
)
from afa.engine.run import RunContext
from afa.metrics import AffinityRecall, ConfusionMatrix, iou_table_rows
from afa.models.network import AFANetwork
from afa.models.weights import CheckpointError, afa_reference_filter_fn, load_strict

LOG = logging.getLogger("afa")
SAVE_KINDS = ("masks", "overlays", "server")
TARGETS = ("segmentation", "cam", "par", "propagated", "affinity")
SERVER_FOLDER = Path("results/VOC2012/Segmentation/comp6_test_cls")


@dataclass(frozen=True)
class EvalOptions:
    """Everything the loop needs, read once from the eval config."""

    target: Target
    protocol: TestProtocol
    crf: CRFOptions | None
    crf_workers: int
    save: tuple[str, ...]
    batch_size: int
    num_workers: int
    amp: bool

    @classmethod
    def from_config(cls, cfg: DictConfig, resize_long: int | None) -> EvalOptions:
        save = tuple(str(kind) for kind in (cfg.save or ()))
        unknown = sorted(set(save) - set(SAVE_KINDS))
        if unknown:
            raise ConfigError(f"save={list(save)}: unknown {unknown}; choose from {list(SAVE_KINDS)}")
        if cfg.target not in TARGETS:
            raise ConfigError(f"target={cfg.target}: choose one of {', '.join(TARGETS)}")
        if cfg.crf and cfg.target != "segmentation":
            raise ConfigError(f"crf=true refines segmentation logits; target={cfg.target} has none (drop crf)")
        if save and cfg.target == "affinity":
            raise ConfigError(f"save={list(save)}: target=affinity scores pairs and writes no label maps (drop save)")
        scales = tuple(float(s) for s in cfg.scales)
        if not scales or min(scales) <= 0:
            raise ConfigError(f"scales={list(scales)}: give one or more positive scales")
        for key, low in (("batch_size", 1), ("num_workers", 0), ("crf_workers", 0), ("max_images", 1)):
            value = cfg.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise ConfigError(f"{key}={value}: give an integer >= {low}" + (" or null" if key in ("crf_workers", "max_images") else ""))
        workers = cfg.crf_workers
        return cls(
            target=cfg.target,
            protocol=TestProtocol(scales, bool(cfg.flip), resize_long),
            crf=CRFOptions(**cfg.crf_params) if cfg.crf else None,
            crf_workers=(os.cpu_count() or 1) if workers is None else int(workers),
            save=save,
            batch_size=int(cfg.batch_size),
            num_workers=int(cfg.num_workers),
            amp=bool(cfg.amp),
        )


# ---------------------------------------------------------------------- configuration
def checkpoint_config(cfg: DictConfig, state: dict[str, Any], chosen_groups: dict[str, str | None]) -> DictConfig:
    """The model, dataset and method to evaluate with: the checkpoint's stored config with
    the command line's keys on top; a group chosen on the command line (``model=mit_b1``)
    replaces the stored one. A reference AFA state dict stores none: give model= and dataset=."""
    stored = OmegaConf.create(state.get("config_source") or state.get("config") or {})
    merged = {}
    for group in ("model", "dataset", "method"):
        given = cfg.get(group)
        if chosen_groups.get(group) is not None or group not in stored:
            if given is None:
                raise ConfigError(
                    f"ckpt={cfg.ckpt} stores no {group} config (a reference AFA state dict?): "
                    f"give {group}=... on the command line (e.g. model=mit_b1 dataset=voc dataset.root=...)"
                )
            merged[group] = given
        else:
            merged[group] = OmegaConf.merge(stored[group], given) if given is not None else stored[group]
    return OmegaConf.create(merged)


def with_split(node: DictConfig, split: str | None) -> DictConfig:
    """A dataset node with its ``split`` (at the top or in a nested ``index``) replaced."""
    node = OmegaConf.create(OmegaConf.to_container(node, resolve=True))
    if split is None:
        return node
    holder = node.index if "index" in node and "split" in node.index else node
    if "split" not in holder:
        raise ConfigError(f"split={split}: the dataset config {node.get('_target_')} has no split to set")
    split_file = holder.get("split_file")
    if split_file is not None and Path(str(split_file)).stem != split:
        raise ConfigError(
            f"split={split}, but the dataset's list is split_file={split_file}: give the list of {split!r} "
            f"(dataset.val.index.split_file=...) or dataset.val.index.split_file=null"
        )
    holder.split = split
    if split == "test" and "with_masks" in holder and str(holder.get("_target_", "")).endswith("voc_index"):
        holder.with_masks = holder.with_labels = False  # VOC's test masks and labels are withheld (server)
    return node


def resolve_resize_long(value: Any, dataset: DictConfig) -> int | None:
    """``auto``: the dataset's ``eval_resize_long`` when it has one (the synthetic benchmark:
    null, evaluated at its size like the training validation), else the reference's 512."""
    if value not in (None, "auto") and (not isinstance(value, int) or isinstance(value, bool) or value < 32):
        raise ConfigError(f"resize_long={value}: give auto, null or a long side in pixels (>= 32)")
    if value == "auto":
        value = dataset.get("eval_resize_long", 512)
    return None if value is None else int(value)


def known_class_names(dataset: DictConfig, num_classes: int) -> list[str] | None:
    """Class names a dataset config implies without reading its files (for inference)."""
    names = {"voc": VOC_CLASSES, "coco": COCO_CLASSES}.get(str(dataset.get("name")))
    if names is None and str(dataset.get("name", "")).startswith("synthetic"):
        from afa.data.synthetic import SYNTHETIC_CLASSES

        names = SYNTHETIC_CLASSES
    return list(names) if names is not None and len(names) == num_classes + 1 else None


# ---------------------------------------------------------------------- network
def checkpoint_classes(weights: dict[str, Tensor]) -> int | None:
    """Foreground classes of a network state dict (its classifier's rows), None if it has none."""
    classifier = next((v for k, v in weights.items() if k.endswith("classifier.weight")), None)
    return None if classifier is None else int(classifier.shape[0])


def load_network(path: Path, state: dict[str, Any], model: DictConfig, num_classes: int) -> AFANetwork:
    """The network of ``model`` for ``num_classes`` with the checkpoint's weights, strictly."""
    weights = state.get("model", state)
    trained_classes = checkpoint_classes(weights)
    if trained_classes is not None and trained_classes != num_classes:
        raise ConfigError(
            f"ckpt={path} was trained for {trained_classes} classes but the dataset has {num_classes}: "
            "evaluate it on the dataset it was trained on (dataset=...)"
        )
    network = build_network(OmegaConf.merge(model, {"pretrained": None, "pretrained_decoder": False}), num_classes)
    if "model" in state:
        load_strict(network, weights, path)
    else:
        load_strict(network, afa_reference_filter_fn(weights), path)
    return network.eval()


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Our checkpoint dict, or a bare state dict (the reference's ``wetr_iter_*.pth``)."""
    if not path.is_file():
        raise FileNotFoundError(f"ckpt={path} does not exist: give the path of a checkpoint (e.g. runs/<run>/checkpoints/last.pt)")
    try:
        return load_checkpoint(path)
    except (RuntimeError, TypeError) as error:
        raise CheckpointError(f"ckpt={path} cannot be read: {error}") from error


# ---------------------------------------------------------------------- sinks
class OutputWriter:
    """Writes masks (palette PNGs readable as dataset masks), VOC server files and overlays
    on a thread pool, so PNG encoding overlaps the device work."""

    def __init__(self, folder: Path, kinds: tuple[str, ...], class_names: list[str]) -> None:
        self.folder, self.kinds, self.class_names = folder, kinds, class_names
        self.palette = voc_palette().reshape(-1).tolist()
        for kind in kinds:
            (folder / (SERVER_FOLDER if kind == "server" else Path(kind))).mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(max_workers=2) if kinds else None
        self._futures: list[Any] = []

    def write(self, name: str, label: np.ndarray, image: Tensor | None) -> None:
        if self._pool is not None:
            self._futures.append(self._pool.submit(self._write, name, label, image))
            if len(self._futures) > 64:
                self._futures = [f for f in self._futures if not f.done() or f.result()]

    def _write(self, name: str, label: np.ndarray, image: Tensor | None) -> None:
        png = Image.fromarray(label.astype(np.uint8), mode="P")
        png.putpalette(self.palette)
        if "masks" in self.kinds:
            png.save(self.folder / "masks" / f"{name}.png")
        if "server" in self.kinds:
            png.save(self.folder / SERVER_FOLDER / f"{name}.png")
        if "overlays" in self.kinds and image is not None:
            picture = viz.overlay_with_legend(viz.denormalize_image(image), label, self.class_names)
            Image.fromarray(picture).save(self.folder / "overlays" / f"{name}.jpg", quality=92)

    def close(self) -> None:
        if self._pool is not None:
            for future in self._futures:
                future.result()  # re-raises a failed write
            self._pool.shutdown()

    def archive_server_layout(self) -> Path | None:
        """``results.tar.gz`` of the server layout (rank 0, after every rank wrote)."""
        if "server" not in self.kinds:
            return None
        archive = self.folder / "results.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(self.folder / "results", arcname="results")
        return archive


# ---------------------------------------------------------------------- the loop
class Evaluation:
    """One evaluation: data, network and the streaming loop, on a run context.

    Args:
        cfg: the eval config (``conf/eval.yaml``) with the checkpoint's groups merged in.
        run: the run's context.
        state: the loaded checkpoint.
    """

    def __init__(self, cfg: DictConfig, run: RunContext, state: dict[str, Any], groups: DictConfig) -> None:
        self.cfg, self.run, self.device = cfg, run, run.device
        self.groups, self.weights = groups, state.get("model", state)
        self.stored_class_names = state.get("class_names")
        self.options = EvalOptions.from_config(cfg, resolve_resize_long(cfg.resize_long, groups.dataset))
        if self.options.crf is not None:
            require_crf()  # before any work: the install command, not a late ImportError
        self.dataset, self.class_names = self._dataset()
        self.num_classes = len(self.class_names) - 1
        self.network = load_network(Path(cfg.ckpt), state, groups.model, self.num_classes).to(self.device)
        run.prepare_datasets(self.dataset)  # after the checks: a wrong checkpoint fails before any work
        self.output_dir = Path(cfg.output_dir) if cfg.output_dir else run.run_dir
        method = groups.method
        self.cam_scales = tuple(float(s) for s in method.cam.scales)
        if method.get("name") == "psa":  # the PSA mode's segmentation network (its seg stage)
            if self.options.target != "segmentation":
                raise ConfigError(f"target={self.options.target}: for a PSA checkpoint use target=segmentation; the "
                                  "cam and rw stages report the CAM-label and pseudo-label mIoU (<run>/cam|rw/stage.json)")
            return
        self.bkg_score = float(method.cam.bkg_score)
        par = method.par  # target=par: the PAR label of AFA.md §5 with both thresholds at bkg_score
        self.par = PAROptions(tuple(int(d) for d in par.dilations), int(par.num_iterations), float(par.w1), float(par.w2))
        self.propagation_bkg_score = float(method.affinity.propagation_bkg_score)
        self.radius = int(method.affinity.radius)
        self.implementation = resolve_propagation(str(method.affinity.get("propagation", "auto")), self.device)

    def _dataset(self) -> tuple[Dataset, list[str]]:
        dataset_cfg = self.groups.dataset
        if self.cfg.images is not None:
            if self.options.target == "affinity":
                raise ConfigError("target=affinity scores against ground-truth masks; images=... has none "
                                  "(drop images to evaluate a split with masks)")
            if self.options.target != "segmentation":
                raise ConfigError(f"target={self.options.target} needs image labels; images=... has none (use target=segmentation)")
            names = (self.cfg.get("class_names") or self.stored_class_names
                     or known_class_names(dataset_cfg, checkpoint_classes(self.weights) or 0))
            if names is None:
                raise ConfigError("images=...: the class names are unknown; give class_names=[background,...]")
            return ImageListDataset(self.cfg.images), list(names)
        node = with_split(dataset_cfg.val if dataset_cfg.get("val") is not None else dataset_cfg.train, self.cfg.split)
        dataset = build_dataset(node, "dataset.val")
        if self.options.target == "affinity" and not getattr(dataset, "with_masks", False):
            raise ConfigError(f"target=affinity scores against ground-truth masks; split={self.cfg.split or 'val'} of "
                              f"dataset {dataset_cfg.get('name')} has none (choose a split with masks, e.g. split=val)")
        return dataset, list(dataset.class_names)

    def _batches(self) -> Any:
        dataset, sizes = self.dataset, self.dataset.image_sizes
        if self.cfg.max_images is not None and self.cfg.max_images < len(dataset):
            dataset, sizes = Subset(dataset, range(int(self.cfg.max_images))), list(sizes)[: int(self.cfg.max_images)]
        sampler = SameSizeBatchSampler(sizes, self.options.batch_size, self.run.dist.rank, self.run.world_size)
        count = sum(len(batch) for batch in sampler)
        loader = build_loader(dataset, batch_sampler=sampler, num_workers=self.options.num_workers,
                              pin_memory=self.device.type == "cuda")
        return loader, count

    def _predict(self, batch: dict) -> tuple[Tensor | None, Tensor | None]:
        """(fused logits at 1/4 of the resized input or None, labels at the label size or None)."""
        images = batch["image"].to(self.device, non_blocking=True)
        size = tuple(images.shape[-2:])
        with autocast_context(self.device, self.options.amp):
            if self.options.target == "segmentation":
                logits = segmentation_logits(self.network, images, self.options.protocol)
                if self.options.crf is not None:
                    return logits, None
                return None, upsample(logits, size).argmax(dim=1)
            max_classes = int(batch["labels"].sum(dim=1).max())  # CPU tensor: no device sync
            labels = batch["labels"].to(self.device, non_blocking=True)
            return None, target_label(
                self.network, images, labels, size, self.options.target, self.cam_scales, self.bkg_score,
                self.propagation_bkg_score, self.radius, self.implementation, self.par, max_classes,
            )

    def _affinity(self, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        """(B, N, N) float32 affinity of the scale-1 forward, its (B, N, N) uint8 mask targets
        and (B, N) foreground nodes."""
        images = batch["image"].to(self.device, non_blocking=True)
        masks = batch["mask"].to(self.device, non_blocking=True)
        with autocast_context(self.device, self.options.amp):
            return affinity_with_targets(self.network, images, masks, self.radius)

    def run_loop(self) -> dict[str, Any]:
        loader, count = self._batches()
        matrix = ConfusionMatrix(self.num_classes + 1, device=self.device)
        recall = AffinityRecall(self.device) if self.options.target == "affinity" else None
        writer = OutputWriter(self.output_dir, self.options.save, self.class_names)
        crf = CRFPool(self.options.crf_workers, self.options.crf) if self.options.crf is not None else None
        pending_masks: dict[str, Tensor] = {}  # masks of images whose CRF label is not back yet
        progress = self.run.progress(count, f"eval {self.options.target}", log_every=max(1, count // 10), unit="img")
        started = time.perf_counter()


        def finish(name: str, label: Tensor, image: Tensor | None) -> None:
            if name in pending_masks:
                matrix.update(label[None].to(self.device), pending_masks.pop(name)[None])
            writer.write(name, label.cpu().numpy(), image)

        try:
            for batch in loader:
                if recall is not None:  # pairs only: no label map, no sinks
                    recall.update(*self._affinity(batch))
                    progress.update(len(batch["name"]))
                    continue
                logits, labels = self._predict(batch)
                masks = batch.get("mask")
                keep_images = "overlays" in self.options.save
                if labels is not None:
                    if masks is not None:
                        matrix.update(labels, masks)
                    if self.options.save:
                        labels_host = labels.cpu().numpy()  # one copy per batch, not per image
                        for k, name in enumerate(batch["name"]):
                            writer.write(name, labels_host[k], batch["image"][k] if keep_images else None)
                else:  # CRF: each image goes to a worker with its logits and its uint8 pixels
                    logits = logits.float().cpu().numpy()
                    pixels = viz.denormalize_image(batch["image"])
                    for k, name in enumerate(batch["name"]):
                        if masks is not None:
                            pending_masks[name] = masks[k]
                        image = batch["image"][k] if keep_images else None
                        for done, label in crf.submit((name, image), pixels[k], logits[k]):
                            finish(done[0], torch.from_numpy(label).long(), done[1])
                    for done, label in crf.completed():
                        finish(done[0], torch.from_numpy(label).long(), done[1])
                progress.update(len(batch["name"]))
            if crf is not None:
                for done, label in crf.drain():
                    finish(done[0], torch.from_numpy(label).long(), done[1])
        finally:
            progress.close()
            writer.close()
            if crf is not None:
                crf.close()
        self.run.barrier()  # every rank's files are written
        seconds = time.perf_counter() - started
        images = int(self.run.reduce_sum_(torch.tensor([count], device=self.device)).item())
        speed = {"num_images": images, "seconds": round(seconds, 3), "images_per_second": round(images / seconds, 3)}
        scored = bool(getattr(self.dataset, "with_masks", False))  # the same on every rank: the reduce is collective
        if recall is not None:
            results = self._report_affinity(recall.reduce_(self.run.reduce_sum_).compute(), speed)
        elif scored:
            results = self._report(matrix.reduce_(self.run.reduce_sum_).compute(), speed)
        else:
            results = {**speed, "output_dir": str(self.output_dir)}
        LOG.info("%d images in %.1f s (%.2f images/s)", images, seconds, images / seconds)
        if self.run.is_main:
            archive = writer.archive_server_layout()
            if archive is not None:
                LOG.info("VOC server layout: %s (archive %s)", self.output_dir / "results", archive)
        return results

    def _protocol_used(self) -> dict[str, Any]:
        """The scales that made the labels: the test protocol's for the segmentation head; the
        training CAM scales (method.cam.scales, no flip, no resize) for the CAM, PAR and propagated labels."""
        if self.options.target == "segmentation":
            protocol = self.options.protocol
            return {"scales": list(protocol.scales), "flip": protocol.flip, "resize_long": protocol.resize_long}
        return {"scales": list(self.cam_scales), "flip": False, "resize_long": None}

    def _report(self, metrics: dict[str, Any], speed: dict[str, Any]) -> dict[str, Any]:
        names = self.class_names
        results = {
            "checkpoint": str(self.cfg.ckpt), "target": self.options.target, "split": self.cfg.split,
            **self._protocol_used(), "crf": self.options.crf is not None,
            **speed, "class_names": names, "output_dir": str(self.output_dir),
            "miou": metrics["miou"], "miou_standard": metrics["miou_standard"],
            "pixel_accuracy": metrics["pixel_accuracy"], "mean_accuracy": metrics["mean_accuracy"],
            "iou": dict(zip(names, metrics["iou"])),
        }
        if self.run.is_main:
            (self.output_dir / "metrics.json").write_text(json.dumps(_finite_or_null(results), indent=2))
            rows = iou_table_rows(metrics["iou"], names)
            experiment = self.run.experiment
            experiment.log_scalars({f"eval/{k}": results[k] for k in ("miou", "miou_standard", "pixel_accuracy", "mean_accuracy")}, step=0)
            experiment.log_table("eval/per_class_iou", ["index", "class", "iou"], rows, step=0)
            for name, value in zip(names, metrics["iou"]):
                LOG.info("  %-16s %s", name, "   -  " if math.isnan(value) else f"{value:.4f}")
        return results

    def _report_affinity(self, metrics: dict[str, Any], speed: dict[str, Any]) -> dict[str, Any]:
        """The affinity target's results (``metrics.json`` and the logger on rank 0)."""
        results = {
            "target": self.options.target, "split": self.cfg.split, "checkpoint": str(self.cfg.ckpt),
            "radius": self.radius, **metrics, **speed, "output_dir": str(self.output_dir),
        }
        if self.run.is_main:
            (self.output_dir / "metrics.json").write_text(json.dumps(_finite_or_null(results), indent=2))
            recalls = ("positive_recall", "foreground_positive_recall", "negative_recall")
            self.run.experiment.log_scalars({f"eval/{k}": results[k] for k in recalls}, step=0)
        return results


def _finite_or_null(value: Any) -> Any:
    """JSON has no NaN: a class absent from the ground truth gets null."""
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(item) for item in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def print_results(results: dict[str, Any], cfg: DictConfig) -> None:
    """The command's last lines: the two mIoUs and accuracies (target=affinity: the two
    recalls), and where the files are."""
    if "positive_recall" in results:
        print(
            f"affinity on {results['split'] or 'val'} ({results['num_images']} images, radius {results['radius']}): "
            f"positive recall {results['positive_recall']:.3f} (inside objects {results['foreground_positive_recall']:.3f}) | "
            f"negative recall {results['negative_recall']:.3f} (pairs within the window: {results['positives']} positive, "
            f"{results['foreground_positives']} of them inside objects, {results['negatives']} negative)"
        )
    elif "miou" in results:
        scales = "CAM scales" if results["target"] != "segmentation" else "scales"
        protocol = f"{scales} {results['scales']}{' + flip' if results['flip'] else ''}{' + CRF' if results['crf'] else ''}"
        print(
            f"{results['target']} on {results['split'] or 'val'} ({results['num_images']} images, {protocol}): "
            f"mIoU {results['miou']:.4f} (over classes in the ground truth, as the reference) | "
            f"standard mIoU {results['miou_standard']:.4f} (over classes with a non-empty union) | "
            f"pixel accuracy {results['pixel_accuracy']:.4f} | mean accuracy {results['mean_accuracy']:.4f}"
        )
    print(f"{results['num_images']} images in {results['seconds']:.1f} s ({results['images_per_second']:.2f} images/s); "
          f"outputs: {results['output_dir']}")


def evaluate(cfg: DictConfig, chosen_groups: dict[str, str | None]) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt`` (see ``conf/eval.yaml``); returns the metrics (without masks: the
    image count, time and output folder only)."""
    path = Path(str(cfg.ckpt))
    state = read_checkpoint(path)
    groups = checkpoint_config(cfg, state, chosen_groups)
    with RunContext(cfg, job="eval") as run:
        evaluation = Evaluation(cfg, run, state, groups)
        return evaluation.run_loop()

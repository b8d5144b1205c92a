"""The single-stage AFA training loop (AFA.md §8), from a composed hydra config.

The run context (:mod:`afa.engine.run`) owns devices, processes, files and loggers; this
module is the loop; the network and the ops know nothing of either.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import Subset

from afa import viz
from afa.data import ResumableSampler, SameSizeBatchSampler, build_loader
from afa.engine.afa_step import AFAOptions, afa_losses, pseudo_labels, reference_classification_cam_passes
from afa.engine.builders import build_datasets, build_network, build_optimizer_from_config
from afa.engine.config import validate_config
from afa.engine.evaluator import autocast_context, evaluate_afa
from afa.engine.log import NullLogger, Progress
from afa.engine.run import RunContext
from afa.metrics import iou_table_rows
from afa.models.network import AFANetwork

LOG = logging.getLogger("afa")


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; raised before the optimizer step, so weights stay clean."""


@dataclass
class StepResult:
    """What one iteration produced, kept on the device until a log step reads it."""

    losses: dict[str, Tensor]
    counts: dict[str, Tensor] = field(default_factory=dict)


class PhaseTimer:
    """Wall time per phase of an iteration; synchronises CUDA only when measuring.

    Args:
        device: the training device.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.enabled = False
        self.times: dict[str, float] = {}
        self._last = 0.0

    def start(self, enabled: bool) -> None:
        self.enabled, self.times = enabled, {}
        self._last = self._now() if enabled else 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def mark(self, phase: str) -> None:
        if self.enabled:
            now = self._now()
            self.times[phase] = self.times.get(phase, 0.0) + now - self._last
            self._last = now


class AFATrainer:
    """One AFA training run: data, network, optimiser and the loop, on a run context.

    Args:
        cfg: the composed, validated config.
        run: the run's context (process, device, directory, checkpoints, logger).
    """

    def __init__(self, cfg: DictConfig, run: RunContext) -> None:
        self.cfg = cfg
        self.run = run
        self.device = run.device
        self.run_dir = run.run_dir
        self.checkpoints = run.checkpoints
        self.experiment = run.experiment
        self.method = cfg.method
        self.options = AFAOptions.from_config(cfg.method)
        self.max_iters = int(cfg.train.max_iters)
        self.amp = bool(cfg.train.amp)

        self.train_dataset, self.val_dataset = build_datasets(cfg.dataset)
        run.prepare_datasets(self.train_dataset, self.val_dataset)
        self.num_classes = int(self.train_dataset.num_classes)
        self.class_names = list(self.train_dataset.class_names)
        self.network: AFANetwork = run.place(build_network(cfg.model, self.num_classes))
        self.optimizer, self.scheduler = build_optimizer_from_config(self.network, cfg.optimizer, self.max_iters)
        self.sampler = ResumableSampler(len(self.train_dataset), seed=int(cfg.seed), rank=run.dist.rank, world_size=run.world_size)
        self.step = 0
        if run.resumed is not None:
            self._restore(run.resumed)
        self.model = self._wrap(self.network)
        self.timer = PhaseTimer(self.device)

    # ---------------------------------------------------------------- setup
    def _wrap(self, network: AFANetwork) -> torch.nn.Module:
        # Skipping the inactive losses leaves the decoder and affinity head unused in the first phase.
        self.find_unused_parameters = (
            self.run.world_size > 1 and self.options.inactive_losses == "skip"
            and self.options.phase(self.step) == "classification"
        )
        return self.run.wrap(network, self.find_unused_parameters, compile=bool(self.cfg.train.compile))

    def _restore(self, state: dict[str, Any]) -> None:
        self.step = self.run.restore_training(state, self.network, self.optimizer, self.scheduler, self.sampler)

    # ---------------------------------------------------------------- data
    def _train_batches(self) -> Iterator[dict]:
        loader = build_loader(
            self.train_dataset,
            batch_size=int(self.cfg.train.batch_size),
            sampler=self.sampler,
            num_workers=int(self.cfg.train.num_workers),
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            # Its own generator: creating the iterator must not advance the global RNG, or a
            # resumed run's dropout/stochastic-depth draws would shift.
            generator=torch.Generator().manual_seed(int(self.cfg.seed)),
        )
        return iter(loader)

    def _val_batches(self) -> Iterator[dict] | None:
        if self.val_dataset is None:
            return None
        dataset = self.val_dataset
        max_images = self.cfg.eval.max_images
        sizes = dataset.image_sizes
        if max_images is not None and max_images < len(dataset):
            dataset, sizes = Subset(dataset, range(max_images)), sizes[:max_images]
        batches = SameSizeBatchSampler(sizes, int(self.cfg.eval.batch_size), self.run.dist.rank, self.run.world_size)
        return build_loader(
            dataset, batch_sampler=batches, num_workers=int(self.cfg.eval.num_workers),
            pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(0),
        )

    # ---------------------------------------------------------------- one iteration
    def _train_step(self, batch: dict) -> StepResult:
        """AFA.md §8: pseudo labels of the phase, the AFA losses, one optimiser step."""
        options, phase = self.options, self.options.phase(self.step)
        images = batch["image"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        boxes = batch["valid_box"].to(self.device, non_blocking=True)
        max_classes = int(batch["labels"].sum(dim=1).max())  # CPU tensor: no device sync
        self.timer.mark("data")
        affinity_source = options.affinity_source(self.step)
        pseudo = None
        with autocast_context(self.device, self.amp):
            mark = self.timer.mark
            if phase == "classification":
                full = options.inactive_losses == "zero"
                output = self.model(images, with_segmentation=full, with_affinity=full)
                mark("forward")
                if options.cam_reference_mode:
                    reference_classification_cam_passes(self.network, images, options)
                    mark("cam")
            else:
                propagate = phase == "propagated_label" or affinity_source == "propagated"
                if options.cam_reference_mode:  # the reference's order: training forward, then CAM passes
                    output = self.model(images)
                    mark("forward")
                    pseudo = pseudo_labels(self.network, images, labels, boxes, options, propagate=propagate,
                                           max_classes=max_classes, mark=mark)
                else:
                    pseudo = pseudo_labels(self.network, images, labels, boxes, options, propagate=propagate,
                                           max_classes=max_classes, mark=mark)
                    output = self.model(images)
                    mark("forward")
            losses, counts = afa_losses(
                output, labels, pseudo, phase, options, self.network.affinity_grid(*images.shape[-2:]), affinity_source
            )
        self._check_finite(losses, batch["name"])
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        mark("losses_backward")
        self.optimizer.step()
        self.scheduler.step()
        self.timer.mark("optimizer")
        return StepResult(losses, counts)

    def _pictures(self, batch: dict) -> dict[str, Tensor]:
        """Image 0's CAM, PAR, propagated and predicted labels and affinity, on its own pass.

        Eval mode and afa's CAM passes: no random draws, no BatchNorm update, so logging
        leaves the training state exactly as it was.
        """
        images = batch["image"][:1].to(self.device)
        labels = batch["labels"][:1].to(self.device)
        boxes = batch["valid_box"][:1].to(self.device)
        options = replace(self.options, cam_reference_mode=False)
        with torch.no_grad(), autocast_context(self.device, self.amp):
            pictures = pseudo_labels(self.network, images, labels, boxes, options, propagate=True)
            self.network.eval()
            try:
                output = self.network(images)
            finally:
                self.network.train()
        pictures["prediction"] = F.interpolate(
            output.seg_logits.float(), size=images.shape[-2:], mode="bilinear", align_corners=False
        ).argmax(dim=1)
        pictures["affinity"] = output.affinity.float()
        return pictures

    def _check_finite(self, losses: dict[str, Tensor], names: list[str]) -> None:
        if bool(torch.isfinite(losses["loss"]).item()):
            return
        values = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
        raise NonFiniteLossError(
            f"non-finite loss at iteration {self.step} ({values}); images: {', '.join(names)}. "
            f"No checkpoint was written for this state; the last good one is in {self.checkpoints.run_dir}"
        )

    # ---------------------------------------------------------------- bookkeeping
    def _checkpoint_state(self, consumed: int) -> dict[str, Any]:
        return {
            **self.run.training_state(self.network, self.optimizer, self.scheduler, self.sampler, consumed),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            # Unresolved too: eval.py's dataset.root=... then moves every path that follows it.
            "config_source": OmegaConf.to_container(self.cfg, resolve=False),
            "class_names": self.class_names,
            "wandb_run_id": getattr(self.experiment, "run_id", None),
        }

    def _save(self, consumed: int, metric: float | None = None) -> None:
        state = self._checkpoint_state(consumed)  # collective under DDP: every rank takes part
        self.run.save_checkpoint(self.step, state, metric)

    def _log_step(self, window: list[StepResult], progress: Progress, seconds: float, images_seen: int) -> None:
        means = {k: torch.stack([r.losses[k].detach().float() for r in window if k in r.losses]).mean()
                 for k in window[-1].losses}
        scalars = {f"train/{k}": v.item() for k, v in means.items()}
        for key, value in window[-1].counts.items():
            scalars[f"train/{key}"] = float(value.item())
        scalars["train/lr"] = self.optimizer.param_groups[0]["lr"]
        scalars["train/images_per_second"] = images_seen / max(seconds, 1e-9)
        scalars.update({f"time/{phase}": t for phase, t in self.timer.times.items()})
        if self.device.type == "cuda":
            scalars["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.experiment.log_scalars(scalars, step=self.step)
        line = progress.summary(**{k.split("/")[1]: v for k, v in scalars.items() if k.startswith("train/") and "loss" in k})
        phases = " ".join(f"{phase}={t:.2f}s" for phase, t in self.timer.times.items())
        if "memory/max_allocated_gib" in scalars:
            phases += f" | peak memory {scalars['memory/max_allocated_gib']:.1f} GiB"
        LOG.info("%s | %s", line, phases)

    def _log_pictures(self, batch: dict) -> None:
        result_pictures = self._pictures(batch)
        image = viz.denormalize_image(batch["image"][0])
        labels = batch["labels"][0]
        pictures = {"train/input": [(image, ", ".join(self.class_names[int(c) + 1] for c in labels.nonzero().flatten()))]}
        cams = result_pictures["cams"][0].float().cpu()
        present = labels.nonzero().flatten()
        if len(present):
            pictures["train/cam"] = [(viz.cam_overlay(image, cams[int(c)].numpy()), self.class_names[int(c) + 1]) for c in present]
        for key in ("refined", "propagated", "prediction"):
            if key in result_pictures:
                pictures[f"train/{key}_label"] = viz.colorize_labels(result_pictures[key][0].cpu().numpy())
        if "affinity" in result_pictures:
            affinity = result_pictures["affinity"][0].cpu()
            rows, cols = self.network.affinity_grid(*batch["image"].shape[-2:])
            points = [(rows * k // 4, cols * k // 4) for k in (1, 2, 3)]
            pictures["train/attention_affinity"] = viz.affinity_map(affinity.numpy(), (rows, cols), points, image=image)
        self.experiment.log_images(pictures, step=self.step)

    def validate(self) -> dict[str, dict] | None:
        batches = self._val_batches()
        if batches is None:
            return None
        cam, affinity = self.method.cam, self.method.affinity
        results = evaluate_afa(
            self.network, batches, self.num_classes, self.device, tuple(cam.scales), float(cam.bkg_score),
            float(affinity.propagation_bkg_score), int(affinity.radius), amp=self.amp,
            propagation=self.options.propagation, reduce_sum=self.run.reduce_sum_,
        )
        scalars = {"val/cls_f1": results["classification"]["f1"]}
        for part in ("cam", "propagated", "segmentation"):
            scalars[f"val/{part}_miou"] = results[part]["miou"]
        self.experiment.log_scalars(scalars, step=self.step)
        rows = [[name, *(results[part]["iou"][k] for part in ("cam", "propagated", "segmentation"))]
                for k, name in enumerate(self.class_names)]
        self.experiment.log_table("val/per_class_iou", ["class", "cam", "propagated", "segmentation"], rows, step=self.step)
        LOG.info(
            "validation at %d: cls F1 %.3f | CAM mIoU %.3f | propagated mIoU %.3f | segmentation mIoU %.3f",
            self.step, scalars["val/cls_f1"], scalars["val/cam_miou"], scalars["val/propagated_miou"],
            scalars["val/segmentation_miou"],
        )
        return results

    # ---------------------------------------------------------------- loop
    def fit(self) -> dict[str, Any]:
        train = self.cfg.train
        log_every, eval_every = int(train.log_every), int(train.eval_every)
        image_every, checkpoint_every = int(train.image_log_every), int(train.checkpoint_every)
        batch_size = int(train.batch_size)
        if self.run.is_main:
            LOG.info("run directory: %s", self.run_dir.resolve())
            LOG.info("to resume if interrupted: python train.py run_name=%s train.resume=auto", self.cfg.run_name)
        batches = self._train_batches()
        progress = self.run.progress(self.max_iters, "train", initial=self.step)
        window: list[StepResult] = []
        window_start, images_in_window = time.perf_counter(), 0
        consumed = 0
        results: dict[str, dict] | None = None
        self.network.train()
        while self.step < self.max_iters:
            measure = log_every > 0 and (self.step + 1) % log_every == 0
            # Pictures only where a logger keeps them (NullLogger would discard the pass).
            picture_step = (image_every > 0 and (self.step + 1) % image_every == 0 and self.run.is_main
                            and not isinstance(self.experiment, NullLogger))
            phase = self.options.phase(self.step)
            self.timer.start(measure)
            if self.find_unused_parameters and phase != "classification":
                # Every parameter gets a gradient from here: drop DDP's per-step unused search.
                self.model = self._wrap(self.network)
                LOG.info("iteration %d: full AFA phase, DDP re-wrapped without find_unused_parameters", self.step)
            batch = next(batches)
            consumed += batch_size
            result = self._train_step(batch)
            self.step += 1
            images_in_window += batch_size * self.run.world_size
            window.append(result)
            progress.update(1)
            if picture_step:
                self._log_pictures(batch)
            if measure:
                self._log_step(window, progress, time.perf_counter() - window_start, images_in_window)
                window, window_start, images_in_window = [], time.perf_counter(), 0
            last = self.step == self.max_iters
            if (eval_every > 0 and self.step % eval_every == 0) or last:
                results = self.validate()
                metric = None if results is None else results["segmentation"]["miou"]
                self._save(consumed, metric)
            elif checkpoint_every > 0 and self.step % checkpoint_every == 0:
                self._save(consumed)
        progress.close()
        return self._summary(results)

    def _summary(self, results: dict[str, dict] | None) -> dict[str, Any]:
        summary: dict[str, Any] = {"run_dir": str(self.run_dir), "checkpoint": str(self.checkpoints.last_path),
                                   "log_file": str(self.run_dir / "train.log"), "iterations": self.step}
        if results is not None:
            summary.update({
                "cls_f1": results["classification"]["f1"],
                "cam_miou": results["cam"]["miou"],
                "propagated_miou": results["propagated"]["miou"],
                "segmentation_miou": results["segmentation"]["miou"],
            })
        return summary


def train(cfg: DictConfig) -> dict[str, Any]:
    """Validate ``cfg``, run AFA training, and return the final summary (rank 0's view)."""
    validate_config(cfg)
    if cfg.method.name == "psa":  # the two-stage mode: its stages, each on its own run context
        from afa.engine.psa import run_psa

        return run_psa(cfg)
    with RunContext(cfg, resume=cfg.train.resume, job="train") as run:
        return AFATrainer(cfg, run).fit()

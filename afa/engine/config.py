"""Check a composed training config before any work starts.

Hydra already rejects unknown keys (the composed config is in struct mode); this module
rejects bad values, each with a message that names the key, the value and the fix.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

from afa.models.mit import MIT_VARIANTS


class ConfigError(ValueError):
    """A config value that cannot work."""


def _get(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=True)
    except MissingMandatoryValue:
        raise ConfigError(f"{key} is required but not set: pass {key}=… on the command line") from None
    except InterpolationToMissingValueError as error:
        raise ConfigError(f"{key} refers to a value that is not set ({error.msg}): set it on the command line") from None


def _integer(cfg: DictConfig, key: str, minimum: int = 0) -> int:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer ≥ {minimum}, got {value!r}")
    return value


def _number(cfg: DictConfig, key: str, low: float | None = None, high: float | None = None, open_low: bool = False) -> float:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if low is not None and (value < low or (open_low and value == low)):
        raise ConfigError(f"{key} must be {'>' if open_low else '≥'} {low}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"{key} must be ≤ {high}, got {value!r}")
    return float(value)


def _boolean(cfg: DictConfig, key: str) -> bool:
    value = _get(cfg, key)
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def _choice(cfg: DictConfig, key: str, choices: list[Any]) -> Any:
    value = _get(cfg, key)
    if value not in choices:
        raise ConfigError(f"{key} must be one of {choices}, got {value!r}")
    return value


def _number_list(cfg: DictConfig, key: str, positive: bool = True) -> list[float]:
    value = _get(cfg, key)
    if not isinstance(value, (list, ListConfig)) or not value:
        raise ConfigError(f"{key} must be a non-empty list, got {value!r}")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (int, float)) or (positive and item <= 0):
            raise ConfigError(f"{key} must hold positive numbers, got {list(value)!r}")
    return [float(item) for item in value]


def _check_model(cfg: DictConfig) -> None:
    _choice(cfg, "model.backbone", sorted(MIT_VARIANTS))
    _choice(cfg, "model.pooling", ["gmp", "gap"])
    _integer(cfg, "model.decoder_dim", 1)
    _number(cfg, "model.drop_path_rate", 0.0, 1.0)
    strides = _number_list(cfg, "model.strides")
    if len(strides) != 4 or any(s != int(s) for s in strides):
        raise ConfigError(f"model.strides must be four integers, got {strides}")
    pretrained = _get(cfg, "model.pretrained")
    if pretrained is not None and not Path(str(pretrained)).expanduser().exists():
        raise ConfigError(
            f"model.pretrained={pretrained} does not exist: give the local path of the weights "
            "(e.g. SegFormer's mit_b1.pth, or a Hugging Face save_pretrained folder); nothing is downloaded"
        )
    if _boolean(cfg, "model.pretrained_decoder") and pretrained is None:
        raise ConfigError(
            "model.pretrained_decoder=true needs model.pretrained (a Hugging Face "
            "SegformerForSemanticSegmentation checkpoint): set it, or model.pretrained_decoder=false"
        )


def _check_method(cfg: DictConfig) -> None:
    if _choice(cfg, "method.name", ["afa", "psa"]) == "psa":
        _check_psa_method(cfg)
        return
    cam_iters = _integer(cfg, "method.cam_iters")
    switch_iters = _integer(cfg, "method.switch_iters")
    if switch_iters < cam_iters:
        raise ConfigError(f"method.switch_iters ({switch_iters}) must be ≥ method.cam_iters ({cam_iters})")
    _number_list(cfg, "method.cam.scales")
    low = _number(cfg, "method.cam.low_thre", 0.0, 1.0)
    high = _number(cfg, "method.cam.high_thre", 0.0, 1.0)
    _number(cfg, "method.cam.bkg_score", 0.0, 1.0)
    if not low < high:
        raise ConfigError(f"method.cam.low_thre ({low}) must be below method.cam.high_thre ({high})")
    dilations = _number_list(cfg, "method.par.dilations")
    if any(d != int(d) for d in dilations):
        raise ConfigError(f"method.par.dilations must be positive integers, got {dilations}")
    _integer(cfg, "method.par.num_iterations", 0)  # 0: PAR off (the w/o-PAR ablation)
    _number(cfg, "method.par.w1", 0.0, open_low=True)
    _number(cfg, "method.par.w2", 0.0)
    _integer(cfg, "method.affinity.radius", 1)
    _choice(cfg, "method.inactive_losses", ["zero", "skip"])
    _boolean(cfg, "method.cam.reference_mode")
    if _get(cfg, "method.affinity_from_propagated_after") is not None:
        _integer(cfg, "method.affinity_from_propagated_after", cam_iters)
    _number(cfg, "method.affinity.propagation_bkg_score", 0.0, 1.0)
    _number(cfg, "method.loss.seg_weight", 0.0)
    _number(cfg, "method.loss.aff_weight", 0.0)


def _check_train(cfg: DictConfig) -> None:
    _integer(cfg, "train.max_iters", 1)
    _integer(cfg, "train.batch_size", 1)
    _integer(cfg, "train.num_workers", 0)
    for key in ("eval_every", "checkpoint_every", "log_every", "image_log_every"):
        _integer(cfg, f"train.{key}", 0)
    _integer(cfg, "train.keep_last", 1)
    _boolean(cfg, "train.amp")
    _boolean(cfg, "train.compile")
    _choice(cfg, "train.backend", [None, "nccl", "gloo"])
    resume = _get(cfg, "train.resume")
    if resume not in (None, "auto") and not Path(str(resume)).expanduser().is_file():
        raise ConfigError(f"train.resume={resume} is not a file: pass a checkpoint path, 'auto' or null")
    _number(cfg, "optimizer.lr", 0.0, open_low=True)
    _number(cfg, "optimizer.weight_decay", 0.0)
    betas = _number_list(cfg, "optimizer.betas", positive=False)
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), got {betas}")
    _number(cfg, "optimizer.eps", 0.0, open_low=True)
    _integer(cfg, "optimizer.warmup_iters", 0)
    _number(cfg, "optimizer.warmup_ratio", 0.0, 1.0)
    _number(cfg, "optimizer.power", 0.0)
    _integer(cfg, "eval.batch_size", 1)
    _integer(cfg, "eval.num_workers", 0)
    if _get(cfg, "eval.max_images") is not None:
        _integer(cfg, "eval.max_images", 1)


def _check_dataset(cfg: DictConfig) -> None:
    for key in cfg.dataset:  # top-level values (root, …) first: they name what to set
        if key not in ("train", "val"):
            _get(cfg, f"dataset.{key}")
    for part in ("train", "val"):
        node = _get(cfg, f"dataset.{part}")
        if node is None and part == "val":
            continue
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ConfigError(f"dataset.{part} must be a dataset config with a _target_, got {node!r}")
        _require_set(cfg, f"dataset.{part}")  # every mandatory value (root, …) must be set


def _require_set(cfg: DictConfig, key: str) -> None:
    """Raise on the first unset value under ``key``, nested nodes (a dataset's index) included."""
    value = _get(cfg, key)
    if isinstance(value, DictConfig):
        for sub in value:
            _require_set(cfg, f"{key}.{sub}")


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` on the first value that cannot work.

    Args:
        cfg: the composed training config (see ``conf/config.yaml``).
    """
    device = _get(cfg, "device")
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    _integer(cfg, "seed")
    _check_dataset(cfg)
    _check_model(cfg)
    _check_method(cfg)
    _check_train(cfg)
    _choice(cfg, "logger.name", ["wandb", "none"])


def _check_psa_method(cfg: DictConfig) -> None:
    _choice(cfg, "method.stage", ["all", "cam", "aff", "rw", "seg"])
    for stage in ("cam", "aff", "seg"):
        _integer(cfg, f"method.{stage}.max_iters", 1)
        _integer(cfg, f"method.{stage}.batch_size", 1)
    _number_list(cfg, "method.cam.scales")
    _choice(cfg, "method.cam.pooling", ["gap", "gmp"])
    _choice(cfg, "method.cam.crf", ["auto", True, False])
    crop = _integer(cfg, "method.aff.crop_size", 8)
    if crop % 8:
        raise ConfigError(f"method.aff.crop_size={crop} must be a multiple of 8 (the affinity grid's stride)")
    _integer(cfg, "method.aff.radius", 1)
    _number(cfg, "method.aff.lr", 0.0, open_low=True)
    _integer(cfg, "method.rw.logt", 0)
    _number(cfg, "method.rw.beta", 0.0, open_low=True)

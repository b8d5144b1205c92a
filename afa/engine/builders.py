"""The one place that turns config nodes into objects (datasets, network, optimiser)."""
from __future__ import annotations

import re
from typing import Any

import hydra.utils
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from afa.engine.config import ConfigError
from afa.engine.optim import build_optimizer
from afa.models.network import AFANetwork, build_afa_network
from afa.models.psa import PSA_FEATURE_CHANNELS, PSA_STAGE_CHANNELS, AffinityNet, build_affinity_net


def build_dataset(node: DictConfig, key: str) -> Dataset:
    """Instantiate a dataset node (``_target_`` + keyword arguments, nested ``_target_``
    nodes such as its ``index`` first). Nothing is generated: see :func:`prepare_datasets`.

    Raises:
        ConfigError: an argument the dataset class (or a nested node's target) does not take.
    """
    try:
        return hydra.utils.instantiate(node, _convert_="all")
    except hydra.errors.InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, TypeError) and "argument" in str(cause):
            where, target = _failing_node(node, key, str(error))
            raise ConfigError(f"{where}: {cause} (check the keys under {where} against {target})") from error
        raise cause if cause is not None else error


def _failing_node(node: DictConfig, key: str, message: str) -> tuple[str, str]:
    """The key and ``_target_`` of the (possibly nested) node hydra's ``message`` names."""
    match = re.search(r"^full_key: (\S+)$", message, re.MULTILINE)
    where = match.group(1) if match else key
    if where.startswith(key):  # a full key from the config's root
        relative = where[len(key):].lstrip(".")
    else:  # a node built on its own: keys start below it
        relative, where = where, f"{key}.{where}"
    failing = OmegaConf.select(node, relative) if relative else node
    if not isinstance(failing, DictConfig) or "_target_" not in failing:
        return key, node._target_
    return where, failing._target_


def prepare_datasets(*datasets: Dataset | None) -> None:
    """Call ``prepare()`` on each dataset given (None and datasets without one are skipped):
    writes what they need, such as the synthetic benchmark's cache. Idempotent; run it in
    one process (rank 0) before the others use the datasets."""
    for dataset in datasets:
        prepare = getattr(dataset, "prepare", None)
        if prepare is not None:
            prepare()


def build_datasets(dataset: DictConfig) -> tuple[Dataset, Dataset | None]:
    """Train and validation datasets of ``cfg.dataset`` (validation may be null), not yet
    prepared: call :func:`prepare_datasets` (on rank 0, then a barrier) before using them."""
    train = build_dataset(dataset.train, "dataset.train")
    val = build_dataset(dataset.val, "dataset.val") if dataset.get("val") is not None else None
    if val is not None and getattr(val, "num_classes", None) != train.num_classes:
        raise ConfigError(
            f"dataset.train has {train.num_classes} classes but dataset.val has {val.num_classes}: "
            "they must share one class list"
        )
    return train, val


def build_network(model: DictConfig, num_classes: int) -> AFANetwork:
    """The AFA network of ``cfg.model`` for ``num_classes`` foreground classes (on the CPU;
    the run context places it and converts its BatchNorm for multi-GPU runs)."""
    return build_afa_network(
        backbone=model.backbone,
        num_classes=num_classes,
        pooling=model.pooling,
        decoder_dim=model.decoder_dim,
        drop_path_rate=model.drop_path_rate,
        strides=tuple(int(s) for s in model.strides),
        pretrained=model.pretrained,
        pretrained_decoder=bool(model.get("pretrained_decoder", False)),
    )


def build_affinity_network(
    model: DictConfig, stage_channels: tuple[int, ...] = PSA_STAGE_CHANNELS, out_channels: int = PSA_FEATURE_CHANNELS,
) -> AffinityNet:
    """PSA's AffinityNet (PSA.md §4) on the backbone of ``cfg.model`` (its backbone, strides,
    drop path and pretrained encoder weights), on the CPU like :func:`build_network`."""
    return build_affinity_net(
        backbone=model.backbone,
        stage_channels=tuple(int(c) for c in stage_channels),
        out_channels=int(out_channels),
        drop_path_rate=model.drop_path_rate,
        strides=tuple(int(s) for s in model.strides),
        pretrained=model.pretrained,
    )


def build_optimizer_from_config(network: AFANetwork, optimizer: DictConfig, max_iters: int) -> tuple[Any, Any]:
    """AdamW + poly-warmup schedule of ``cfg.optimizer`` (AFA.md §2)."""
    options: dict[str, Any] = OmegaConf.to_container(optimizer, resolve=True)  # type: ignore[assignment]
    options["betas"] = tuple(options["betas"])
    return build_optimizer(network, max_iters=max_iters, **options)

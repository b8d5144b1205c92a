"""The one place that turns config nodes into objects (datasets, network, optimiser)."""
from __future__ import annotations

from typing import Any

import hydra.utils
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from afa.engine.config import ConfigError
from afa.engine.optim import build_optimizer
from afa.models.network import AFANetwork, build_afa_network


def build_dataset(node: DictConfig, key: str) -> Dataset:
    """Instantiate a dataset node (``_target_`` + keyword arguments).

    Raises:
        ConfigError: an argument the dataset class does not take.
    """
    try:
        return hydra.utils.instantiate(node, _convert_="all")
    except hydra.errors.InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, TypeError) and "argument" in str(cause):
            raise ConfigError(f"{key}: {cause} (check the keys under {key} against {node._target_})") from error
        raise cause if cause is not None else error


def build_datasets(dataset: DictConfig) -> tuple[Dataset, Dataset | None]:
    """Train and validation datasets of ``cfg.dataset`` (validation may be null)."""
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


def build_optimizer_from_config(network: AFANetwork, optimizer: DictConfig, max_iters: int) -> tuple[Any, Any]:
    """AdamW + poly-warmup schedule of ``cfg.optimizer`` (AFA.md §2)."""
    options: dict[str, Any] = OmegaConf.to_container(optimizer, resolve=True)  # type: ignore[assignment]
    options["betas"] = tuple(options["betas"])
    return build_optimizer(network, max_iters=max_iters, **options)

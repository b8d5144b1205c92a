"""Experiment loggers (wandb or none), console/file logging and a progress reporter.

Only rank 0 gets a real experiment logger; the others get :class:`NullLogger`, so the
trainer calls ``logger.log_*`` unconditionally. wandb is imported inside
:class:`WandbLogger` only: runs with ``logger=none`` never import it. Without an API key
wandb runs offline, so a run never waits on the network; ``wandb sync`` uploads it later.
"""
from __future__ import annotations

import logging
import netrc
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
from tqdm import tqdm

WANDB_MODES = ("online", "offline", "disabled")
_WANDB_MODE_ALIASES = {"run": "online", "dryrun": "offline"}  # older spellings wandb still accepts
_DEFAULT_WANDB_HOST = "https://api.wandb.ai"

# An image, a list of images, or a list of (image, caption); images are uint8 (H, W, 3) or (H, W).
ImageValue = Any


class Logger:
    """Experiment logger interface; every method is a no-op here."""

    run_id: str | None = None

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """Logs numbers (floats, ints or 0-d tensors) at ``step``."""

    def log_images(self, images: Mapping[str, ImageValue], step: int) -> None:
        """Logs uint8 images: name → image, list of images, or list of (image, caption)."""

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        """Logs a table, e.g. per-class IoU rows ``[index, class, iou]``."""

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Adds (or updates) run configuration values."""

    def finish(self) -> None:
        """Flushes and closes the run."""

    def __enter__(self) -> Logger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.finish()


class NullLogger(Logger):
    """Logs nothing: ``logger=none`` and every rank but 0."""


def _netrc_has_key(path: Path, host: str) -> bool:
    """Whether ``path`` is a netrc file with a password for ``host``; unreadable counts as no."""
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return entry is not None and bool(entry[2])


def has_wandb_api_key(environ: Mapping[str, str] | None = None) -> bool:
    """Whether wandb could authenticate: ``WANDB_API_KEY`` or a netrc entry for its host.

    Args:
        environ: Environment to read (``os.environ`` by default). ``NETRC`` overrides
            ``~/.netrc``; ``WANDB_BASE_URL`` names the host of a self-hosted server.
    """
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(environ.get("WANDB_BASE_URL") or _DEFAULT_WANDB_HOST).hostname or ""
    netrc_path = Path(environ["NETRC"]) if environ.get("NETRC") else Path.home() / ".netrc"
    return _netrc_has_key(netrc_path, host)


def _normalise_mode(mode: str, source: str) -> str:
    """Validates a wandb mode string, mapping old aliases."""
    mode = _WANDB_MODE_ALIASES.get(mode.strip().lower(), mode.strip().lower())
    if mode not in WANDB_MODES:
        raise ValueError(f"{source}={mode!r} is not a wandb mode; use one of {', '.join(WANDB_MODES)}")
    return mode


def resolve_wandb_mode(mode: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """Picks the wandb mode: explicit ``mode``, else ``WANDB_MODE``, else by API key.

    Args:
        mode: "online", "offline" or "disabled" from the config; None decides automatically.
        environ: Environment to read (``os.environ`` by default).

    Returns:
        "online" when an API key is configured and nothing says otherwise, "offline" when
        none is (so the run never blocks on login or the network), or the override.
    """
    environ = os.environ if environ is None else environ
    if mode:
        return _normalise_mode(mode, "logger mode")
    if environ.get("WANDB_MODE"):
        return _normalise_mode(environ["WANDB_MODE"], "WANDB_MODE")
    if environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return "disabled"
    return "online" if has_wandb_api_key(environ) else "offline"


def _as_uint8_image(image: Any, name: str) -> np.ndarray:
    """A host uint8 (H, W, 3) or (H, W) numpy array, or an error naming the entry."""
    if hasattr(image, "detach"):  # torch tensor, without importing torch here
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 3):
        raise ValueError(
            f"image {name!r} must be uint8 (H, W, 3) or (H, W), got {image.dtype} {image.shape}; "
            "use afa.viz (colorize_labels, denormalize_image, cam_overlay) to make one"
        )
    return image


class WandbLogger(Logger):
    """Logs to Weights & Biases, with files under ``run_dir/wandb``.

    Args:
        project: wandb project.
        run_dir: The run's output directory (created if missing).
        name: Display name of the run.
        config: Resolved configuration as plain containers.
        mode: "online", "offline", "disabled" or None (see :func:`resolve_wandb_mode`).
        entity: wandb team or user; the account default if None.
        group: Optional group, e.g. an experiment name.
        tags: Optional tags.
        run_id: Id of an earlier run to continue (stored in checkpoints as ``wandb_run_id``).
        job_type: "train", "eval" or a PSA stage, so the wandb UI can group them.
    """

    def __init__(
        self,
        project: str,
        run_dir: str | os.PathLike,
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        mode: str | None = None,
        entity: str | None = None,
        group: str | None = None,
        tags: Sequence[str] | None = None,
        run_id: str | None = None,
        job_type: str | None = None,
    ) -> None:
        import wandb  # lazily: only runs that log to wandb pay for (and need) it

        self._wandb = wandb
        self.mode = resolve_wandb_mode(mode)
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project=project,
            name=name,
            dir=str(run_dir),
            config=dict(config or {}),
            mode=self.mode,
            entity=entity,
            group=group,
            tags=list(tags) if tags else None,
            id=run_id,
            resume="allow" if run_id else None,
            job_type=job_type,
        )
        self.run_id = self._run.id
        self._finished = False

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        # float() also reads 0-d tensors back; logging happens every few hundred steps only.
        self._run.log({key: float(value) for key, value in scalars.items()}, step=step)

    def log_images(self, images: Mapping[str, ImageValue], step: int) -> None:
        payload = {}
        for key, value in images.items():
            if isinstance(value, (list, tuple)):
                payload[key] = [self._image(item, key) for item in value]
            else:
                payload[key] = self._image(value, key)
        self._run.log(payload, step=step)

    def _image(self, item: Any, key: str) -> Any:
        """A wandb.Image from an array or an (array, caption) pair."""
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], str):
            return self._wandb.Image(_as_uint8_image(item[0], key), caption=item[1])
        return self._wandb.Image(_as_uint8_image(item, key))

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        table = self._wandb.Table(columns=list(columns), data=[list(row) for row in rows])
        self._run.log({name: table}, step=step)

    def log_config(self, config: Mapping[str, Any]) -> None:
        self._run.config.update(dict(config), allow_val_change=True)

    def finish(self) -> None:
        if not self._finished:
            self._finished = True
            self._run.finish()


LOGGERS = ("wandb", "none")


def build_logger(name: str | None, /, rank: int = 0, **kwargs: Any) -> Logger:
    """The experiment logger for this process: ``name``'s on rank 0, a no-op elsewhere.

    Args:
        name: "wandb" or "none" (None means "none"); positional, so ``kwargs`` may hold
            the run's ``name``.
        rank: Global rank; only rank 0 logs.
        **kwargs: Arguments of the chosen logger (see :class:`WandbLogger`).
    """
    if name not in (*LOGGERS, None):
        raise ValueError(f"logger={name!r} is unknown; use one of {', '.join(LOGGERS)}")
    if rank != 0 or name in (None, "none"):
        return NullLogger()
    return WandbLogger(**kwargs)


class _TqdmHandler(logging.StreamHandler):
    """Writes records through tqdm so an active progress bar is redrawn below them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging must never take the run down
            self.handleError(record)


_FORMAT = "%(asctime)s | %(levelname)s | %(message)s"
_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def setup_console_logging(
    run_dir: str | os.PathLike | None,
    rank: int = 0,
    level: int = logging.INFO,
    name: str = "afa",
    file_name: str = "train.log",
) -> logging.Logger:
    """Configures the package logger: console for everyone, ``run_dir/<file_name>`` on rank 0.

    Other ranks print warnings and errors only, tagged with their rank. Calling again
    replaces the handlers this function added before (no duplicated lines). Modules log
    with ``logging.getLogger(__name__)`` and reach these handlers through ``afa``.

    Args:
        run_dir: Directory for the log file; None for console only.
        rank: Global rank of this process.
        level: Level for rank 0.
        name: Logger to configure.
        file_name: The log file's name (``train.log``, ``eval.log``, a PSA stage's).

    Returns:
        The configured logger.
    """
    logger = logging.getLogger(name)
    for handler in [h for h in logger.handlers if getattr(h, "_afa_handler", False)]:
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(level if rank == 0 else logging.WARNING)
    logger.propagate = False  # hydra's root handlers would print every line twice
    prefix = "" if rank == 0 else f"[rank {rank}] "
    console = _TqdmHandler(sys.stdout)
    console.setFormatter(logging.Formatter(prefix + _FORMAT, _DATE_FORMAT))
    handlers: list[logging.Handler] = [console]
    if rank == 0 and run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(Path(run_dir) / file_name, mode="a", encoding="utf-8")
        file_handler.setFormatter(logging.Formatter(_FORMAT, _DATE_FORMAT))
        handlers.append(file_handler)
    for handler in handlers:
        handler._afa_handler = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    return logger


class Progress:
    """Step counter with a tqdm bar on a TTY and periodic log lines everywhere.

    The bar shows on rank 0 when stderr is a terminal; the log lines (every ``log_every``
    steps, with it/s over the last window and the ETA from the average since the start)
    go to ``logger`` so ``train.log`` and non-interactive jobs still see progress.

    Args:
        total: Last step.
        initial: Step to start from (after a resume).
        desc: Label of the bar and lines.
        enabled: False on ranks other than 0: no bar, no lines.
        log_every: Emit a line every this many steps; 0 never.
        logger: Where lines go; the "afa" logger by default.
        bar: Force the bar on or off; by default on when stderr is a TTY.
        unit: What a step is (``it`` for training iterations, ``img`` for evaluated images).
    """

    def __init__(
        self,
        total: int,
        initial: int = 0,
        desc: str = "train",
        enabled: bool = True,
        log_every: int = 0,
        logger: logging.Logger | None = None,
        bar: bool | None = None,
        unit: str = "it",
    ) -> None:
        self.total = total
        self.unit = unit
        self.n = initial
        self.desc = desc
        self.enabled = enabled
        self.log_every = log_every
        self.logger = logger or logging.getLogger("afa")
        show_bar = enabled and (sys.stderr.isatty() if bar is None else bar)
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                         disable=not show_bar)
        self._start = (time.perf_counter(), initial)
        self._window = self._start

    def update(self, n: int = 1, **postfix: float) -> None:
        """Advances by ``n`` steps; ``postfix`` values (e.g. loss) go on the bar and lines."""
        previous = self.n
        self.n += n
        if postfix:
            self._bar.set_postfix({key: f"{float(value):.4g}" for key, value in postfix.items()}, refresh=False)
        self._bar.update(n)
        if self.enabled and self.log_every and self.n // self.log_every > previous // self.log_every:
            self.logger.info(self.summary(**postfix))

    @property
    def rate(self) -> float:
        """Steps per second since the last line (or the start)."""
        started, steps = self._window
        elapsed = time.perf_counter() - started
        return (self.n - steps) / elapsed if elapsed > 0 else 0.0

    @property
    def eta_seconds(self) -> float:
        """Seconds left at the average speed since the start (evaluation pauses included)."""
        started, steps = self._start
        done = self.n - steps
        return (self.total - self.n) * (time.perf_counter() - started) / done if done > 0 else float("nan")

    def summary(self, **postfix: float) -> str:
        """One line: ``desc step/total (pct) | <unit>/s | elapsed | ETA | key=value ...``; starts a new window."""
        eta = self.eta_seconds
        parts = [
            f"{self.desc} {self.n}/{self.total} ({100.0 * self.n / max(self.total, 1):.1f}%)",
            f"{self.rate:.2f} {self.unit}/s",
            f"elapsed {tqdm.format_interval(time.perf_counter() - self._start[0])}",
            f"ETA {tqdm.format_interval(eta) if eta == eta else '?'}",
        ]
        parts += [f"{key}={float(value):.4g}" for key, value in postfix.items()]
        self._window = (time.perf_counter(), self.n)
        return " | ".join(parts)

    def close(self) -> None:
        """Closes the bar."""
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

"""Dense CRF post-processing of segmentation logits (AFA.md §10), spread over CPU workers.

Optional: it needs ``pydensecrf2`` (``pip install -r requirements-crf.txt``), imported only
when a CRF runs. Workers receive the fused logits at their own (1/4) resolution, not the
full-resolution probabilities, so a COCO image (81 classes) costs kilobytes to send.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

CRF_INSTALL = "pip install -r requirements-crf.txt"


class CRFUnavailableError(ImportError):
    """pydensecrf2 is not installed."""


@dataclass(frozen=True)
class CRFOptions:
    """AFA.md §10: 10 mean-field iterations, Gaussian (sxy 3, compat 3), bilateral (sxy 64, srgb 5, compat 4)."""

    iterations: int = 10
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 64.0
    bilateral_srgb: float = 5.0
    bilateral_compat: float = 4.0


def require_crf() -> None:
    """Raises :class:`CRFUnavailableError` with the install command when pydensecrf2 is missing."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError as error:
        raise CRFUnavailableError(
            f"crf=true needs pydensecrf2, which is not installed: run `{CRF_INSTALL}` (builds in about a minute)"
        ) from error


def dense_crf(image: np.ndarray, probabilities: np.ndarray, options: CRFOptions = CRFOptions()) -> np.ndarray:
    """Mean-field inference of a fully connected CRF.

    Args:
        image: (H, W, 3) uint8 RGB.
        probabilities: (K, H, W) float32 softmax scores.

    Returns:
        (K, H, W) float32 refined marginals.
    """
    import pydensecrf.densecrf as densecrf
    from pydensecrf.utils import unary_from_softmax

    classes, height, width = probabilities.shape
    crf = densecrf.DenseCRF2D(width, height, classes)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probabilities)))
    crf.addPairwiseGaussian(sxy=options.gaussian_sxy, compat=options.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=options.bilateral_sxy, srgb=options.bilateral_srgb, rgbim=np.ascontiguousarray(image),
        compat=options.bilateral_compat,
    )
    return np.asarray(crf.inference(options.iterations), np.float32).reshape(classes, height, width)


def crf_label(image: np.ndarray, logits: np.ndarray, options: CRFOptions = CRFOptions()) -> np.ndarray:
    """The CRF label of one image from its fused logits (AFA.md §10).

    Args:
        image: (H, W, 3) uint8 RGB at the label size.
        logits: (K, h, w) float32 fused logits at any resolution.

    Returns:
        (H, W) uint8: argmax of the CRF marginals of softmax(bilinear upsampling of the logits).
    """
    height, width = image.shape[:2]
    scores = F.interpolate(torch.from_numpy(logits)[None], size=(height, width), mode="bilinear", align_corners=False)
    probabilities = torch.softmax(scores, dim=1)[0].numpy()
    return dense_crf(image, probabilities, options).argmax(axis=0).astype(np.uint8)


def _worker_init() -> None:
    torch.set_num_threads(1)  # one CRF per core; safe here: the worker starts fresh, not forked


class CRFPool:
    """Runs a per-image CRF job on worker processes while the caller keeps the device busy.

    ``submit`` queues an image; ``completed`` yields finished (key, result) pairs without
    waiting, ``drain`` waits for the rest. At most ``2 × workers`` images are in flight, so
    memory stays bounded however long the split. ``workers=0`` runs inline. Keys stay in
    this process; only the image, its array and the options travel.

    Args:
        workers: processes (0: in this process).
        options: the CRF's parameters.
        job: ``job(image, array, options)``, a module-level function (workers import it):
            :func:`crf_label` (fused logits → label) by default.
    """

    def __init__(self, workers: int, options: CRFOptions = CRFOptions(),
                 job: Callable[[np.ndarray, np.ndarray, CRFOptions], np.ndarray] | None = None) -> None:
        require_crf()
        from afa.data.loaders import worker_context

        self.options, self.job = options, job or crf_label
        self._pending: deque[tuple[Any, Future]] = deque()
        self._limit = max(1, 2 * workers)
        self._executor = (
            ProcessPoolExecutor(workers, mp_context=worker_context(), initializer=_worker_init) if workers > 0 else None
        )

    def submit(self, key: Any, image: np.ndarray, array: np.ndarray) -> Iterator[tuple[Any, np.ndarray]]:
        """Queues one image; yields the results that had to finish to make room."""
        if self._executor is None:
            yield key, self.job(image, array, self.options)
            return
        while len(self._pending) >= self._limit:
            done_key, future = self._pending.popleft()
            yield done_key, future.result()
        self._pending.append((key, self._executor.submit(self.job, image, array, self.options)))

    def completed(self) -> Iterator[tuple[Any, np.ndarray]]:
        """Finished results at the head of the queue, in submission order, without waiting."""
        while self._pending and self._pending[0][1].done():
            key, future = self._pending.popleft()
            yield key, future.result()

    def drain(self) -> Iterator[tuple[Any, np.ndarray]]:
        """Every remaining result, waiting for each."""
        while self._pending:
            key, future = self._pending.popleft()
            yield key, future.result()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(cancel_futures=True)

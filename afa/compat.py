"""Make ``timm`` importable when torchvision's compiled ops cannot load.

The PyPI torchvision wheel is a CUDA build. With a CPU-only torch its ``_C`` library
fails to load, and torchvision's fake-kernel registrations then raise
``operator torchvision::nms does not exist`` at import, which breaks ``import timm``.
Defining the two op schemas that torchvision registers fakes for lets it import; the
ops themselves stay unavailable, and nothing here uses them.

Everything in the package imports timm through :func:`import_timm`.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

_MISSING_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_schema_library: torch.library.Library | None = None


def _torchvision_ops_load() -> bool:
    """Whether torchvision's compiled op library loads with this torch (no torchvision import)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True  # not installed: nothing to patch, timm's own import error will say so
    libraries = sorted(Path(spec.origin).parent.glob("_C*.so")) + sorted(
        Path(spec.origin).parent.glob("_C*.pyd")
    )
    if not libraries:
        return False
    try:
        torch.ops.load_library(str(libraries[0]))
    except (OSError, RuntimeError):
        return False
    return True


def define_missing_torchvision_schemas() -> bool:
    """Define ``torchvision::nms``/``qnms`` schemas if the compiled library cannot load.

    Returns:
        True when schemas were defined (the CPU-torch + CUDA-torchvision case).
    """
    global _schema_library
    if _schema_library is not None or "torchvision" in sys.modules:
        return _schema_library is not None
    if _torchvision_ops_load():
        return False
    _schema_library = torch.library.Library("torchvision", "DEF")
    for schema in _MISSING_SCHEMAS.values():
        _schema_library.define(schema)
    return True


def import_timm() -> ModuleType:
    """Import and return ``timm``, patching torchvision first when needed."""
    define_missing_torchvision_schemas()
    import timm

    return timm

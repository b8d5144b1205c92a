"""Load weights from local files: SegFormer/HF MiT encoders and reference-AFA networks.

One pure filter per source turns a foreign state dict into this package's key layout
(AFA.md §1, §2); loading is then strict, and a mismatch names the file and the keys.
Nothing is downloaded.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

StateDict = dict[str, Tensor]

_HF_PREFIX = re.compile(r"^(segformer\.)?encoder\.")
_HF_RENAMES = [  # (pattern on the HF key after the "encoder." prefix, replacement)
    (re.compile(r"^patch_embeddings\.(\d)\.proj\."), lambda m: f"patch_embed{int(m[1]) + 1}.proj."),
    (re.compile(r"^patch_embeddings\.(\d)\.layer_norm\."), lambda m: f"patch_embed{int(m[1]) + 1}.norm."),
    (re.compile(r"^layer_norm\.(\d)\."), lambda m: f"norm{int(m[1]) + 1}."),
    (re.compile(r"^block\.(\d)\.(\d+)\."), lambda m: f"block{int(m[1]) + 1}.{m[2]}."),
]
_HF_BLOCK_RENAMES = {
    "layer_norm_1.": "norm1.",
    "layer_norm_2.": "norm2.",
    "attention.self.query.": "attn.q.",
    "attention.self.sr.": "attn.sr.",
    "attention.self.layer_norm.": "attn.norm.",
    "attention.output.dense.": "attn.proj.",
    "mlp.dense1.": "mlp.fc1.",
    "mlp.dense2.": "mlp.fc2.",
}


class CheckpointError(RuntimeError):
    """A weights file that cannot be read or does not match the model."""


def read_state_dict(path: str | Path) -> StateDict:
    """Read a tensor dict from ``.pth``/``.pt``/``.bin`` or ``.safetensors``, unwrapping
    the usual containers (``state_dict``, ``model``).

    Raises:
        CheckpointError: missing or unreadable file, naming it.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist: check the path (no weights are downloaded)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated/corrupt files
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(error).__name__}: {error}); re-copy or re-download it"
        ) from error
    for container in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(container), Mapping):
            state = state[container]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return dict(state)


def _strip_prefix(state: StateDict, prefix: str) -> StateDict:
    if state and all(key.startswith(prefix) for key in state):
        return {key[len(prefix):]: value for key, value in state.items()}
    return state


def is_hf_segformer(state: Mapping[str, Tensor]) -> bool:
    """Whether a state dict uses the Hugging Face ``SegformerModel`` key layout."""
    return any(_HF_PREFIX.match(key) and ".patch_embeddings." in f".{key}" for key in state)


def hf_segformer_to_mit(state: StateDict) -> StateDict:
    """Remap Hugging Face ``SegformerModel`` encoder keys to the SegFormer-release layout.

    Key and value projections, separate in HF, are concatenated into ``attn.kv`` (keys
    first, as the release's ``kv`` is split). Non-encoder keys (decode head, classifier)
    are dropped.
    """
    remapped: StateDict = {}
    for key, value in state.items():
        match = _HF_PREFIX.match(key)
        if not match:
            continue
        name = key[match.end():]
        for pattern, replacement in _HF_RENAMES:
            name = pattern.sub(replacement, name, count=1)
        for old, new in _HF_BLOCK_RENAMES.items():
            name = name.replace(old, new)
        remapped[name] = value
    for key in [k for k in remapped if ".attention.self.key." in k]:
        prefix, suffix = key.split(".attention.self.key.")
        value_key = f"{prefix}.attention.self.value.{suffix}"
        if value_key not in remapped:
            raise CheckpointError(f"HF checkpoint has {key} but no {value_key}")
        remapped[f"{prefix}.attn.kv.{suffix}"] = torch.cat([remapped.pop(key), remapped.pop(value_key)], dim=0)
    return remapped


def mit_filter_fn(state: StateDict) -> StateDict:
    """Any supported encoder checkpoint → MiT keys: SegFormer release (``head.*`` dropped)
    or Hugging Face Segformer."""
    state = _strip_prefix(state, "module.")
    if is_hf_segformer(state):
        return hf_segformer_to_mit(state)
    return {key: value for key, value in state.items() if not key.startswith("head.")}


def afa_reference_filter_fn(state: StateDict) -> StateDict:
    """A reference-AFA network checkpoint (DDP ``module.`` prefix) → this network's keys."""
    return _strip_prefix(state, "module.")


def load_strict(module: nn.Module, state: StateDict, source: str | Path) -> None:
    """``load_state_dict(strict=True)`` with an error naming the file and the first bad keys.

    Raises:
        CheckpointError: missing/unexpected keys or shape mismatches.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                more = f" … (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                problems.append(f"{len(keys)} {label}: {', '.join(keys[:5])}{more}")
        raise CheckpointError(
            f"{source} does not match {type(module).__name__}: " + "; ".join(problems)
            + ". Is it the right file for this model variant?"
        )
    module.load_state_dict(state, strict=True)


def load_pretrained_encoder(encoder: nn.Module, path: str | Path) -> None:
    """Load ImageNet MiT weights (SegFormer ``mit_b*.pth`` or HF Segformer) strictly."""
    load_strict(encoder, mit_filter_fn(read_state_dict(path)), path)


def load_afa_reference(network: nn.Module, path: str | Path) -> None:
    """Load a whole network saved by the reference AFA implementation, strictly."""
    load_strict(network, afa_reference_filter_fn(read_state_dict(path)), path)

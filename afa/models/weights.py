"""Load weights from local files: SegFormer/HF MiT encoders and reference-AFA networks.

One pure filter per source turns a foreign state dict into this package's key layout
(AFA.md §1, §2); loading is then strict, and a mismatch names the file and the keys.
Nothing is downloaded.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

StateDict = dict[str, Tensor]

logger = logging.getLogger("afa")

# Files a Hugging Face ``save_pretrained`` folder may hold, in order of preference.
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

# Stages layout -> classic layout: (pattern on the key, replacement). Each stage ``i``
# holds its patch embedding, blocks and norm; the classic layout groups by module kind.
_HF_STAGE_PREFIX = r"^(?P<root>segformer\.)?(?:encoder\.)?stages\.(?P<i>\d+)\."
_HF_STAGE_RENAMES = [
    (re.compile(_HF_STAGE_PREFIX + r"patch_embeddings\."), r"\g<root>encoder.patch_embeddings.\g<i>."),
    (re.compile(_HF_STAGE_PREFIX + r"(?:blocks|block|layers)\.(?P<j>\d+)\."), r"\g<root>encoder.block.\g<i>.\g<j>."),
    (re.compile(_HF_STAGE_PREFIX + r"(?:layer_norm|norm)\."), r"\g<root>encoder.layer_norm.\g<i>."),
]

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


# Hugging Face ``SegformerDecodeHead`` -> this package's ``SegFormerHead`` (the classifier,
# whose class count differs, is never loaded and is absent here).
_HF_DECODER_RENAMES = [
    (re.compile(r"^decode_head\.linear_c\.(\d+)\.proj\."), lambda m: f"linear_c{int(m[1]) + 1}.proj."),
    (re.compile(r"^decode_head\.linear_fuse\.weight$"), lambda m: "linear_fuse.conv.weight"),
    (re.compile(r"^decode_head\.batch_norm\."), lambda m: "linear_fuse.bn."),
]
_HF_DECODER_SKIPPED = re.compile(r"^decode_head\.classifier\.")


class CheckpointError(RuntimeError):
    """A weights file that cannot be read or does not match the model."""


def resolve_weights_file(path: str | Path) -> Path:
    """The weights file of ``path``: the file itself, or the weights of a Hugging Face
    ``save_pretrained`` folder (``model.safetensors``, else ``pytorch_model.bin``).

    Raises:
        CheckpointError: missing path, a folder without a single-file checkpoint (sharded
        checkpoints are not supported), or ``model.safetensors`` alone without the
        ``safetensors`` package.
    """
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"weights file {path} does not exist: check the path (no weights are downloaded)")
    present = [path / name for name in _HF_WEIGHT_FILES if (path / name).is_file()]
    if present and present[0].suffix == ".safetensors" and not _safetensors_available():
        if len(present) == 1:
            raise CheckpointError(
                f"{present[0]} needs the safetensors package to be read: pip install safetensors"
            )
        present = present[1:]
    if present:
        return present[0]
    shards = sorted(p.name for p in path.glob("*.index.json"))
    if shards:
        raise CheckpointError(
            f"folder {path} holds a sharded checkpoint ({', '.join(shards)}), which is not supported: "
            "save it as one file (save_pretrained(..., max_shard_size='100GB'))"
        )
    raise CheckpointError(f"folder {path} holds no weights file: looked for {' or '.join(_HF_WEIGHT_FILES)}")


def _safetensors_available() -> bool:
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True


def error_summary(error: BaseException) -> str:
    """``Type: first line`` of an error: torch's load errors run to several lines, a user
    error is printed as one."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def read_state_dict(path: str | Path) -> StateDict:
    """Read a tensor dict from ``.pth``/``.pt``/``.bin`` or ``.safetensors``, unwrapping
    the usual containers (``state_dict``, ``model``). A Hugging Face ``save_pretrained``
    folder is read through :func:`resolve_weights_file`.

    Raises:
        CheckpointError: missing or unreadable file, naming it.
    """
    path = resolve_weights_file(path)
    if path.suffix == ".safetensors" and not _safetensors_available():
        raise CheckpointError(f"{path} needs the safetensors package to be read: pip install safetensors")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated/corrupt files
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({error_summary(error)}); re-copy or re-download it"
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


def hf_stages_to_classic(state: StateDict) -> StateDict:
    """Rewrite a stages-style Hugging Face Segformer layout (``[segformer.][encoder.]stages.{i}.*``,
    each stage holding ``patch_embeddings``, ``blocks.{j}``/``block.{j}`` and ``layer_norm``)
    to the classic layout (``[segformer.]encoder.patch_embeddings.{i}``, ``…block.{i}.{j}``,
    ``…layer_norm.{i}``).
    Other keys, and states without ``stages.`` keys, are returned unchanged."""
    rewritten: StateDict = {}
    for key, value in state.items():
        for pattern, replacement in _HF_STAGE_RENAMES:
            new_key, count = pattern.subn(replacement, key, count=1)
            if count:
                key = new_key
                break
        if key in rewritten:
            raise CheckpointError(f"HF checkpoint holds {key} in both the stages and the classic layout")
        rewritten[key] = value
    return rewritten


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
    """Any supported encoder checkpoint → MiT keys. Recognised layouts:

    * SegFormer release (``mit_b*.pth``): ``patch_embed{n}.*``, ``block{n}.{j}.*``,
      ``norm{n}.*`` (``head.*`` dropped), already this package's keys.
    * Hugging Face Segformer, classic: ``[segformer.]encoder.patch_embeddings.{i}.*``,
      ``…encoder.block.{i}.{j}.*``, ``…encoder.layer_norm.{i}.*``.
    * Hugging Face Segformer, stages (transformers ≥ 5 style):
      ``[segformer.][encoder.]stages.{i}.patch_embeddings.*``, ``…stages.{i}.blocks.{j}.*``
      (or ``block.{j}``), ``…stages.{i}.layer_norm.*``; rewritten to the classic layout
      first (:func:`hf_stages_to_classic`), so both go through one remap.

    A DDP ``module.`` prefix is removed first. HF keys outside the encoder (decode head,
    classifier) are dropped; see :func:`hf_decode_head_to_afa` for the decode head.
    """
    state = hf_stages_to_classic(_strip_prefix(state, "module."))
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


def hf_decode_head_to_afa(state: Mapping[str, Tensor]) -> StateDict:
    """The ``decode_head.*`` tensors of a Hugging Face ``SegformerForSemanticSegmentation``
    checkpoint under ``SegFormerHead`` names, the classifier left out:

    ``decode_head.linear_c.{i}.proj.*`` → ``linear_c{i+1}.proj.*``;
    ``decode_head.linear_fuse.weight`` → ``linear_fuse.conv.weight``;
    ``decode_head.batch_norm.*`` → ``linear_fuse.bn.*``.

    Raises:
        CheckpointError: a ``decode_head`` key this mapping does not know.
    """
    remapped: StateDict = {}
    for key, value in _strip_prefix(dict(state), "module.").items():
        if not key.startswith("decode_head.") or _HF_DECODER_SKIPPED.match(key):
            continue
        for pattern, replacement in _HF_DECODER_RENAMES:
            name, count = pattern.subn(replacement, key, count=1)
            if count:
                remapped[name] = value
                break
        else:
            raise CheckpointError(f"unknown decode head key {key}: not a Hugging Face SegformerDecodeHead")
    return remapped


def load_decode_head(decoder: nn.Module, state: Mapping[str, Tensor], source: str | Path) -> None:
    """Load the HF decode head of ``state`` into a ``SegFormerHead`` (classifier excluded).

    Raises:
        CheckpointError: no decode head in ``state``, or decoder keys missing/unexpected.
        ValueError: a shape mismatch, naming the file, the key and both shapes (e.g. a
            different ``decoder_dim``).
    """
    remapped = hf_decode_head_to_afa(state)
    if not remapped:
        raise CheckpointError(
            f"{source} holds no decode_head tensors (is it a SegformerForSemanticSegmentation checkpoint?): "
            "set model.pretrained_decoder=false"
        )
    own = {k: v for k, v in decoder.state_dict().items() if not k.startswith("linear_pred.")}
    for key, value in remapped.items():
        if key in own and value.shape != own[key].shape:
            raise ValueError(
                f"{source}: decode head tensor {key} has shape {tuple(value.shape)} in the file but "
                f"{tuple(own[key].shape)} in the decoder (check model.decoder_dim)"
            )
    missing = sorted(k for k in set(own) - set(remapped) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(remapped) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} decode head does not match {type(decoder).__name__}: "
            f"missing {missing or 'none'}, unexpected {unexpected or 'none'}"
        )
    decoder.load_state_dict(remapped, strict=False)


def load_pretrained_encoder(encoder: nn.Module, path: str | Path, decoder: nn.Module | None = None) -> None:
    """Load ImageNet MiT weights strictly, from a file or a ``save_pretrained`` folder.

    The layouts recognised are listed in :func:`mit_filter_fn`. With ``decoder`` (a
    ``SegFormerHead``), the decode head of a HF ``SegformerForSemanticSegmentation``
    checkpoint is loaded into it too (:func:`load_decode_head`); without, its tensors are
    dropped and one INFO line says so.
    """
    state = read_state_dict(path)
    load_strict(encoder, mit_filter_fn(state), path)
    if decoder is not None:
        load_decode_head(decoder, state, path)
        return
    dropped = sum(1 for key in _strip_prefix(state, "module.") if key.startswith("decode_head."))
    if dropped:
        logger.info(
            "%s: dropped %d decode_head tensors (decoder not loaded); model.pretrained_decoder=true loads them",
            path, dropped,
        )


def load_afa_reference(network: nn.Module, path: str | Path) -> None:
    """Load a whole network saved by the reference AFA implementation, strictly."""
    load_strict(network, afa_reference_filter_fn(read_state_dict(path)), path)

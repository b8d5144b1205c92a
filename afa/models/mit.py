"""Mix Transformer (MiT), the SegFormer encoder, with AFA's strides and attention logits.

AFA.md §1. Module names follow the SegFormer release (``patch_embed{i}``, ``block{i}``,
``norm{i}``) so its ImageNet checkpoints load with no key renaming.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from afa.compat import import_timm

import_timm()
from timm.layers import DropPath, trunc_normal_  # noqa: E402  (after the torchvision patch)


class ImageTooSmallError(ValueError):
    """An input smaller than the encoder's smallest (its key/value reductions need a whole kernel)."""


class AttentionFactors(NamedTuple):
    """The attention of the last blocks as queries and keys: the logit maps ``q kᵀ`` are
    (n, M, N, N), so consumers that mix them linearly (AFA's affinity) never form them."""

    queries: Tensor  # (n, M, N, d_head), M = blocks × heads
    keys: Tensor  # (n, M, N, d_head)

    def logits(self) -> Tensor:
        """The unscaled, pre-softmax attention logits q kᵀ: (n, M, N, N)."""
        return self.queries @ self.keys.transpose(-2, -1)


@dataclass(frozen=True)
class MiTConfig:
    """Architecture of one MiT variant (AFA.md §1 table)."""

    embed_dims: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    mlp_ratio: int = 4


_B1_TO_B5 = dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8))
MIT_VARIANTS: dict[str, MiTConfig] = {
    # ``tiny`` is not from SegFormer: a CPU-sized model for tests and the synthetic benchmark.
    "tiny": MiTConfig(embed_dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8), depths=(1, 1, 2, 2)),
    "b0": MiTConfig(embed_dims=(32, 64, 160, 256), num_heads=(1, 2, 5, 8), depths=(2, 2, 2, 2)),
    "b1": MiTConfig(**_B1_TO_B5, depths=(2, 2, 2, 2)),
    "b2": MiTConfig(**_B1_TO_B5, depths=(3, 4, 6, 3)),
    "b3": MiTConfig(**_B1_TO_B5, depths=(3, 4, 18, 3)),
    "b4": MiTConfig(**_B1_TO_B5, depths=(3, 8, 27, 3)),
    "b5": MiTConfig(**_B1_TO_B5, depths=(3, 6, 40, 3)),
}

AFA_STRIDES = (4, 2, 2, 1)
BLOCK_NORM_EPS = 1e-6
# The SegFormer release builds the patch-embedding and spatial-reduction norms with
# nn.LayerNorm's default eps; keeping it makes released weights reproduce exactly.
EMBED_NORM_EPS = 1e-5


class OverlapPatchEmbed(nn.Module):
    """Strided conv over overlapping patches, then LayerNorm.

    Args:
        in_channels: input channels.
        embed_dim: output channels.
        kernel_size: 7 for the first stage, 3 after.
        stride: downsampling factor of this stage.
    """

    def __init__(self, in_channels: int, embed_dim: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size, stride, kernel_size // 2)
        self.norm = nn.LayerNorm(embed_dim, eps=EMBED_NORM_EPS)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        """x: (B, C_in, H, W) -> tokens (B, h*w, D), h, w."""
        x = self.proj(x)
        height, width = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), height, width


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys/values come from a spatially reduced token grid.

    Args:
        dim: token width.
        num_heads: attention heads.
        sr_ratio: kernel = stride of the key/value reduction conv (1: no reduction).
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=True)
        self.kv = nn.Linear(dim, 2 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=EMBED_NORM_EPS)

    def _keys_values(self, x: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
        batch, _, dim = x.shape
        if self.sr_ratio > 1:
            x = self.norm(_grid_conv(self.sr, x, height, width))
        # (B, M, 2, heads, d_head) -> 2 × (B, heads, M, d_head)
        kv = self.kv(x).reshape(batch, -1, 2, self.num_heads, dim // self.num_heads)
        keys, values = kv.permute(2, 0, 3, 1, 4).unbind(0)
        return keys, values

    def forward(
        self, x: Tensor, height: int, width: int, attention_images: int = 0
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Attend with the fused kernel (no N×M map is kept); optionally return q and k.

        Args:
            x: tokens (B, N, D), N = height * width.
            attention_images: also return the queries and keys of the first this-many
                images, whose product ``q kᵀ`` are the attention logits.

        Returns:
            tokens (B, N, D) and (queries (n, heads, N, d_head), keys (n, heads, M, d_head)) or None.
        """
        batch, num_tokens, dim = x.shape
        # (B, N, D) -> (B, heads, N, d_head)
        queries = self.q(x).reshape(batch, num_tokens, self.num_heads, -1).transpose(1, 2)
        keys, values = self._keys_values(x, height, width)
        attended = F.scaled_dot_product_attention(queries, keys, values)  # scaled by d_head^-½ (SDPA's default)
        # (B, heads, N, d_head) -> (B, N, D)
        attended = attended.transpose(1, 2).reshape(batch, num_tokens, dim)
        factors = (queries[:attention_images], keys[:attention_images]) if attention_images > 0 else None
        return self.proj(attended), factors


class DepthwiseConv(nn.Module):
    """3×3 depthwise conv applied to tokens laid out on their grid (MixFFN's position cue)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        """x: (B, N, D) -> (B, N, D)."""
        return _grid_conv(self.dwconv, x, height, width)


def _grid_conv(conv: nn.Conv2d, x: Tensor, height: int, width: int) -> Tensor:
    """A conv over tokens on their grid, channels-last: (B, N, D) -> (B, N', D').

    The tokens are already the channels-last layout of the grid, so neither side copies
    (a channels-first grid cost two copies of the 4×-wide MixFFN activations per block).
    """
    batch, _, dim = x.shape
    # (B, N, D) -> (B, h, w, D) -> (B, D, h, w) view with channels-last strides
    grid = x.reshape(batch, height, width, dim).permute(0, 3, 1, 2)
    # (B, D', h', w') -> (B, h', w', D') -> (B, N', D'); a view when the conv kept channels-last
    return conv(grid).permute(0, 2, 3, 1).reshape(batch, -1, conv.out_channels)


class MixFFN(nn.Module):
    """Linear(d→4d) → depthwise 3×3 → GELU → Linear(4d→d)."""

    def __init__(self, dim: int, hidden_dim: int, act_layer: Callable[[], nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = DepthwiseConv(hidden_dim)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), height, width)))


class MiTBlock(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), x + DropPath(MixFFN(LN(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, sr_ratio: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.mlp = MixFFN(dim, dim * mlp_ratio)

    def forward(
        self, x: Tensor, height: int, width: int, attention_images: int = 0
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        attended, factors = self.attn(self.norm1(x), height, width, attention_images)
        x = x + self.drop_path(attended)
        x = x + self.drop_path(self.mlp(self.norm2(x), height, width))
        return x, factors


class MixTransformer(nn.Module):
    """MiT encoder returning four stage maps and the last two blocks' attention logits.

    Args:
        embed_dims, num_heads, depths, sr_ratios, mlp_ratio: architecture (AFA.md §1).
        strides: per-stage downsampling; AFA uses (4, 2, 2, 1), SegFormer (4, 2, 2, 2).
        in_channels: input image channels.
        drop_path_rate: stochastic depth of the last block, linear from 0 over all blocks.
        attention_blocks: how many final blocks can return attention logits; they must all
            be in the last stage so their maps share one token grid.
    """

    def __init__(
        self,
        embed_dims: tuple[int, ...],
        num_heads: tuple[int, ...],
        depths: tuple[int, ...],
        sr_ratios: tuple[int, ...] = (8, 4, 2, 1),
        mlp_ratio: int = 4,
        strides: tuple[int, ...] = AFA_STRIDES,
        in_channels: int = 3,
        drop_path_rate: float = 0.1,
        attention_blocks: int = 2,
    ) -> None:
        super().__init__()
        if not len(embed_dims) == len(num_heads) == len(depths) == len(sr_ratios) == len(strides) == 4:
            raise ValueError("MiT needs exactly four values for each of embed_dims, num_heads, depths, sr_ratios, strides")
        if depths[-1] < attention_blocks:
            raise ValueError(f"the last stage has {depths[-1]} blocks; {attention_blocks} attention blocks requested")
        self.embed_dims = tuple(embed_dims)
        self.num_heads = tuple(num_heads)
        self.strides = tuple(strides)
        self.sr_ratios = tuple(sr_ratios)
        self.attention_blocks = attention_blocks
        drop_rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        channels = in_channels
        for stage in range(4):
            kernel = 7 if stage == 0 else 3
            self.add_module(f"patch_embed{stage + 1}", OverlapPatchEmbed(channels, embed_dims[stage], kernel, strides[stage]))
            first = sum(depths[:stage])
            blocks = [
                MiTBlock(embed_dims[stage], num_heads[stage], mlp_ratio, sr_ratios[stage], drop_rates[first + j])
                for j in range(depths[stage])
            ]
            self.add_module(f"block{stage + 1}", nn.ModuleList(blocks))
            self.add_module(f"norm{stage + 1}", nn.LayerNorm(embed_dims[stage], eps=BLOCK_NORM_EPS))
            channels = embed_dims[stage]
        self.apply(_init_weights)

    @property
    def output_stride(self) -> int:
        """Downsampling of the last stage map (16 with AFA's strides)."""
        return math.prod(self.strides)

    @property
    def min_input_size(self) -> int:
        """Smallest image side every stage's key/value reduction accepts: stage i's grid,
        ceil(side / cumulative stride), must hold one sr_i × sr_i kernel (29 px for MiT)."""
        return max((sr - 1) * math.prod(self.strides[: i + 1]) + 1 for i, sr in enumerate(self.sr_ratios))

    @property
    def attention_channels(self) -> int:
        """Number of attention logit maps returned (heads summed over the attention blocks)."""
        return self.attention_blocks * self.num_heads[-1]

    def stages(self) -> list[tuple[nn.Module, nn.ModuleList, nn.Module]]:
        return [(getattr(self, f"patch_embed{i}"), getattr(self, f"block{i}"), getattr(self, f"norm{i}")) for i in range(1, 5)]

    def forward(self, images: Tensor, attention_images: int = 0) -> tuple[list[Tensor], AttentionFactors | None]:
        """Encode images.

        Args:
            images: (B, 3, H, W) normalised.
            attention_images: return the attention of the first this-many images (0: none).

        Returns:
            features: four maps (B, D_i, H/s_i, W/s_i), s = cumulative strides.
            attention: the last blocks' queries and keys (`AttentionFactors`, their product
                the pre-softmax logits ``q kᵀ``, M = attention_blocks * heads maps over the
                N tokens of the last stage), or None.
        """
        if min(images.shape[-2:]) < self.min_input_size:
            raise ImageTooSmallError(
                f"the MiT encoder needs images of at least {self.min_input_size}×{self.min_input_size} px, got "
                f"{images.shape[-2]}×{images.shape[-1]}: use larger images or a larger smallest test/CAM scale")
        features: list[Tensor] = []
        queries: list[Tensor] = []
        keys: list[Tensor] = []
        x = images
        num_blocks = sum(len(blocks) for _, blocks, _ in self.stages())
        block_index = 0
        for embed, blocks, norm in self.stages():
            tokens, height, width = embed(x)
            for block in blocks:
                block_index += 1
                wanted = attention_images if block_index > num_blocks - self.attention_blocks else 0
                tokens, factors = block(tokens, height, width, wanted)
                if factors is not None:
                    queries.append(factors[0])
                    keys.append(factors[1])
            tokens = norm(tokens)
            # (B, h*w, D) -> (B, D, h, w)
            x = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, height, width)
            features.append(x)
        if not queries:
            return features, None
        return features, AttentionFactors(torch.cat(queries, dim=1), torch.cat(keys, dim=1))


def _init_weights(module: nn.Module) -> None:
    """SegFormer's initialisation: truncated normal linears, He-normal convs (fan-out)."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_mit(
    variant: str,
    strides: tuple[int, ...] = AFA_STRIDES,
    drop_path_rate: float = 0.1,
    attention_blocks: int = 2,
) -> MixTransformer:
    """Build a MiT variant by name (``tiny``, ``b0`` … ``b5``)."""
    if variant not in MIT_VARIANTS:
        raise ValueError(f"unknown MiT variant {variant!r}; choose one of {sorted(MIT_VARIANTS)}")
    config = MIT_VARIANTS[variant]
    return MixTransformer(
        embed_dims=config.embed_dims,
        num_heads=config.num_heads,
        depths=config.depths,
        sr_ratios=config.sr_ratios,
        mlp_ratio=config.mlp_ratio,
        strides=tuple(strides),
        drop_path_rate=drop_path_rate,
        attention_blocks=attention_blocks,
    )

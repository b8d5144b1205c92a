"""Heads on top of the MiT features: attention affinity and the SegFormer MLP decoder (AFA.md §2)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from afa.models.mit import AttentionFactors


class AttentionAffinity(nn.Module):
    """Affinity from attention: sigmoid(1×1 conv over the symmetrised logit maps), AFA.md §2.

    The 1×1 conv is linear, so ``w·(A + Aᵀ) + b = (w·A) + (w·A)ᵀ + b``, and each map is
    ``A_m = q_m k_mᵀ``, so ``w·A = [w_1 q_1, …, w_M q_M] [k_1, …, k_M]ᵀ``: one (N, M·d)
    by (M·d, N) product gives the mixed map, and neither the M logit maps nor their
    transposes are ever built (nor kept for the backward).

    Args:
        in_channels: number of attention maps (16 for AFA: 2 blocks × 8 heads).
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        # The parameters of a 1×1 conv 16→1, held directly so the state-dict keys are the
        # reference's ``attn_proj.weight`` / ``attn_proj.bias``.
        self.weight = nn.Parameter(torch.empty(1, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.empty(1))
        nn.init.kaiming_normal_(self.weight, a=math.sqrt(5), mode="fan_out")
        bound = 1 / math.sqrt(in_channels)  # nn.Conv2d's default bias init
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, attention: AttentionFactors) -> Tensor:
        """attention: queries and keys (B, M, N, d) of the M maps -> affinity P (B, N, N) in (0, 1), symmetric."""
        queries, keys = attention
        batch, maps, nodes, _ = queries.shape
        weighted = queries * self.weight.view(1, maps, 1, 1).to(queries.dtype)
        # (B, M, N, d) -> (B, N, M·d): the maps' sum becomes the product's inner dimension.
        weighted = weighted.transpose(1, 2).reshape(batch, nodes, -1)
        stacked_keys = keys.transpose(1, 2).reshape(batch, keys.shape[2], -1)
        mixed = weighted @ stacked_keys.transpose(1, 2)  # (B, N, N)
        symmetric = mixed + mixed.transpose(1, 2) + self.bias.to(mixed.dtype)
        return torch.sigmoid(symmetric.float())


class TokenProjection(nn.Module):
    """Per-pixel linear projection of a feature map (SegFormer's ``MLP``, key ``proj``)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C_in, h, w) -> (B, C_out, h, w)."""
        return self.proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNormReLU(nn.Module):
    """1×1 conv (no bias) → norm → ReLU, with the keys (``conv``, ``bn``) and initialisation
    (Kaiming normal, fan-out) of the mmcv ``ConvModule`` the SegFormer checkpoints were saved from.

    Args:
        norm_layer: the norm's type (``nn.BatchNorm2d``; the engine converts to SyncBN).
    """

    def __init__(self, in_channels: int, out_channels: int, norm_layer: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn = norm_layer(out_channels)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, a=0, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C_in, h, w) -> (B, C_out, h, w)."""
        return self.activate(self.bn(self.conv(x)))


class SegFormerHead(nn.Module):
    """SegFormer's all-MLP decoder (AFA.md §2), output at stage 1's resolution.

    Args:
        in_channels: channels of the four stage maps.
        num_classes: K, background included.
        embed_dim: E, width of the projected features.
        dropout: Dropout2d probability before the classifier.
        norm_layer: the fuse layer's norm type.
    """

    def __init__(
        self,
        in_channels: tuple[int, ...],
        num_classes: int,
        embed_dim: int = 256,
        dropout: float = 0.1,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        for index, channels in enumerate(in_channels, start=1):
            self.add_module(f"linear_c{index}", TokenProjection(channels, embed_dim))
        self.num_inputs = len(in_channels)
        self.linear_fuse = ConvNormReLU(embed_dim * len(in_channels), embed_dim, norm_layer)
        self.dropout = nn.Dropout2d(dropout)
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, kernel_size=1)

    def forward(self, features: list[Tensor]) -> Tensor:
        """features: four maps (B, D_i, h_i, w_i) -> logits (B, K, h_1, w_1)."""
        size = features[0].shape[-2:]
        projected = []
        for index in reversed(range(self.num_inputs)):  # concatenation order [4, 3, 2, 1]
            x = getattr(self, f"linear_c{index + 1}")(features[index])
            if x.shape[-2:] != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            projected.append(x)
        fused = self.linear_fuse(torch.cat(projected, dim=1))
        return self.linear_pred(self.dropout(fused))

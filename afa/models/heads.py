"""Heads on top of the MiT features: attention affinity and the SegFormer MLP decoder (AFA.md §2)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class AttentionAffinity(nn.Module):
    """Affinity from attention: sigmoid(1×1 conv over the symmetrised logit maps), AFA.md §2.

    The 1×1 conv is linear, so ``w·(A + Aᵀ) + b = (w·A) + (w·A)ᵀ + b``: the maps are mixed
    first and symmetrised once, which never builds the (B, 16, N, N) transposed copy.

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

    def forward(self, attention_logits: Tensor) -> Tensor:
        """attention_logits: (B, M, N, N) -> affinity P (B, N, N) in (0, 1), symmetric."""
        weight = self.weight.flatten().to(attention_logits.dtype)
        mixed = torch.einsum("bmij,m->bij", attention_logits, weight)
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

"""AffinityNet on the MiT encoder: the feature map whose pair distances give PSA's affinity (PSA.md §4).

The grid is the map of MiT stage 2 (``features[1]``), whose stride is ``strides[0] ·
strides[1]``: 8 with AFA's strides (4, 2, 2, 1) and with SegFormer's (4, 2, 2, 2), PSA's
stride-8 grid. Stages 3 and 4 (stride 16 and 16, or 16 and 32) are resized bilinearly to
stage 2's actual map size, so ⌈H/8⌉ × ⌈W/8⌉ for any input. Strides that change the first
two change the grid with them (``AffinityNet.feature_stride`` reports it); PSA's labels
and random walk assume 8, so a stage that builds them checks it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from afa.models.mit import AFA_STRIDES, MixTransformer

PSA_STAGE_CHANNELS: tuple[int, int, int] = (64, 128, 256)  # the reference's; the paper: 128, 256, 512
PSA_FEATURE_CHANNELS: int = 448  # = 64 + 128 + 256, the reference's
# The reference initialises the fuse conv with xavier_uniform_(gain=4): large enough that the
# initial affinities exp(−mean|f_i − f_j|) are spread out rather than all near 1.
FUSE_INIT_GAIN: float = 4.0


class AffinityFeatureHead(nn.Module):
    """Per-stage 1×1 conv + ELU, resized to the first map's grid, concatenated, 1×1 conv + ELU.

    Initialisation follows the reference (PSA.md §4): Kaiming-normal (fan-in, gain √2) for
    the per-stage convs, Xavier-uniform with gain 4 for the fuse conv; biases, if any, zero.

    Args:
        in_channels: channels of the three stage maps (MiT: ``embed_dims[1:]``).
        stage_channels: width of each stage's projection (PSA: 64, 128, 256).
        out_channels: D, the width of the feature map f (PSA: 448).
        bias: give the convs biases (the reference's have none).
        act_layer: the activation type (ELU in the reference).
    """

    def __init__(
        self,
        in_channels: tuple[int, ...],
        stage_channels: tuple[int, ...] = PSA_STAGE_CHANNELS,
        out_channels: int = PSA_FEATURE_CHANNELS,
        bias: bool = False,
        act_layer: type[nn.Module] = nn.ELU,
    ) -> None:
        super().__init__()
        if len(in_channels) != len(stage_channels):
            raise ValueError(
                f"AffinityFeatureHead: {len(in_channels)} input maps but {len(stage_channels)} "
                f"stage_channels {tuple(stage_channels)}: give one width per map"
            )
        self.project = nn.ModuleList(
            nn.Conv2d(source, width, kernel_size=1, bias=bias) for source, width in zip(in_channels, stage_channels)
        )
        self.fuse = nn.Conv2d(sum(stage_channels), out_channels, kernel_size=1, bias=bias)
        self.act = act_layer()
        self.in_channels = tuple(in_channels)
        self.out_channels = int(out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for conv in self.project:
            nn.init.kaiming_normal_(conv.weight)
        nn.init.xavier_uniform_(self.fuse.weight, gain=FUSE_INIT_GAIN)
        for conv in (*self.project, self.fuse):
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def forward(self, features: list[Tensor]) -> Tensor:
        """features: maps (B, C_i, h_i, w_i), the first on the target grid -> f (B, D, h_1, w_1)."""
        size = features[0].shape[-2:]
        projected = []
        for conv, feature in zip(self.project, features):
            x = self.act(conv(feature))
            if x.shape[-2:] != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            projected.append(x)
        return self.act(self.fuse(torch.cat(projected, dim=1)))


class AffinityNet(nn.Module):
    """MiT encoder + :class:`AffinityFeatureHead` on its last three stages (PSA.md §4).

    Args:
        encoder: a MiT encoder (``afa.models.mit.build_mit``).
        head: a head whose ``in_channels`` are ``encoder.embed_dims[1:]``.
    """

    def __init__(self, encoder: MixTransformer, head: AffinityFeatureHead) -> None:
        super().__init__()
        if head.in_channels != tuple(encoder.embed_dims[1:]):
            raise ValueError(
                f"AffinityNet: head in_channels {head.in_channels} do not match the encoder's last three "
                f"stages {tuple(encoder.embed_dims[1:])}: build the head with in_channels=encoder.embed_dims[1:]"
            )
        self.encoder = encoder
        self.head = head

    @property
    def feature_stride(self) -> int:
        """Stride of the feature grid: MiT stage 2's, ``strides[0] · strides[1]`` (8 for AFA/SegFormer)."""
        return self.encoder.strides[0] * self.encoder.strides[1]

    def feature_grid(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the feature map for an H×W input (each strided conv pads to a ceiling)."""
        return -(-height // self.feature_stride), -(-width // self.feature_stride)

    def forward(self, images: Tensor) -> Tensor:
        """images: (B, 3, H, W) normalised -> f (B, D, ⌈H/s⌉, ⌈W/s⌉), s = ``feature_stride``."""
        features, _ = self.encoder(images)
        return self.head(features[1:])

    def parameter_groups(self, weight_decay: float = 5e-4) -> list[dict]:
        """PSA's four groups (PSA.md §4), each with ``name``, ``params``, ``lr_mult`` and ``weight_decay``.

        ``encoder_weight`` ×1 with decay, ``encoder_bias_norm`` ×2 without, ``head_weight`` ×10 with
        decay, ``head_bias`` ×20 without (empty when the head has no biases, as in the
        reference). Weights are the parameters with ≥ 2 dimensions (linear and conv kernels);
        biases and LayerNorm scales/shifts are the 1-D ones. Every parameter is in exactly
        one group, frozen ones too. An optimiser builder sets ``lr = base_lr · lr_mult``.
        """
        groups = {name: [] for name in ("encoder_weight", "encoder_bias_norm", "head_weight", "head_bias")}
        for part, module in (("encoder", self.encoder), ("head", self.head)):
            for parameter in module.parameters():
                kind = "weight" if parameter.ndim > 1 else ("bias_norm" if part == "encoder" else "bias")
                groups[f"{part}_{kind}"].append(parameter)
        multipliers = {"encoder_weight": 1.0, "encoder_bias_norm": 2.0, "head_weight": 10.0, "head_bias": 20.0}
        return [
            {"name": name, "params": params, "lr_mult": multipliers[name],
             "weight_decay": weight_decay if name.endswith("weight") else 0.0}
            for name, params in groups.items()
        ]


def build_affinity_net(
    backbone: str = "b1",
    stage_channels: tuple[int, ...] = PSA_STAGE_CHANNELS,
    out_channels: int = PSA_FEATURE_CHANNELS,
    drop_path_rate: float = 0.1,
    strides: tuple[int, ...] = AFA_STRIDES,
    pretrained: str | None = None,
) -> AffinityNet:
    """Build AffinityNet, optionally loading ImageNet MiT weights into its encoder (as
    :func:`afa.models.network.build_afa_network` does; the head always starts fresh).

    Args:
        backbone: MiT variant (``tiny``, ``b0`` … ``b5``).
        stage_channels: widths of the three stage projections.
        out_channels: D.
        drop_path_rate: stochastic depth of the encoder.
        strides: encoder strides.
        pretrained: path of a SegFormer ``mit_b*.pth`` or Hugging Face Segformer checkpoint.
    """
    from afa.models.mit import build_mit
    from afa.models.weights import load_pretrained_encoder

    encoder = build_mit(backbone, strides=tuple(strides), drop_path_rate=drop_path_rate)
    head = AffinityFeatureHead(encoder.embed_dims[1:], tuple(stage_channels), out_channels)
    if pretrained:
        load_pretrained_encoder(encoder, pretrained)
    return AffinityNet(encoder, head)

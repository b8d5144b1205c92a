"""The AFA network: MiT encoder, CAM classifier, attention affinity, SegFormer decoder (AFA.md §2).

Attribute names (``encoder``, ``decoder``, ``attn_proj``, ``classifier``) match the reference
implementation's, so its checkpoints load once the DDP ``module.`` prefix is removed.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from afa.models.heads import AttentionAffinity, SegFormerHead
from afa.models.mit import MixTransformer


class AFAOutput(NamedTuple):
    """What one training forward returns; parts not asked for are None."""

    class_logits: Tensor  # (B, C)
    seg_logits: Tensor | None  # (B, K, H/4, W/4)
    affinity: Tensor | None  # (B, N, N), N = (H/16)·(W/16)


class AFANetwork(nn.Module):
    """Backbone + classifier + attention-affinity projection + segmentation decoder.

    Args:
        encoder: a MiT encoder (see ``afa.models.mit.build_mit``).
        num_classes: foreground classes C (the decoder predicts C + 1 with background).
        pooling: ``gmp`` (global max pooling, AFA's default) or ``gap``.
        decoder_dim: E, the SegFormer decoder width.
        decoder_norm_layer: the norm type of the decoder's fuse layer (``nn.BatchNorm2d``).
    """

    def __init__(
        self,
        encoder: MixTransformer,
        num_classes: int,
        pooling: str = "gmp",
        decoder_dim: int = 256,
        decoder_norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if pooling not in ("gmp", "gap"):
            raise ValueError(f"pooling must be 'gmp' or 'gap', got {pooling!r}")
        self.num_classes = num_classes
        self.pooling = pooling
        self.encoder = encoder
        self.classifier = nn.Conv2d(encoder.embed_dims[-1], num_classes, kernel_size=1, bias=False)
        self.attn_proj = AttentionAffinity(encoder.attention_channels)
        self.decoder = SegFormerHead(encoder.embed_dims, num_classes + 1, decoder_dim, norm_layer=decoder_norm_layer)

    def pool(self, features: Tensor) -> Tensor:
        """features: (B, D, h, w) -> (B, D, 1, 1)."""
        if self.pooling == "gmp":
            return F.adaptive_max_pool2d(features, 1)
        return F.adaptive_avg_pool2d(features, 1)

    def forward(self, images: Tensor, with_segmentation: bool = True, with_affinity: bool = True) -> AFAOutput:
        """Training forward.

        Args:
            images: (B, 3, H, W) normalised.
            with_segmentation: run the decoder (skipped in the classification-only phase).
            with_affinity: compute the attention affinity P.
        """
        features, attention = self.encoder(images, attention_images=images.shape[0] if with_affinity else 0)
        class_logits = self.classifier(self.pool(features[-1])).flatten(1)
        seg_logits = self.decoder(features) if with_segmentation else None
        affinity = self.attn_proj(attention) if attention is not None else None
        return AFAOutput(class_logits, seg_logits, affinity)

    def forward_cam(self, images: Tensor, affinity_images: int = 0) -> tuple[Tensor, Tensor | None]:
        """CAM-only forward: no decoder, attention only for the first ``affinity_images``.

        Args:
            images: (B, 3, H, W) normalised.
            affinity_images: images (from the front of the batch) whose affinity is wanted.

        Returns:
            cams: (B, C, H/16, W/16), the classifier applied as a 1×1 conv, no ReLU (AFA.md §2).
            affinity: (affinity_images, N, N) or None.
        """
        features, attention = self.encoder(images, attention_images=affinity_images)
        cams = F.conv2d(features[-1], self.classifier.weight)
        affinity = self.attn_proj(attention) if attention is not None else None
        return cams, affinity

    def affinity_grid(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the last stage for an H×W input: the affinity has N = h·w nodes."""
        stride = self.encoder.output_stride  # 16 with AFA's strides
        return -(-height // stride), -(-width // stride)

    def forward_segmentation(self, images: Tensor) -> Tensor:
        """Segmentation logits (B, K, H/4, W/4) only (inference)."""
        features, _ = self.encoder(images)
        return self.decoder(features)


def build_afa_network(
    backbone: str = "b1",
    num_classes: int = 20,
    pooling: str = "gmp",
    decoder_dim: int = 256,
    drop_path_rate: float = 0.1,
    strides: tuple[int, ...] = (4, 2, 2, 1),
    pretrained: str | None = None,
    pretrained_decoder: bool = False,
) -> AFANetwork:
    """Build the AFA network, optionally loading ImageNet MiT weights from a local file.

    Args:
        backbone: MiT variant (``tiny``, ``b0`` … ``b5``).
        num_classes: foreground classes C.
        pooling: ``gmp`` or ``gap``.
        decoder_dim: SegFormer decoder width E.
        drop_path_rate: stochastic depth of the encoder.
        strides: encoder strides (AFA: (4, 2, 2, 1)).
        pretrained: path of a SegFormer ``mit_b*.pth`` or Hugging Face Segformer checkpoint
            (a file or a ``save_pretrained`` folder).
        pretrained_decoder: also load the decode head of a Hugging Face
            ``SegformerForSemanticSegmentation`` checkpoint into the decoder (its classifier,
            sized for other classes, is never loaded). Needs ``pretrained``.
    """
    from afa.models.mit import build_mit
    from afa.models.weights import load_pretrained_encoder

    if pretrained_decoder and not pretrained:
        raise ValueError("pretrained_decoder=True needs a pretrained checkpoint path")
    encoder = build_mit(backbone, strides=tuple(strides), drop_path_rate=drop_path_rate)
    network = AFANetwork(
        encoder, num_classes, pooling=pooling, decoder_dim=decoder_dim)
    if pretrained:
        load_pretrained_encoder(encoder, pretrained, decoder=network.decoder if pretrained_decoder else None)
    return network


def parameter_groups(network: AFANetwork, lr: float, weight_decay: float) -> list[dict]:
    """AdamW parameter groups of AFA.md §2, each with a ``name``.

    encoder (lr, wd); encoder_norm (lr 0, wd 0: frozen); heads = classifier + attention
    projection (10×lr); decoder (10×lr).
    """
    encoder_weights, encoder_norms = [], []
    for name, parameter in network.encoder.named_parameters():
        (encoder_norms if "norm" in name else encoder_weights).append(parameter)
    heads = [network.classifier.weight, *network.attn_proj.parameters()]
    return [
        {"name": "encoder", "params": encoder_weights, "lr": lr, "weight_decay": weight_decay},
        {"name": "encoder_norm", "params": encoder_norms, "lr": 0.0, "weight_decay": 0.0},
        {"name": "heads", "params": heads, "lr": 10 * lr, "weight_decay": weight_decay},
        {"name": "decoder", "params": list(network.decoder.parameters()), "lr": 10 * lr, "weight_decay": weight_decay},
    ]

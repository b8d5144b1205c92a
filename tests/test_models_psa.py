"""AffinityNet on MiT (PSA.md §4): feature grid, head, parameter groups, pretrained encoder."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from afa.engine.builders import build_affinity_network
from afa.models import MIT_VARIANTS, AffinityFeatureHead, AffinityNet, build_affinity_net, build_mit

TINY = MIT_VARIANTS["tiny"]


@pytest.mark.parametrize("strides", [(4, 2, 2, 1), (4, 2, 2, 2)])
@pytest.mark.parametrize("size", [(64, 96), (70, 45)])
def test_features_on_the_stride_8_grid(strides, size):
    network = build_affinity_net("tiny", strides=strides).eval()
    with torch.no_grad():
        features = network(torch.randn(2, 3, *size))
    grid = (math.ceil(size[0] / 8), math.ceil(size[1] / 8))
    assert network.feature_stride == 8 and network.feature_grid(*size) == grid
    assert features.shape == (2, 448, *grid) and features.dtype == torch.float32
    assert (features >= -1).all()  # ELU output


def test_grid_follows_stage_2_when_the_strides_move_it():
    network = build_affinity_net("tiny", strides=(4, 1, 2, 2)).eval()
    with torch.no_grad():
        features = network(torch.randn(1, 3, 40, 52))
    assert network.feature_stride == 4 and features.shape[-2:] == network.feature_grid(40, 52) == (10, 13)


def test_custom_widths():
    network = build_affinity_net("tiny", stage_channels=(8, 16, 32), out_channels=24).eval()
    assert [conv.out_channels for conv in network.head.project] == [8, 16, 32]
    assert [conv.in_channels for conv in network.head.project] == list(TINY.embed_dims[1:])
    with torch.no_grad():
        assert network(torch.randn(1, 3, 32, 32)).shape == (1, 24, 4, 4)
    with pytest.raises(ValueError, match="stage_channels"):
        AffinityFeatureHead((64, 128, 256), (8, 16))
    with pytest.raises(ValueError, match="in_channels"):
        AffinityNet(build_mit("tiny"), AffinityFeatureHead((1, 2, 3)))


def test_head_matches_the_formula():
    torch.manual_seed(0)
    head = AffinityFeatureHead((5, 6, 7), (3, 4, 2), out_channels=6, bias=True)
    for conv in (*head.project, head.fuse):
        torch.nn.init.normal_(conv.bias)
    maps = [torch.randn(2, 5, 6, 8), torch.randn(2, 6, 3, 4), torch.randn(2, 7, 3, 4)]
    parts = [F.elu(F.conv2d(x, conv.weight, conv.bias)) for x, conv in zip(maps, head.project)]
    parts = [parts[0]] + [F.interpolate(p, size=(6, 8), mode="bilinear", align_corners=False) for p in parts[1:]]
    expected = F.elu(F.conv2d(torch.cat(parts, 1), head.fuse.weight, head.fuse.bias))
    torch.testing.assert_close(head(maps), expected)


def test_initialisation_follows_the_reference():
    head = AffinityFeatureHead((64, 128, 256))
    assert all(conv.bias is None for conv in (*head.project, head.fuse))
    fan_in, fan_out = 448, 448
    bound = 4.0 * math.sqrt(6.0 / (fan_in + fan_out))  # xavier_uniform_(gain=4)
    assert head.fuse.weight.abs().max() <= bound and head.fuse.weight.abs().max() > 0.9 * bound
    stage = head.project[2].weight  # kaiming_normal_, fan-in 256: std sqrt(2 / 256)
    assert abs(stage.std().item() - math.sqrt(2 / 256)) < 0.1 * math.sqrt(2 / 256)


@pytest.mark.parametrize("bias", [False, True])
def test_parameter_groups_cover_every_parameter_once(bias):
    encoder = build_mit("tiny")
    network = AffinityNet(encoder, AffinityFeatureHead(encoder.embed_dims[1:], bias=bias))
    groups = network.parameter_groups(weight_decay=5e-4)
    by_name = {group["name"]: group for group in groups}
    assert [(g["name"], g["lr_mult"], g["weight_decay"]) for g in groups] == [
        ("encoder_weight", 1.0, 5e-4), ("encoder_bias_norm", 2.0, 0.0),
        ("head_weight", 10.0, 5e-4), ("head_bias", 20.0, 0.0),
    ]
    grouped = [id(p) for group in groups for p in group["params"]]
    assert len(grouped) == len(set(grouped)) and set(grouped) == {id(p) for p in network.parameters()}
    encoder_ids = {id(p) for p in network.encoder.parameters()}
    names = {id(p): name for name, p in network.named_parameters()}
    for group in groups:
        in_encoder = {id(p) in encoder_ids for p in group["params"]}
        assert in_encoder <= {group["name"].startswith("encoder")}
    assert all(p.ndim >= 2 for p in by_name["encoder_weight"]["params"] + by_name["head_weight"]["params"])
    bias_norm = {names[id(p)] for p in by_name["encoder_bias_norm"]["params"]}
    assert "encoder.norm4.weight" in bias_norm and "encoder.block1.0.attn.q.bias" in bias_norm
    assert "encoder.block1.0.attn.q.weight" in {names[id(p)] for p in by_name["encoder_weight"]["params"]}
    assert len(by_name["head_weight"]["params"]) == 4
    assert len(by_name["head_bias"]["params"]) == (4 if bias else 0)
    optimizer = torch.optim.SGD(
        [{**group, "lr": 0.1 * group["lr_mult"]} for group in groups], lr=0.1, momentum=0.9)
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.1, 0.2, 1.0, 2.0])


def test_every_parameter_gets_a_gradient():
    network = build_affinity_net("tiny", drop_path_rate=0.0)
    network(torch.randn(1, 3, 32, 32)).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in network.parameters())


def test_pretrained_encoder_loads_through_both_builders(tmp_path):
    source = build_mit("tiny")
    state = {key: value + 0.5 for key, value in source.state_dict().items()}
    path = tmp_path / "mit_tiny.pth"
    torch.save({**state, "head.weight": torch.zeros(3, 256), "head.bias": torch.zeros(3)}, path)
    network = build_affinity_net("tiny", pretrained=str(path))
    for key, value in network.encoder.state_dict().items():
        assert torch.equal(value, state[key]), key
    model = OmegaConf.create({"backbone": "tiny", "drop_path_rate": 0.1, "strides": [4, 2, 2, 1],
                              "pretrained": str(path), "pooling": "gmp", "decoder_dim": 256})
    built = build_affinity_network(model, stage_channels=[16, 16, 16], out_channels=32)
    assert torch.equal(built.encoder.norm4.weight, state["norm4.weight"])
    assert built.head.out_channels == 32 and built.feature_stride == 8

import re

import pytest
import torch

from afa.models import (
    MIT_VARIANTS,
    AFANetwork,
    CheckpointError,
    build_afa_network,
    build_mit,
    load_afa_reference,
    load_pretrained_encoder,
)
from afa.models.network import parameter_groups
from afa.engine.optim import build_optimizer, poly_warmup_multiplier
from tests.reference_models import RefAFA, RefMiT

TINY = MIT_VARIANTS["tiny"]


@pytest.mark.parametrize("variant", sorted(MIT_VARIANTS))
def test_every_variant_shapes_and_strides(variant):
    config = MIT_VARIANTS[variant]
    encoder = build_mit(variant).eval()
    with torch.no_grad():
        features, attention = encoder(torch.randn(1, 3, 64, 96), attention_images=1)
    assert [f.shape for f in features] == [
        (1, config.embed_dims[0], 16, 24),
        (1, config.embed_dims[1], 8, 12),
        (1, config.embed_dims[2], 4, 6),
        (1, config.embed_dims[3], 4, 6),  # AFA strides (4, 2, 2, 1): stage 4 stays at 1/16
    ]
    assert encoder.output_stride == 16
    assert attention.logits().shape == (1, 2 * config.num_heads[-1], 24, 24)


def test_segformer_strides_configurable():
    encoder = build_mit("tiny", strides=(4, 2, 2, 2)).eval()
    features, attention = encoder(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in features] == [16, 8, 4, 2]
    assert attention is None


def test_published_variant_sizes():
    # Parameter counts of the SegFormer encoders (ImageNet head excluded), in millions.
    expected = {"b0": 3.3, "b1": 13.1, "b2": 24.2}
    for variant, millions in expected.items():
        count = sum(p.numel() for p in build_mit(variant).parameters()) / 1e6
        assert abs(count - millions) < 0.3, (variant, count)


def test_attention_logits_only_for_last_two_blocks(monkeypatch):
    encoder = build_mit("b2").eval()
    requested = []
    for stage in range(1, 5):
        for index, block in enumerate(getattr(encoder, f"block{stage}")):
            original = block.attn.forward

            def spy(x, h, w, attention_images=0, _orig=original, _name=(stage, index)):
                requested.append((_name, attention_images))
                return _orig(x, h, w, attention_images)

            monkeypatch.setattr(block.attn, "forward", spy)
    with torch.no_grad():
        encoder(torch.randn(2, 3, 64, 64), attention_images=2)
    wanted = [name for name, n in requested if n > 0]
    assert wanted == [(4, 1), (4, 2)]  # b2 has 3 blocks in stage 4: only the last two


def test_attention_for_leading_images_only_matches_full():
    encoder = build_mit("tiny").eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        feats_all, attn_all = encoder(images, attention_images=3)
        feats_one, attn_one = encoder(images, attention_images=1)
        feats_none, _ = encoder(images)
    torch.testing.assert_close(attn_one.logits(), attn_all.logits()[:1])
    for a, b, c in zip(feats_all, feats_one, feats_none):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


def test_last_stage_must_hold_attention_blocks():
    from afa.models.mit import MixTransformer

    with pytest.raises(ValueError, match="attention blocks"):
        MixTransformer((8, 8, 8, 8), (1, 1, 1, 1), (1, 1, 1, 1))


def _segformer_checkpoint(tmp_path, with_head=True):
    reference = RefMiT(TINY.embed_dims, TINY.num_heads, TINY.depths, with_head=with_head).eval()
    path = tmp_path / "mit_tiny.pth"
    torch.save(reference.state_dict(), path)
    return reference, path


def _assert_features_match(reference, encoder, images):
    with torch.no_grad():
        ref_feats, ref_attn = reference(images)
        feats, attn = encoder(images, attention_images=images.shape[0])
    for a, b in zip(ref_feats, feats):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(attn.logits(), torch.cat(ref_attn[-2:], 1), atol=1e-4, rtol=1e-4)


def test_segformer_layout_loads_strictly_and_reproduces(tmp_path):
    reference, path = _segformer_checkpoint(tmp_path)
    assert any(k.startswith("head.") for k in reference.state_dict())
    encoder = build_mit("tiny").eval()
    load_pretrained_encoder(encoder, path)
    _assert_features_match(reference, encoder, torch.randn(2, 3, 64, 80))


def _to_hf_layout(state):
    """SegFormer-release keys -> Hugging Face SegformerModel keys (separate key/value)."""
    hf = {}
    for key, value in state.items():
        if key.startswith("head."):
            hf["classifier." + key[5:]] = value
            continue
        name = re.sub(r"^patch_embed(\d)\.norm\.", lambda m: f"patch_embeddings.{int(m[1]) - 1}.layer_norm.", key)
        name = re.sub(r"^patch_embed(\d)\.", lambda m: f"patch_embeddings.{int(m[1]) - 1}.", name)
        name = re.sub(r"^norm(\d)\.", lambda m: f"layer_norm.{int(m[1]) - 1}.", name)
        name = re.sub(r"^block(\d)\.", lambda m: f"block.{int(m[1]) - 1}.", name)
        for old, new in [("norm1.", "layer_norm_1."), ("norm2.", "layer_norm_2."), ("attn.q.", "attention.self.query."),
                         ("attn.sr.", "attention.self.sr."), ("attn.norm.", "attention.self.layer_norm."),
                         ("attn.proj.", "attention.output.dense."), ("mlp.fc1.", "mlp.dense1."), ("mlp.fc2.", "mlp.dense2.")]:
            name = name.replace(old, new)
        if ".attn.kv." in name:
            half = value.shape[0] // 2
            hf["segformer.encoder." + name.replace("attn.kv.", "attention.self.key.")] = value[:half]
            hf["segformer.encoder." + name.replace("attn.kv.", "attention.self.value.")] = value[half:]
            continue
        hf["segformer.encoder." + name] = value
    return hf


def test_hugging_face_layout_remaps(tmp_path):
    reference, _ = _segformer_checkpoint(tmp_path)
    hf_state = _to_hf_layout(reference.state_dict())
    assert "segformer.encoder.block.3.1.attention.self.value.weight" in hf_state
    path = tmp_path / "pytorch_model.bin"
    torch.save(hf_state, path)
    encoder = build_mit("tiny").eval()
    load_pretrained_encoder(encoder, path)
    _assert_features_match(reference, encoder, torch.randn(1, 3, 64, 64))


def test_hugging_face_safetensors(tmp_path):
    from safetensors.torch import save_file

    reference, _ = _segformer_checkpoint(tmp_path)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in _to_hf_layout(reference.state_dict()).items()}, str(path))
    encoder = build_mit("tiny").eval()
    load_pretrained_encoder(encoder, path)
    _assert_features_match(reference, encoder, torch.randn(1, 3, 48, 64))


def test_reference_afa_checkpoint_loads_and_reproduces(tmp_path):
    reference = RefAFA(TINY.embed_dims, TINY.num_heads, TINY.depths, num_classes=7).eval()
    state = {"module." + k: v for k, v in reference.state_dict().items()}  # saved under DDP
    assert "module.decoder.linear_fuse.bn.num_batches_tracked" in state
    path = tmp_path / "afa_ref.pth"
    torch.save(state, path)
    network = build_afa_network("tiny", num_classes=7).eval()
    load_afa_reference(network, path)
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        cls, seg, affinity, cam, _ = reference(images)
        out = network(images)
        cams, cam_affinity = network.forward_cam(images, affinity_images=2)
        seg_only = network.forward_segmentation(images)
    torch.testing.assert_close(out.class_logits, cls, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.seg_logits, seg, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.affinity, affinity, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cams, cam, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cam_affinity, affinity, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(seg_only, seg, atol=1e-4, rtol=1e-4)


def test_our_state_dict_keys_are_the_reference_layout():
    reference = RefAFA(TINY.embed_dims, TINY.num_heads, TINY.depths, num_classes=3)
    network = build_afa_network("tiny", num_classes=3)
    assert set(network.state_dict()) == set(reference.state_dict())


def test_wrong_variant_fails_naming_file_and_keys(tmp_path):
    _, path = _segformer_checkpoint(tmp_path)
    encoder = build_mit("b0")
    with pytest.raises(CheckpointError) as error:
        load_pretrained_encoder(encoder, path)
    message = str(error.value)
    assert str(path) in message
    assert "missing" in message and "block1.1" in message  # b0 has 2 blocks in stage 1, tiny 1
    assert "shape mismatch" in message and "patch_embed3.proj.weight" in message


def test_unexpected_keys_are_named(tmp_path):
    state = build_mit("tiny").state_dict()
    state["block9.0.extra.weight"] = torch.zeros(1)
    path = tmp_path / "extra.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"1 unexpected: block9\.0\.extra\.weight"):
        load_pretrained_encoder(build_mit("tiny"), path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04truncated zip"])
def test_corrupt_checkpoint_fails_naming_file(tmp_path, content):
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*not a readable checkpoint"):
        load_pretrained_encoder(build_mit("tiny"), path)


def test_truncated_real_checkpoint_fails(tmp_path):
    _, path = _segformer_checkpoint(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_pretrained_encoder(build_mit("tiny"), path)


def test_missing_file_says_no_download(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist.*no weights are downloaded"):
        build_afa_network("tiny", num_classes=2, pretrained=str(tmp_path / "mit_b1.pth"))


def _to_stages_layout(hf_state, prefix="segformer.encoder.", blocks="blocks"):
    """Classic HF keys -> a stages layout: stage i holds its patch embedding, blocks and norm."""
    stages = {}
    for key, value in hf_state.items():
        if not key.startswith("segformer.encoder."):
            stages[key] = value
            continue
        name = key[len("segformer.encoder."):]
        name = re.sub(r"^patch_embeddings\.(\d)\.", r"stages.\1.patch_embeddings.", name)
        name = re.sub(r"^block\.(\d)\.(\d+)\.", rf"stages.\1.{blocks}.\2.", name)
        name = re.sub(r"^layer_norm\.(\d)\.", r"stages.\1.layer_norm.", name)
        assert name.startswith("stages.")
        stages[prefix + name] = value
    return stages


@pytest.mark.parametrize(
    "prefix, blocks", [("segformer.encoder.", "blocks"), ("encoder.", "block"), ("segformer.", "blocks"), ("", "blocks")]
)
def test_hugging_face_stages_layout_equals_classic(tmp_path, prefix, blocks):
    reference, _ = _segformer_checkpoint(tmp_path)
    hf_state = _to_hf_layout(reference.state_dict())
    stages_state = _to_stages_layout(hf_state, prefix, blocks)
    assert f"{prefix}stages.3.{blocks}.1.attention.self.value.weight" in stages_state
    assert f"{prefix}stages.0.layer_norm.weight" in stages_state
    torch.save(hf_state, tmp_path / "classic.bin")
    torch.save(stages_state, tmp_path / "stages.bin")
    classic, stages = build_mit("tiny").eval(), build_mit("tiny").eval()
    load_pretrained_encoder(classic, tmp_path / "classic.bin")
    load_pretrained_encoder(stages, tmp_path / "stages.bin")
    classic_state = classic.state_dict()
    assert stages.state_dict().keys() == classic_state.keys()
    for key, value in stages.state_dict().items():
        torch.testing.assert_close(value, classic_state[key], rtol=0, atol=0)
    _assert_features_match(reference, stages, torch.randn(1, 3, 64, 64))


def test_save_pretrained_folder_with_pytorch_model_bin(tmp_path):
    reference, _ = _segformer_checkpoint(tmp_path)
    folder = tmp_path / "segformer-tiny"
    folder.mkdir()
    torch.save(_to_hf_layout(reference.state_dict()), folder / "pytorch_model.bin")
    (folder / "config.json").write_text("{}")
    encoder = build_mit("tiny").eval()
    load_pretrained_encoder(encoder, folder)
    _assert_features_match(reference, encoder, torch.randn(1, 3, 64, 64))


def test_save_pretrained_folder_with_safetensors(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    reference, _ = _segformer_checkpoint(tmp_path)
    folder = tmp_path / "segformer-tiny"
    folder.mkdir()
    state = {k: v.contiguous() for k, v in _to_stages_layout(_to_hf_layout(reference.state_dict())).items()}
    safetensors_torch.save_file(state, str(folder / "model.safetensors"))
    encoder = build_mit("tiny").eval()
    build_afa_network("tiny", num_classes=2, pretrained=str(folder))  # the network builder takes a folder too
    load_pretrained_encoder(encoder, folder)
    _assert_features_match(reference, encoder, torch.randn(1, 3, 48, 64))


def test_empty_folder_names_folder_and_files(tmp_path):
    with pytest.raises(CheckpointError) as error:
        load_pretrained_encoder(build_mit("tiny"), tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert str(tmp_path) in message and "model.safetensors" in message and "pytorch_model.bin" in message


def test_sharded_folder_is_refused_clearly(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="sharded checkpoint.*not supported"):
        load_pretrained_encoder(build_mit("tiny"), tmp_path)


DECODER_DIM = 16


def _hf_decode_head(embed_dims=TINY.embed_dims, dim=DECODER_DIM, hf_classes=150):
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=generator)

    head = {}
    for index, channels in enumerate(embed_dims):
        head[f"decode_head.linear_c.{index}.proj.weight"] = rand(dim, channels)
        head[f"decode_head.linear_c.{index}.proj.bias"] = rand(dim)
    head["decode_head.linear_fuse.weight"] = rand(dim, dim * len(embed_dims), 1, 1)
    head["decode_head.batch_norm.weight"] = rand(dim)
    head["decode_head.batch_norm.bias"] = rand(dim)
    head["decode_head.batch_norm.running_mean"] = rand(dim)
    head["decode_head.batch_norm.running_var"] = rand(dim).abs() + 0.5
    head["decode_head.batch_norm.num_batches_tracked"] = torch.tensor(7)
    head["decode_head.classifier.weight"] = rand(hf_classes, dim, 1, 1)
    head["decode_head.classifier.bias"] = rand(hf_classes)
    return head


def _semantic_segmentation_checkpoint(tmp_path, **head_options):
    reference, _ = _segformer_checkpoint(tmp_path, with_head=False)
    head = _hf_decode_head(**head_options)
    path = tmp_path / "segformer_ade.bin"
    torch.save({**_to_stages_layout(_to_hf_layout(reference.state_dict())), **head}, path)
    return reference, head, path


def test_decode_head_loads_into_decoder_when_asked(tmp_path):
    reference, head, path = _semantic_segmentation_checkpoint(tmp_path)
    network = build_afa_network(
        "tiny", num_classes=3, decoder_dim=DECODER_DIM, pretrained=str(path), pretrained_decoder=True
    ).eval()
    _assert_features_match(reference, network.encoder, torch.randn(1, 3, 64, 64))
    by_hand = build_afa_network("tiny", num_classes=3, decoder_dim=DECODER_DIM).decoder.eval()
    with torch.no_grad():
        for index in range(4):
            projection = getattr(by_hand, f"linear_c{index + 1}").proj
            projection.weight.copy_(head[f"decode_head.linear_c.{index}.proj.weight"])
            projection.bias.copy_(head[f"decode_head.linear_c.{index}.proj.bias"])
        by_hand.linear_fuse.conv.weight.copy_(head["decode_head.linear_fuse.weight"])
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            getattr(by_hand.linear_fuse.bn, name).copy_(head[f"decode_head.batch_norm.{name}"])
        by_hand.linear_pred.load_state_dict(network.decoder.linear_pred.state_dict())  # never loaded from HF
        assert network.decoder.linear_pred.weight.shape[0] == 4  # 3 classes + background, not HF's 150
        features = [torch.randn(2, channels, 16 // 2**i, 16 // 2**i) for i, channels in enumerate(TINY.embed_dims)]
        torch.testing.assert_close(network.decoder(features), by_hand(features), rtol=0, atol=0)
    assert int(network.decoder.linear_fuse.bn.num_batches_tracked) == 7


def test_decode_head_dropped_with_info_line(tmp_path, caplog):
    _, head, path = _semantic_segmentation_checkpoint(tmp_path)
    network = build_afa_network("tiny", num_classes=3, decoder_dim=DECODER_DIM)
    before = {k: v.clone() for k, v in network.decoder.state_dict().items()}
    with caplog.at_level("INFO", logger="afa"):
        load_pretrained_encoder(network.encoder, path)
    lines = [r.getMessage() for r in caplog.records if r.name == "afa" and r.levelname == "INFO"]
    assert len(lines) == 1
    assert f"dropped {len(head)} decode_head tensors" in lines[0] and "model.pretrained_decoder=true" in lines[0]
    for key, value in network.decoder.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_no_info_line_without_decode_head(tmp_path, caplog):
    _, path = _segformer_checkpoint(tmp_path)
    with caplog.at_level("INFO", logger="afa"):
        load_pretrained_encoder(build_mit("tiny"), path)
    assert not [r for r in caplog.records if "decode_head" in r.getMessage()]


def test_decode_head_shape_mismatch_names_key_and_shapes(tmp_path):
    _, _, path = _semantic_segmentation_checkpoint(tmp_path, dim=DECODER_DIM * 2)
    with pytest.raises(ValueError) as error:
        build_afa_network("tiny", num_classes=3, decoder_dim=DECODER_DIM, pretrained=str(path), pretrained_decoder=True)
    message = str(error.value)
    assert str(path) in message and "linear_c1.proj.weight" in message
    assert f"({DECODER_DIM * 2}, 32)" in message and f"({DECODER_DIM}, 32)" in message


def test_decoder_asked_but_checkpoint_has_no_decode_head(tmp_path):
    reference, _ = _segformer_checkpoint(tmp_path)
    path = tmp_path / "encoder_only.bin"
    torch.save(_to_hf_layout(reference.state_dict()), path)
    with pytest.raises(CheckpointError, match="no decode_head tensors"):
        build_afa_network("tiny", num_classes=3, pretrained=str(path), pretrained_decoder=True)


def test_cam_only_forward_skips_decoder(monkeypatch):
    network = build_afa_network("tiny", num_classes=4).eval()
    monkeypatch.setattr(network.decoder, "forward", lambda *_: pytest.fail("decoder ran"))
    cams, affinity = network.forward_cam(torch.randn(2, 3, 64, 64))
    assert cams.shape == (2, 4, 4, 4) and affinity is None
    out = network(torch.randn(2, 3, 64, 64), with_segmentation=False, with_affinity=False)
    assert out.seg_logits is None and out.affinity is None and out.class_logits.shape == (2, 4)


def test_affinity_symmetric_in_unit_interval():
    network = build_afa_network("tiny", num_classes=4).eval()
    with torch.no_grad():
        affinity = network(torch.randn(2, 3, 64, 64)).affinity
    assert affinity.shape == (2, 16, 16)
    torch.testing.assert_close(affinity, affinity.transpose(1, 2))
    assert affinity.min() > 0 and affinity.max() < 1


def test_gap_pooling_option():
    network = build_afa_network("tiny", num_classes=3, pooling="gap").eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features, _ = network.encoder(images)
        expected = network.classifier(features[-1].mean((2, 3), keepdim=True)).flatten(1)
        torch.testing.assert_close(network(images).class_logits, expected)
    with pytest.raises(ValueError, match="pooling"):
        build_afa_network("tiny", num_classes=3, pooling="max")


def test_parameter_groups_cover_everything_once():
    network = build_afa_network("tiny", num_classes=3)
    groups = parameter_groups(network, lr=6e-5, weight_decay=0.01)
    assert [g["name"] for g in groups] == ["encoder", "encoder_norm", "heads", "decoder"]
    assert [g["lr"] for g in groups] == pytest.approx([6e-5, 0.0, 6e-4, 6e-4])
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0, 0.01, 0.01]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(network.parameters()))
    norm_names = {n for n, p in network.encoder.named_parameters() if "norm" in n}
    assert {id(p) for n, p in network.encoder.named_parameters() if n in norm_names} == {id(p) for p in groups[1]["params"]}


def test_poly_warmup_schedule_values():
    assert poly_warmup_multiplier(0, 20000) == pytest.approx(1e-6)
    assert poly_warmup_multiplier(750, 20000) == pytest.approx(1 - 0.5 * (1 - 1e-6))
    assert poly_warmup_multiplier(1500, 20000) == pytest.approx(1 - 1500 / 20000)
    assert poly_warmup_multiplier(20000, 20000) == 0.0


def test_optimizer_follows_schedule_and_freezes_norms():
    network = build_afa_network("tiny", num_classes=3)
    optimizer, scheduler = build_optimizer(network, lr=1e-3, max_iters=10, warmup_iters=4)
    norm = network.encoder.norm4.weight.detach().clone()
    seen = []
    for _ in range(6):
        seen.append([g["lr"] for g in optimizer.param_groups])
        out = network(torch.randn(2, 3, 32, 32))
        (out.class_logits.sum() + out.seg_logits.mean() + out.affinity.mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    for step, lrs in enumerate(seen):
        mult = poly_warmup_multiplier(step, 10, 4)
        assert lrs == pytest.approx([1e-3 * mult, 0.0, 1e-2 * mult, 1e-2 * mult])
    torch.testing.assert_close(network.encoder.norm4.weight, norm)
    assert not network.encoder.norm4.weight.requires_grad


def test_network_class_is_exported():
    assert isinstance(build_afa_network("tiny", num_classes=2), AFANetwork)


@pytest.mark.parametrize("train_mode", [True, False])
def test_decoder_fuse_layer_equals_mmcv_conv_module(train_mode):
    """The fuse layer is mmcv's ConvModule(1×1, BN, ReLU) in keys, initialisation and output."""
    from mmcv.cnn import ConvModule

    from afa.models.heads import ConvNormReLU

    torch.manual_seed(3)
    reference = ConvModule(24, 8, kernel_size=1, norm_cfg=dict(type="BN", requires_grad=True))
    after_reference = torch.rand(1)
    torch.manual_seed(3)
    ours = ConvNormReLU(24, 8)
    assert torch.rand(1) == after_reference  # the same random draws, so networks initialise alike
    assert ours.state_dict().keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=0)
    reference.train(train_mode), ours.train(train_mode)
    x = torch.randn(2, 24, 5, 6)
    torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=0)
    torch.testing.assert_close(ours.bn.running_mean, reference.bn.running_mean, rtol=0, atol=0)


def test_decoder_norm_layer_is_a_type_the_engine_can_convert():
    network = build_afa_network("tiny", num_classes=3)
    assert isinstance(network.decoder.linear_fuse.bn, torch.nn.BatchNorm2d)
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(network)
    assert isinstance(converted.decoder.linear_fuse.bn, torch.nn.SyncBatchNorm)


def test_affinity_from_factors_equals_mixing_the_logit_maps():
    # AFA.md §2 literally: the 16 logit maps, symmetrised, a 1×1 conv, sigmoid; forward and gradients.
    from afa.models.heads import AttentionAffinity
    from afa.models.mit import AttentionFactors

    torch.manual_seed(0)
    head = AttentionAffinity(16)
    queries = (0.3 * torch.randn(2, 16, 49, 8)).requires_grad_()
    keys = (0.3 * torch.randn(2, 16, 49, 8)).requires_grad_()
    affinity = head(AttentionFactors(queries, keys))
    logits = queries @ keys.transpose(-2, -1)
    conv = torch.nn.functional.conv2d(logits + logits.transpose(-2, -1), head.weight, head.bias)
    expected = torch.sigmoid(conv)[:, 0]
    torch.testing.assert_close(affinity, expected, atol=1e-6, rtol=1e-5)
    weights = torch.rand_like(expected)
    grads = torch.autograd.grad((affinity * weights).sum(), (queries, keys, head.weight, head.bias))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (queries, keys, head.weight, head.bias))
    for grad, reference in zip(grads, expected_grads):
        torch.testing.assert_close(grad, reference, atol=1e-5, rtol=1e-4)



@pytest.mark.parametrize("strides", [(4, 2, 2, 1), (4, 2, 1, 1), (4, 2, 2, 2)])
def test_encoder_names_its_smallest_input_instead_of_a_raw_conv_error(strides, monkeypatch):
    from afa.models.mit import ImageTooSmallError, MixTransformer

    encoder = build_mit("tiny", strides=strides).eval()
    smallest = encoder.min_input_size
    with torch.no_grad():
        encoder(torch.zeros(1, 3, smallest, smallest + 7))
        with pytest.raises(ImageTooSmallError, match=f"at least {smallest}×{smallest} px, got {smallest - 1}×64"):
            encoder(torch.zeros(1, 3, smallest - 1, 64))
        monkeypatch.setattr(MixTransformer, "min_input_size", 0)  # the bound is exact: one pixel less fails in torch
        with pytest.raises(RuntimeError, match="Kernel size can't be greater"):
            encoder(torch.zeros(1, 3, smallest - 1, 64))

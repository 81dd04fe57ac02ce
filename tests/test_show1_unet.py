"""Show1UNet3DConditionModel: checkpoint compatibility, golden parity, config validation, training and processors."""

import inspect
import json
import logging

import pytest
import torch
from diffusers.models.activations import GEGLU
from diffusers.models.attention_processor import AttnAddedKVProcessor2_0, AttnProcessor, AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D, TemporalConvLayer
from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel
from safetensors.torch import load_file

from motion_adapters.models import (
    Show1UNet3DConditionModel,
    Show1UNet3DConditionOutput,
    show1_base_config,
    show1_interpolation_config,
    show1_sr1_config,
)


def _fixture_config(show1_fixture_dir, **overrides):
    config = json.loads((show1_fixture_dir / "unet" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    return {**config, **overrides}


def _tiny_inputs(batch=2, frames=3, height=8, width=8, channels=3, text_dim=64):
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, channels, frames, height, width, generator=generator)
    text = torch.randn(batch, 5, text_dim, generator=generator)
    return sample, torch.tensor([10, 700][:batch]), text


@pytest.fixture
def fixture_unet(show1_fixture_dir):
    return Show1UNet3DConditionModel.from_pretrained(show1_fixture_dir / "unet")


@pytest.fixture
def golden(show1_fixture_dir):
    return load_file(show1_fixture_dir / "inputs.safetensors"), load_file(show1_fixture_dir / "expected.safetensors")


def _meta_unet(config):
    with torch.device("meta"):
        return Show1UNet3DConditionModel(**config)


# --- checkpoint compatibility -----------------------------------------------------------------------------------


def test_constructor_accepts_every_key_of_the_reference_config(show1_fixture_dir):
    accepted = set(inspect.signature(Show1UNet3DConditionModel.__init__).parameters) - {"self"}
    missing = set(_fixture_config(show1_fixture_dir)) - accepted
    assert not missing, f"config keys the constructor does not take: {sorted(missing)}"
    assert set(show1_base_config()) == set(_fixture_config(show1_fixture_dir))


def test_from_pretrained_loads_reference_checkpoint_without_key_mismatch_or_warnings(show1_fixture_dir):
    records = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    diffusers_logger = logging.getLogger("diffusers")
    diffusers_logger.addHandler(handler)
    try:
        unet, info = Show1UNet3DConditionModel.from_pretrained(show1_fixture_dir / "unet", output_loading_info=True)
    finally:
        diffusers_logger.removeHandler(handler)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    assert [r.getMessage() for r in records] == []
    assert not unet.training


def test_forward_reproduces_reference_output(fixture_unet, golden):
    inputs, expected = golden
    with torch.no_grad():
        out = fixture_unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])
    assert isinstance(out, Show1UNet3DConditionOutput)
    assert out.sample.shape == expected["sample"].shape == (2, 6, 4, 16, 24)
    rel_error = ((out.sample - expected["sample"]).norm() / expected["sample"].norm()).item()
    assert rel_error < 1e-4, rel_error


def test_full_size_base_model_has_exactly_the_published_keys_and_shapes(show1_key_table):
    expected = {}
    for line in show1_key_table.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split("\t")
            expected[key] = shape
    ours = {k: "x".join(map(str, v.shape)) for k, v in _meta_unet(show1_base_config()).state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(ours)), sorted(set(ours) - set(expected))
    wrong = sorted(
        f"{k}: ours {ours[k]} vs {expected[k]}" for k in set(ours) & set(expected) if ours[k] != expected[k]
    )
    print("missing:", missing, "\nunexpected:", unexpected, "\nwrong shapes:", wrong)
    assert not missing and not unexpected and not wrong
    assert len(ours) == 1827


def test_interpolation_and_sr1_configs_build():
    interpolation = _meta_unet(show1_interpolation_config())
    assert interpolation.conv_in.in_channels == 7 and interpolation.conv_out.out_channels == 6
    sr1 = _meta_unet(show1_sr1_config())
    assert sr1.conv_in.in_channels == 6 and sr1.class_embedding is not None
    assert [len(b.resnets) for b in sr1.down_blocks] == [2, 2, 3, 4, 2]


def test_save_and_reload_round_trip_keeps_output(fixture_unet, tmp_path):
    sample, timestep, text = _tiny_inputs()
    fixture_unet.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "Show1UNet3DConditionModel"
    reloaded = Show1UNet3DConditionModel.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(sample, timestep, text).sample, fixture_unet(sample, timestep, text).sample
        )


# --- temporal attention layout and processors ---------------------------------------------------------------------


def test_temporal_attention_is_64_heads_double_self_attention_without_qkv_bias():
    unet = _meta_unet(show1_base_config())
    temporal = {n: m for n, m in unet.named_modules() if isinstance(m, TransformerTemporalModel)}
    assert len(temporal) == 22
    assert "down_blocks.1.temp_attentions.0" in temporal and "up_blocks.2.temp_attentions.3" in temporal
    block = unet.get_submodule("down_blocks.2.temp_attentions.1.transformer_blocks.0")
    for attn in (block.attn1, block.attn2):
        assert attn.heads == 64 and attn.to_q.out_features // attn.heads == 960 // 64
        assert not attn.is_cross_attention
        assert attn.to_q.bias is None and attn.to_k.bias is None and attn.to_v.bias is None
    assert isinstance(block.ff.net[0], GEGLU)
    qkv = [
        n
        for n, m in unet.named_modules()
        if ".temp_attentions." in n and n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v")
    ]
    assert len(qkv) == 132
    assert unet.get_submodule("mid_block.temp_attentions.0.transformer_blocks.0.attn1.to_q").in_features == 1280


def test_default_processors_are_sdpa_and_include_temporal_attention(fixture_unet):
    processors = fixture_unet.attn_processors
    temporal = {k: v for k, v in processors.items() if ".temp_attentions." in k}
    spatial = {k: v for k, v in processors.items() if ".attentions." in k}
    assert len(temporal) == 2 * 7 and len(spatial) == 7
    assert all(type(p) is AttnProcessor2_0 for p in temporal.values())
    assert all(type(p) is AttnAddedKVProcessor2_0 for p in spatial.values())
    assert "up_blocks.0.temp_attentions.1.transformer_blocks.0.attn2.processor" in temporal


def test_set_attn_processor_reaches_temporal_attention(fixture_unet):
    sample, timestep, text = _tiny_inputs()
    with torch.no_grad():
        before = fixture_unet(sample, timestep, text).sample
    processors = {
        k: (AttnProcessor() if ".temp_attentions." in k else v) for k, v in fixture_unet.attn_processors.items()
    }
    fixture_unet.set_attn_processor(processors)
    temporal = [v for k, v in fixture_unet.attn_processors.items() if ".temp_attentions." in k]
    assert temporal and all(type(p) is AttnProcessor for p in temporal)
    with torch.no_grad():
        torch.testing.assert_close(fixture_unet(sample, timestep, text).sample, before, rtol=1e-4, atol=1e-5)
    fixture_unet.set_default_attn_processor()
    assert all(type(v) is AttnProcessor2_0 for k, v in fixture_unet.attn_processors.items() if ".temp_" in k)


# --- training: gradient checkpointing, eval mode ------------------------------------------------------------------


def _loss_and_grads(unet, inputs):
    unet.zero_grad(set_to_none=True)
    out = unet(*inputs).sample
    loss = (out - 0.5).pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_same_loss_and_gradients(fixture_unet):
    inputs = _tiny_inputs()
    fixture_unet.train()
    for module in fixture_unet.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    loss, grads = _loss_and_grads(fixture_unet, inputs)
    fixture_unet.enable_gradient_checkpointing()
    assert fixture_unet.is_gradient_checkpointing
    loss_ckpt, grads_ckpt = _loss_and_grads(fixture_unet, inputs)
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads.keys() == grads_ckpt.keys() and len(grads) == len(list(fixture_unet.parameters()))
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], msg=name)


def test_gradient_checkpointing_wraps_every_sublayer_of_every_block(fixture_unet):
    inputs = _tiny_inputs()
    wrapped = []

    def recording_checkpoint(module, *args):
        wrapped.append(type(module).__name__)
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    fixture_unet.train()
    fixture_unet.enable_gradient_checkpointing(gradient_checkpointing_func=recording_checkpoint)
    fixture_unet(*inputs).sample.mean().backward()
    counts = {name: wrapped.count(name) for name in set(wrapped)}
    # Every ResNet (samplers included), temporal conv, joint attention and temporal attention ran checkpointed.
    num_resnets = sum(isinstance(m, ResnetBlock2D) for m in fixture_unet.modules())
    assert counts["ResnetBlock2D"] == num_resnets
    assert counts["TemporalConvLayer"] == sum(isinstance(m, TemporalConvLayer) for m in fixture_unet.modules())
    assert counts["TransformerTemporalModel"] == 7 and counts["Attention"] == 7


def test_forward_never_switches_to_train_mode(fixture_unet):
    sample, timestep, text = _tiny_inputs()
    fixture_unet.enable_gradient_checkpointing()
    with torch.no_grad():
        first = fixture_unet(sample, timestep, text).sample
        second = fixture_unet(sample, timestep, text).sample
    assert not any(m.training for m in fixture_unet.modules())
    torch.testing.assert_close(first, second, rtol=0, atol=0)


# --- conditioning and inputs --------------------------------------------------------------------------------------


def test_timestep_accepts_number_scalar_tensor_and_batch_tensor_alike(fixture_unet):
    sample, _, text = _tiny_inputs()
    with torch.no_grad():
        outs = [fixture_unet(sample, t, text).sample for t in (500, torch.tensor(500), torch.tensor([500, 500]))]
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(outs[0], outs[2])


def test_class_labels_condition_the_super_resolution_unet(show1_fixture_dir):
    torch.manual_seed(0)
    unet = Show1UNet3DConditionModel(**_fixture_config(show1_fixture_dir, class_embed_type="timestep")).eval()
    sample, timestep, text = _tiny_inputs()
    with torch.no_grad():
        low, high = (unet(sample, timestep, text, class_labels=level).sample for level in (20, 250))
    assert low.shape == (2, 6, 3, 8, 8) and not torch.allclose(low, high)
    with pytest.raises(ValueError, match="class_labels"):
        unet(sample, timestep, text)


def test_transformer_in_option_adds_a_temporal_transformer_after_conv_in(show1_fixture_dir):
    unet = Show1UNet3DConditionModel(**_fixture_config(show1_fixture_dir, transfromer_in_opt=True)).eval()
    assert unet.transformer_in.transformer_blocks[0].attn1.heads == 8
    assert "transformer_in.transformer_blocks.0.attn1.processor" in unet.attn_processors
    sample, timestep, text = _tiny_inputs()
    with torch.no_grad():
        assert unet(sample, timestep, text).sample.shape == (2, 6, 3, 8, 8)
    wrapped = []

    def recording_checkpoint(module, *args):
        wrapped.append(module)
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    unet.enable_gradient_checkpointing(gradient_checkpointing_func=recording_checkpoint)
    unet(sample, timestep, text).sample.mean().backward()
    assert any(module is unet.transformer_in for module in wrapped)


def test_all_ones_attention_mask_equals_no_mask(fixture_unet):
    sample, timestep, text = _tiny_inputs()
    with torch.no_grad():
        plain = fixture_unet(sample, timestep, text).sample
        masked = fixture_unet(sample, timestep, text, attention_mask=torch.ones(2, 5)).sample
        dropped = fixture_unet(sample, timestep, text, attention_mask=torch.tensor([[1, 1, 0, 0, 0]] * 2)).sample
    torch.testing.assert_close(masked, plain)
    assert not torch.allclose(dropped, plain)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (((2, 3, 8, 8), (2, 5, 64)), "`sample` must be"),
        (((2, 3, 3, 6, 8), (2, 5, 64)), "multiples of 4"),
        (((2, 3, 3, 8, 8), (1, 5, 64)), "`encoder_hidden_states` must be"),
        (((2, 3, 3, 8, 8), (2, 5, 32)), "feature size 32"),
    ],
)
def test_bad_shapes_raise_naming_the_argument(fixture_unet, args, match):
    sample_shape, text_shape = args
    with pytest.raises(ValueError, match=match):
        fixture_unet(torch.randn(sample_shape), 1, torch.randn(text_shape))


def test_bad_timestep_shape_raises(fixture_unet):
    sample, _, text = _tiny_inputs()
    with pytest.raises(ValueError, match=r"`timestep` must be a number or a tensor of shape \(\) or \(2,\)"):
        fixture_unet(sample, torch.tensor([1, 2, 3]), text)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("dual_cross_attention", True, "`dual_cross_attention=True` is not supported"),
        ("num_attention_heads", 8, "`num_attention_heads=8` is not supported"),
        ("time_embedding_type", "fourier", "`time_embedding_type='fourier'`"),
        ("class_embed_type", "projection", "`class_embed_type='projection'`"),
        ("transformer_layers_per_block", 2, "`transformer_layers_per_block=2` is not supported"),
        ("attention_head_dim", [64, 64, 64], "`attention_head_dim` must be one int"),
        ("mid_block_type", "UNetMidBlock3DCrossAttn", "`mid_block_type='UNetMidBlock3DCrossAttn'`"),
        ("layers_per_block", [1, 1], "`layers_per_block` has 2 entries"),
        ("norm_num_groups", None, "`norm_num_groups=None`"),
    ],
)
def test_unsupported_config_values_raise_naming_the_key(show1_fixture_dir, key, value, match):
    with pytest.raises(ValueError, match=match):
        Show1UNet3DConditionModel(**_fixture_config(show1_fixture_dir, **{key: value}))


def test_unsupported_block_type_raises_naming_the_key(show1_fixture_dir):
    config = _fixture_config(show1_fixture_dir)
    config["down_block_types"] = ["CrossAttnDownBlock3D"] + config["down_block_types"][1:]
    with pytest.raises(ValueError, match=r"`down_block_types` has unsupported blocks \['CrossAttnDownBlock3D'\]"):
        Show1UNet3DConditionModel(**config)


# --- frame embeddings (not in Show-1; off by default) -------------------------------------------------------------


def test_frame_embeddings_are_off_by_default_and_zero_initialised_tables_change_nothing(show1_fixture_dir, tmp_path):
    plain = Show1UNet3DConditionModel.from_pretrained(show1_fixture_dir / "unet").eval()
    assert not any(".frame_embeddings." in name for name, _ in plain.named_parameters())
    config = _fixture_config(show1_fixture_dir, frame_embedding_frames=4)
    unet = Show1UNet3DConditionModel(**config).eval()
    missing, unexpected = unet.load_state_dict(plain.state_dict(), strict=False)
    attention_layers = sum(len(b.temp_attentions) for b in [*unet.down_blocks, unet.mid_block, *unet.up_blocks])
    assert not unexpected and len(missing) == attention_layers > 0
    assert all(".frame_embeddings." in key for key in missing)
    sample, timestep, text = _tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(unet(sample, timestep, text).sample, plain(sample, timestep, text).sample)
        for name, table in unet.named_parameters():
            if ".frame_embeddings." in name:
                table.copy_(torch.randn_like(table))
        changed = unet(sample, timestep, text).sample
        assert not torch.allclose(changed, plain(sample, timestep, text).sample, atol=1e-4)
        # swapping two frames' embeddings changes the output: the layers now know which frame is which
        reordered = unet(sample.flip(2), timestep, text).sample.flip(2)
        assert not torch.allclose(changed, reordered, atol=1e-4)
    unet.save_pretrained(tmp_path)
    reloaded = Show1UNet3DConditionModel.from_pretrained(tmp_path).eval()
    assert reloaded.config.frame_embedding_frames == 4
    with torch.no_grad():
        torch.testing.assert_close(reloaded(sample, timestep, text).sample, changed)


def test_frame_embeddings_refuse_more_frames_than_rows_and_bad_values(show1_fixture_dir):
    unet = Show1UNet3DConditionModel(**_fixture_config(show1_fixture_dir, frame_embedding_frames=2)).eval()
    sample, timestep, text = _tiny_inputs(frames=3)
    with pytest.raises(ValueError, match="frame_embedding_frames"), torch.no_grad():
        unet(sample, timestep, text)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="frame_embedding_frames"):
            Show1UNet3DConditionModel(**_fixture_config(show1_fixture_dir, frame_embedding_frames=bad))


# --- spatially wide temporal convolutions (not in Show-1; off by default) -----------------------------------------


def test_wide_temporal_convs_start_equal_to_the_narrow_unet_then_read_neighbouring_pixels(fixture_unet, tmp_path):
    from motion_adapters.models.extensions import extend_unet

    plain = fixture_unet.eval()
    wide = extend_unet(plain, temporal_conv_spatial_kernel=3).eval()
    assert wide.config.temporal_conv_spatial_kernel == 3 and plain.config.temporal_conv_spatial_kernel == 1
    convs = [m for name, m in wide.named_modules() if name.endswith("conv1.2") and ".temp_convs." in name]
    assert convs and all(conv.kernel_size == (3, 3, 3) and conv.padding == (1, 1, 1) for conv in convs)
    sample, timestep, text = _tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(wide(sample, timestep, text).sample, plain(sample, timestep, text).sample)
        for conv in convs:  # give the new off-centre taps weight: now a pixel depends on its neighbours' past
            conv.weight[..., 0, 0] = torch.randn_like(conv.weight[..., 0, 0])
        changed = wide(sample, timestep, text).sample
        assert not torch.allclose(changed, plain(sample, timestep, text).sample, atol=1e-4)
    wide.save_pretrained(tmp_path)
    reloaded = Show1UNet3DConditionModel.from_pretrained(tmp_path).eval()
    assert reloaded.config.temporal_conv_spatial_kernel == 3
    with torch.no_grad():
        torch.testing.assert_close(reloaded(sample, timestep, text).sample, changed)
    # a narrow UNet refuses the wide weights with the shape error of diffusers' loader rather than loading garbage
    with pytest.raises((RuntimeError, ValueError), match="size|shape"):
        Show1UNet3DConditionModel.from_pretrained(tmp_path, temporal_conv_spatial_kernel=1)


def test_wide_temporal_convs_refuse_bad_kernels_and_narrowing(show1_fixture_dir, fixture_unet):
    from motion_adapters.models.extensions import extend_unet

    for bad in (0, 2, -3, 3.0, True):
        with pytest.raises(ValueError, match="temporal_conv_spatial_kernel"):
            Show1UNet3DConditionModel(**_fixture_config(show1_fixture_dir, temporal_conv_spatial_kernel=bad))
    wide = extend_unet(fixture_unet, temporal_conv_spatial_kernel=5)
    with pytest.raises(ValueError, match="drop weights"):
        extend_unet(wide, temporal_conv_spatial_kernel=3)
    with pytest.raises(ValueError, match="extension keys"):
        extend_unet(fixture_unet, block_out_channels=[8, 8])


# --- absolute coordinate features (not in Show-1; off by default) -------------------------------------------------


def test_coordinate_embedding_starts_at_zero_then_tells_the_unet_where_a_pixel_is(fixture_unet, tmp_path):
    from motion_adapters.models.extensions import CoordinateEmbedding, extend_unet

    features = CoordinateEmbedding(3, 4).features(8, 16)
    assert features.shape == (8, 16, 12)
    # y's then x's angles, sines before cosines: cos(pi * x) falls from the left edge to the right one, so no two
    # columns (or rows) are alike
    assert torch.all(features[0, 1:, 9] < features[0, :-1, 9]) and torch.all(features[1:, 0, 6] < features[:-1, 0, 6])
    assert torch.unique(features[0], dim=0).shape[0] == 16
    plain = fixture_unet.eval()
    placed = extend_unet(plain, coordinate_frequencies=3).eval()
    assert placed.config.coordinate_frequencies == 3 and plain.coordinate_embedding is None
    sample, timestep, text = _tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(placed(sample, timestep, text).sample, plain(sample, timestep, text).sample)
        placed.coordinate_embedding.proj.weight.normal_()
        changed = placed(sample, timestep, text).sample
        assert not torch.allclose(changed, plain(sample, timestep, text).sample, atol=1e-4)
        # a 16-wide frame gets features of fractions of its own width: the model runs at any size
        assert placed(torch.randn(1, 3, 2, 8, 16), timestep[:1], text[:1]).sample.shape[2:] == (2, 8, 16)
    placed.save_pretrained(tmp_path)
    reloaded = Show1UNet3DConditionModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(sample, timestep, text).sample, changed)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="coordinate_frequencies"):
            Show1UNet3DConditionModel(**{**dict(plain.config), "coordinate_frequencies": bad})

import warnings
import pytest
import torch
from tiny_models import run_unet, tiny_unet3d, tiny_unet_motion

from motion_adapters.injection import (
    adapter_infos,
    adapter_parameters,
    inject_temporal_adapter,
    merge_adapter,
    set_adapter_scales,
    unload_adapter,
)
from motion_adapters.targets import resolve_target

BACKBONES = [tiny_unet3d, tiny_unet_motion]


def _perturb(params, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("make", BACKBONES)
def test_temporal_alias_resolves_to_temporal_qkv_only(make):
    unet = make()
    names = resolve_target(unet, "temporal_attn.to_[qkv]")
    assert names and all(n.rsplit(".", 1)[1] in {"to_q", "to_k", "to_v"} for n in names)
    key = "motion_modules" if "Motion" in type(unet).__name__ else "temp_attentions"
    assert all(key in n or n.startswith("transformer_in.") for n in names)
    all_temporal_qkv = [
        n for n, m in unet.named_modules()
        if isinstance(m, torch.nn.Linear) and (key in n or n.startswith("transformer_in."))
        and n.rsplit(".", 1)[1] in {"to_q", "to_k", "to_v"}
    ]
    assert names == all_temporal_qkv
    assert len(resolve_target(unet, "temporal_attn.to_*")) == len(names) // 3 * 4  # to_out.0 too
    spatial = resolve_target(unet, "spatial_attn.to_[qkv]")
    assert spatial and not set(spatial) & set(names)


def test_regex_and_name_list_follow_peft_rules():
    unet = tiny_unet3d()
    regex = resolve_target(unet, r".*temp_attentions\.0\.transformer_blocks\.0\.attn1\.to_q")
    assert sorted(regex) == ["down_blocks.0.temp_attentions.0.transformer_blocks.0.attn1.to_q",
                     "mid_block.temp_attentions.0.transformer_blocks.0.attn1.to_q",
                     "up_blocks.1.temp_attentions.0.transformer_blocks.0.attn1.to_q"]
    listed = resolve_target(unet, ["transformer_in.transformer_blocks.0.attn1.to_q"])
    assert listed == ["transformer_in.transformer_blocks.0.attn1.to_q"]


def test_pattern_matching_nothing_lists_closest_names():
    unet = tiny_unet3d()
    with pytest.raises(ValueError, match=r"target='temporal_attn.to_qq' matches no module of UNet3DConditionModel\. Closest Linear module names: .*to_q"):
        inject_temporal_adapter(unet, "temporal_attn.to_qq")
    with pytest.raises(ValueError, match="matches modules that are not nn.Linear"):
        resolve_target(unet, r".*temp_attentions\.\d+")


@pytest.mark.parametrize("make", BACKBONES)
def test_full_mode_trains_exactly_the_matched_weights(make):
    unet = make()
    info = inject_temporal_adapter(unet, mode="full")
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.weight" for m in info.module_names}
    assert info.num_parameters == sum(p.numel() for n, p in unet.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("make", BACKBONES)
def test_zero_initialised_lora_leaves_outputs_identical(make):
    unet = make()
    before = run_unet(unet)
    info = inject_temporal_adapter(unet, mode="lora", r=4)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert len(trainable) == 2 * len(info.module_names)
    torch.testing.assert_close(run_unet(unet), before, rtol=0, atol=0)


def test_lora_unload_and_merge_restore_or_fold_the_adapter():
    unet = tiny_unet3d()
    base = run_unet(unet)
    inject_temporal_adapter(unet, mode="lora", r=4)
    _perturb(adapter_parameters(unet))
    adapted = run_unet(unet)
    assert not torch.allclose(adapted, base)
    merge_adapter(unet)
    torch.testing.assert_close(run_unet(unet), adapted, rtol=1e-3, atol=2e-3)  # float32 merge rounding
    assert not any("lora" in n for n, _ in unet.named_parameters())

    unet2 = tiny_unet3d()
    inject_temporal_adapter(unet2, mode="lora", r=4)
    _perturb(adapter_parameters(unet2))
    unload_adapter(unet2)
    torch.testing.assert_close(run_unet(unet2), base, rtol=0, atol=0)
    assert adapter_infos(unet2) == {}
    assert not hasattr(unet2, "peft_config")  # nothing of the adapter is left for peft to find
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # peft warns "Already found a peft_config" when one was left behind
        inject_temporal_adapter(unet2, mode="lora", r=4)


def test_full_unload_restores_base_weights():
    unet = tiny_unet3d()
    base = run_unet(unet)
    inject_temporal_adapter(unet, mode="full")
    _perturb(adapter_parameters(unet))
    assert not torch.allclose(run_unet(unet), base)
    unload_adapter(unet)
    torch.testing.assert_close(run_unet(unet), base, rtol=0, atol=0)


def test_two_lora_adapters_combine_and_scale():
    unet = tiny_unet3d()
    base = run_unet(unet)
    inject_temporal_adapter(unet, mode="lora", r=4, adapter_name="a")
    inject_temporal_adapter(unet, mode="lora", r=4, adapter_name="b")
    _perturb(adapter_parameters(unet, "a"), seed=1)
    _perturb(adapter_parameters(unet, "b"), seed=2)
    set_adapter_scales(unet, ["a"], [1.0])
    only_a = run_unet(unet)
    set_adapter_scales(unet, ["a", "b"], [0.0, 0.0])
    torch.testing.assert_close(run_unet(unet), base, rtol=1e-5, atol=1e-6)
    set_adapter_scales(unet, ["a", "b"], [1.0, 1.0])
    both = run_unet(unet)
    assert not torch.allclose(both, only_a)
    with pytest.raises(ValueError, match=r"no adapter named \['c'\]"):
        set_adapter_scales(unet, ["c"])


def test_second_full_adapter_and_duplicate_names_are_refused():
    unet = tiny_unet3d()
    inject_temporal_adapter(unet, mode="full")
    with pytest.raises(ValueError, match="adapter_name='default' is already on this model"):
        inject_temporal_adapter(unet, mode="lora")
    with pytest.raises(ValueError, match="a full-mode adapter is already on this model"):
        inject_temporal_adapter(unet, mode="full", adapter_name="other")
    with pytest.raises(ValueError, match="adapter_name='forward' is a torch.nn.Module attribute"):
        inject_temporal_adapter(tiny_unet3d(), mode="lora", adapter_name="forward")
    with pytest.raises(ValueError, match="mode='dora' is not supported"):
        inject_temporal_adapter(tiny_unet3d(), mode="dora")


def test_show1_base_temporal_qkv_is_the_papers_132_matrices():
    from motion_adapters.models import Show1UNet3DConditionModel, show1_base_config

    with torch.device("meta"):
        unet = Show1UNet3DConditionModel(**show1_base_config())
    names = resolve_target(unet, "temporal_attn.to_[qkv]")
    assert len(names) == 132
    assert sum(unet.get_submodule(n).weight.numel() for n in names) == 134_553_600
    assert "up_blocks.2.temp_attentions.3.transformer_blocks.0.attn2.to_v" in names

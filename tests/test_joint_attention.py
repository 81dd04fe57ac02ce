"""Show-1's spatial (joint) attention with its frozen pixel projections stacked into one GEMM."""

import pytest
import torch
from diffusers.models.attention_processor import AttnAddedKVProcessor2_0

from motion_adapters.models.blocks_show1 import joint_attention
from motion_adapters.training_step import StackedJointAttnProcessor, stacked_joint_attention


def _layer(frozen: bool = True):
    torch.manual_seed(0)
    attn = joint_attention(64, 16, cross_attention_dim=64, norm_num_groups=8)  # 4 heads of 16, text states of 64
    for p in attn.parameters():
        p.requires_grad_(not frozen)
    return attn


def _run(attn, x, text):
    out = attn(x, encoder_hidden_states=text)
    return (out, *torch.autograd.grad(out.square().sum(), (x, text)))


def test_stacked_projections_compute_the_joint_attention_and_its_input_gradients():
    attn = _layer()
    x = torch.randn(3, 64, 5, 6, requires_grad=True)  # (frames, C, H, W)
    text = torch.randn(3, 7, 64, requires_grad=True)
    expected = _run(attn, x, text)
    linear = torch.nn.functional.linear
    calls = []

    def counted(input, weight, bias=None):
        calls.append(tuple(weight.shape))
        return linear(input, weight, bias)

    attn.set_processor(StackedJointAttnProcessor())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.functional, "linear", counted)
        got = _run(attn, x, text)
    assert (192, 64) in calls  # the stacked (3C, C) projection ran
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_trainable_projections_go_to_diffusers_processor(monkeypatch):
    calls = []
    fallback = AttnAddedKVProcessor2_0.__call__
    monkeypatch.setattr(AttnAddedKVProcessor2_0, "__call__", lambda *a, **k: calls.append(1) or fallback(*a, **k))
    x, text = torch.randn(2, 64, 3, 4), torch.randn(2, 7, 64)
    trainable = _layer(frozen=False)
    trainable.set_processor(StackedJointAttnProcessor())
    trainable(x, encoder_hidden_states=text)
    assert calls == [1]  # trainable projections: their gradients must flow, the fallback runs
    frozen = _layer()
    frozen.set_processor(StackedJointAttnProcessor())
    frozen(x, encoder_hidden_states=text)
    assert calls == [1]  # frozen: the stacked path


def test_context_installs_the_processor_on_joint_layers_only_and_restores_them():
    from fixtures_tiny import tiny_unet

    unet = tiny_unet("base")
    before = {name: type(m.processor) for name, m in unet.named_modules() if hasattr(m, "processor")}
    joint = [name for name, kind in before.items() if kind is AttnAddedKVProcessor2_0]
    assert joint
    with stacked_joint_attention(unet, True) as count:
        during = {name: type(m.processor) for name, m in unet.named_modules() if hasattr(m, "processor")}
        assert count == len(joint)
        assert all(during[name] is StackedJointAttnProcessor for name in joint)
        assert all(during[name] is kind for name, kind in before.items() if name not in joint)
    assert {name: type(m.processor) for name, m in unet.named_modules() if hasattr(m, "processor")} == before
    with stacked_joint_attention(unet, False) as count:
        assert count == 0

"""Show-1's spatial (joint) attention: frozen pixel projections stacked into one GEMM, the text's keys and values kept."""

import pytest
import torch
from diffusers.models.attention_processor import AttnAddedKVProcessor2_0

from motion_adapters.models.blocks_show1 import joint_attention
from motion_adapters.training_step import JointAttnProcessor, joint_attention_processors


def _layer(frozen: bool = True):
    torch.manual_seed(0)
    attn = joint_attention(64, 16, cross_attention_dim=64, norm_num_groups=8)  # 4 heads of 16, text states of 64
    for p in attn.parameters():
        p.requires_grad_(not frozen)
    return attn


def _run(attn, x, text):
    out = attn(x, encoder_hidden_states=text)
    return (out, *torch.autograd.grad(out.square().sum(), (x, text)))


@pytest.mark.parametrize("token_rows", [True, False])
def test_stacked_projections_compute_the_joint_attention_and_its_input_gradients(monkeypatch, token_rows):
    from motion_adapters import training_step

    monkeypatch.setattr(training_step, "JOINT_KV_TOKEN_ROWS", token_rows)
    attn = _layer()
    x = torch.randn(3, 64, 5, 6, requires_grad=True)  # (frames, C, H, W)
    text = torch.randn(3, 7, 64, requires_grad=True)
    expected = _run(attn, x, text)
    linear = torch.nn.functional.linear
    calls = []

    def counted(input, weight, bias=None):
        calls.append(tuple(weight.shape))
        return linear(input, weight, bias)

    attn.set_processor(JointAttnProcessor())
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
    trainable.set_processor(JointAttnProcessor())
    trainable(x, encoder_hidden_states=text)
    assert calls == [1]  # trainable projections: their gradients must flow, the fallback runs
    frozen = _layer()
    frozen.set_processor(JointAttnProcessor())
    frozen(x, encoder_hidden_states=text)
    assert calls == [1]  # frozen: the stacked path


def test_context_installs_the_processor_on_joint_layers_only_and_restores_them():
    from fixtures_tiny import tiny_unet

    unet = tiny_unet("base")
    before = {name: type(m.processor) for name, m in unet.named_modules() if hasattr(m, "processor")}
    joint = [name for name, kind in before.items() if kind is AttnAddedKVProcessor2_0]
    assert joint
    with joint_attention_processors(unet, stack_pixels=False, memo_text=True) as count:
        during = {name: m.processor for name, m in unet.named_modules() if hasattr(m, "processor")}
        assert count == len(joint)
        assert all(type(during[name]) is JointAttnProcessor for name in joint)
        memo = during[joint[0]].text_memo
        assert memo == {} and all(during[name].text_memo is memo and not during[name].stack_pixels for name in joint)
        assert all(type(during[name]) is kind for name, kind in before.items() if name not in joint)
        memo["entry"] = 1
    assert memo == {}  # the kept keys and values are dropped with the run
    assert {name: type(m.processor) for name, m in unet.named_modules() if hasattr(m, "processor")} == before
    with joint_attention_processors(unet, stack_pixels=False, memo_text=False) as count:
        assert count == 0


def _counting_text_projections(attn):
    calls = []
    for proj in (attn.add_k_proj, attn.add_v_proj):
        proj.register_forward_hook(lambda module, args, out: calls.append(module))
    return calls


@pytest.mark.parametrize("token_rows", [True, False])
def test_kept_text_keys_and_values_give_the_same_outputs_and_gradients_computed_once(monkeypatch, token_rows):
    from motion_adapters import training_step

    monkeypatch.setattr(training_step, "JOINT_KV_TOKEN_ROWS", token_rows)
    attn = _layer()
    x = torch.randn(3, 64, 5, 6, requires_grad=True)
    text = torch.randn(3, 7, 64)  # the prompt's embedding: no gradient, as in training
    reference = _layer()
    expected = [reference(x, encoder_hidden_states=text) for _ in range(2)]
    calls = _counting_text_projections(attn)
    attn.set_processor(JointAttnProcessor(stack_pixels=False, text_memo={}))
    got = [attn(x, encoder_hidden_states=text) for _ in range(2)]
    assert len(calls) == 2  # k and v of the text once, for two calls
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    (gx,) = torch.autograd.grad(got[1].square().sum(), x)
    (ex,) = torch.autograd.grad(expected[1].square().sum(), x)
    torch.testing.assert_close(gx, ex, rtol=0, atol=0)


def test_kept_text_keys_and_values_are_recomputed_when_what_they_depend_on_changes():
    attn = _layer()
    x, text = torch.randn(2, 64, 3, 4), torch.randn(2, 7, 64)
    calls = _counting_text_projections(attn)
    attn.set_processor(JointAttnProcessor(stack_pixels=False, text_memo={}))

    def check(text):
        expected = AttnAddedKVProcessor2_0()(attn, x, text)
        torch.testing.assert_close(attn(x, encoder_hidden_states=text), expected, rtol=0, atol=0)

    check(text)
    assert len(calls) == 4  # computed (2) + the reference (2)
    text.mul_(2)  # the same tensor modified in place
    check(text)
    assert len(calls) == 8
    check(text.clone())  # another tensor
    assert len(calls) == 12
    with torch.no_grad():
        attn.add_k_proj.weight.add_(1.0)  # a frozen weight changed (a new checkpoint loaded in place)
    check(text)
    assert len(calls) == 16
    check(text)
    assert len(calls) == 18  # kept: only the reference computed them
    attn.add_v_proj.weight.requires_grad_(True)  # trainable: never kept
    check(text)
    check(text)
    assert len(calls) == 26


def test_a_training_run_keeps_the_unets_text_results_and_every_layers_text_keys_values():
    """Under `joint_attention_processors(memo_text=True)` two steps with one prompt tensor compute the text
    projection, the pooled-text embedding and each layer's text keys and values once, and give bitwise the same
    output and input gradient as without it; on exit nothing is kept."""
    from fixtures_tiny import TEXT_DIM, tiny_unet

    unet = tiny_unet("base").requires_grad_(False)
    x, t = torch.randn(1, 3, 4, 8, 8), torch.tensor([500])
    text = torch.randn(1, 7, TEXT_DIM)
    calls = []
    watched = [unet.encoder_hid_proj] + [m.add_k_proj for m in unet.modules() if getattr(m, "add_k_proj", None)]
    if unet.add_embedding is not None:
        watched.append(unet.add_embedding)
    for module in watched:
        module.register_forward_hook(lambda module, args, out: calls.append(module))

    def step():
        sample = x.clone().requires_grad_(True)
        out = unet(sample, t, text).sample
        return out, torch.autograd.grad(out.square().sum(), sample)[0]

    expected = [step(), step()]
    assert len(calls) == 2 * len(watched)
    calls.clear()
    with joint_attention_processors(unet, stack_pixels=False, memo_text=True):
        got = [step(), step()]
        assert unet.text_memo
    assert len(calls) == len(watched)  # once for the two steps
    assert unet.text_memo is None
    for (out, grad), (want, want_grad) in zip(got, expected):
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        torch.testing.assert_close(grad, want_grad, rtol=0, atol=0)

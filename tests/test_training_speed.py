"""The speed and memory options of train_motion: frozen-weight dtype, selective checkpointing, compile, graphs."""

import contextlib
import functools
import json

import pytest
import torch
from diffusers import DDPMScheduler
from scripts import load_script
from tiny_models import tiny_unet3d

from motion_adapters.config import MotionDistillationConfig
from motion_adapters.injection import inject_temporal_adapter
from motion_adapters.models import Show1UNet3DConditionModel, show1_base_config
from motion_adapters.training import train_motion
from motion_adapters.training_step import autocast_dtype, keep_implementation_flags, use_cuda_graph

bench_training = load_script("benchmarks/bench_training.py")
TINY_SHOW1 = bench_training.TINY  # the benchmark's --tiny UNet, so the test and the smoke run share one config


def tiny_show1(seed=0):
    torch.manual_seed(seed)
    return Show1UNet3DConditionModel(**{**show1_base_config(), **TINY_SHOW1})


def clip(channels=3, frames=4, size=8):
    video = -torch.ones(channels, frames, size, size)
    for f in range(frames):
        video[:, f, 2:5, f : f + 3] = 1.0
    return video


def embeds(dim):
    return torch.randn(1, 7, dim, generator=torch.Generator().manual_seed(3))


def scheduler():
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


def cfg(**kw):
    return MotionDistillationConfig(
        **{"max_train_steps": 3, "learning_rate": 1e-3, "num_frames": 4, "checkpointing_steps": 0, **kw}
    )


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_frozen_weights_train_in_compute_dtype_and_come_back_exactly(mode):
    unet = tiny_show1()
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    seen = {}

    def look(state):
        seen["conv_in"] = state.unet.conv_in.weight.dtype
        seen["trained"] = {p.dtype for n, p in state.unet.named_parameters() if p.requires_grad}

    config = cfg(mode=mode, mixed_precision="bf16", frozen_dtype="compute")
    result = train_motion(unet, clip(), embeds(64), scheduler(), config, callbacks=[look], progress=False)
    assert seen == {"conv_in": torch.bfloat16, "trained": {torch.float32}}
    assert result.extra["frozen_weights_cast"] > 0 and result.extra["compute_dtype"] == "bfloat16"
    adapted = {f"{m}.weight" for m in result.info.module_names} if mode == "full" else set()
    for name, p in unet.named_parameters():
        assert p.dtype == torch.float32, name
        if ".lora_" in name or name in adapted:
            continue
        torch.testing.assert_close(p.detach(), before[name.replace(".base_layer", "")], rtol=0, atol=0, msg=name)
    if mode == "full":
        moved = [n for n in adapted if not torch.equal(dict(unet.named_parameters())[n], before[n])]
        assert len(moved) == len(adapted)


def test_half_precision_unet_keeps_its_dtype_and_trains_fp32_masters():
    unet = tiny_show1().to(torch.bfloat16)
    seen = set()
    config = cfg(mixed_precision="bf16")
    train_motion(unet, clip(), embeds(64).to(torch.bfloat16), scheduler(), config, progress=False,
                 callbacks=[lambda s: seen.update(p.dtype for p in s.unet.parameters() if p.requires_grad)])
    assert seen == {torch.float32}
    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}


def test_backward_does_not_reach_layers_before_the_first_temporal_attention():
    unet = tiny_show1()
    inject_temporal_adapter(unet)
    needs_grad = {}
    for name in ("conv_in", "down_blocks.0", "down_blocks.1.attentions.0", "down_blocks.1.temp_attentions.0",
                 "mid_block", "up_blocks.2"):
        unet.get_submodule(name).register_forward_hook(
            lambda m, a, out, name=name: needs_grad.__setitem__(name, (out[0] if isinstance(out, tuple) else out)
                                                                 .requires_grad)
        )
    unet(torch.randn(1, 3, 4, 8, 8), torch.tensor([500]), embeds(64))
    assert needs_grad == {"conv_in": False, "down_blocks.0": False, "down_blocks.1.attentions.0": False,
                          "down_blocks.1.temp_attentions.0": True, "mid_block": True, "up_blocks.2": True}


def test_selective_checkpointing_gives_the_same_run_and_is_restored():
    plain = train_motion(tiny_show1(), clip(), embeds(64), scheduler(), cfg(), progress=False)
    unet = tiny_show1()
    flags = {}

    def look(state):
        flags.update({n: m.gradient_checkpointing for n, m in state.unet.named_modules()
                      if hasattr(m, "gradient_checkpointing") and n})

    config = cfg(gradient_checkpointing=["up_blocks.2", "up_blocks.1"])
    checkpointed = train_motion(unet, clip(), embeds(64), scheduler(), config, callbacks=[look], progress=False)
    assert {n for n, on in flags.items() if on} == {"up_blocks.2", "up_blocks.1"}
    assert not any(m.gradient_checkpointing for m in unet.modules() if hasattr(m, "gradient_checkpointing"))
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-5)


def test_checkpointing_an_unknown_block_names_it():
    with pytest.raises(ValueError, match=r"gradient_checkpointing names \['up_blocks.9'\], which are not modules"):
        train_motion(tiny_show1(), clip(), embeds(64), scheduler(), cfg(gradient_checkpointing=["up_blocks.9"]),
                     progress=False)


def test_step_seconds_are_reported_per_step():
    result = train_motion(tiny_unet3d(), clip(channels=4, size=8), embeds(16), scheduler(), cfg(), progress=False)
    assert len(result.extra["step_seconds"]) == 3 and result.extra["cuda_graph"] is False
    assert result.extra["memory_format"] == "contiguous"  # "auto" off CUDA: no Triton norms to keep the layout


def test_cuda_graph_yes_off_cuda_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"cuda_graph='yes' cannot capture this run: the UNet is on cpu, not CUDA"):
        train_motion(tiny_unet3d(), clip(channels=4, size=8), embeds(16), scheduler(), cfg(cuda_graph="yes"),
                     progress=False)
    assert use_cuda_graph("auto", torch.device("cuda"), scaled=False, checkpointing=False)
    assert not use_cuda_graph("auto", torch.device("cuda"), scaled=True, checkpointing=False)
    assert not use_cuda_graph("auto", torch.device("cuda"), scaled=False, checkpointing=["up_blocks.3"])


@pytest.mark.parametrize("choice", [True, False])
def test_cudnn_benchmark_is_set_on_cuda_only_and_the_callers_setting_stays(monkeypatch, choice):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", not choice)  # the caller's setting, other than asked
    seen = []
    result = train_motion(tiny_unet3d(), clip(channels=4, size=8), embeds(16), scheduler(),
                          cfg(cudnn_benchmark=choice), callbacks=[lambda state: seen.append(
                              torch.backends.cudnn.benchmark)], progress=False)  # fmt: skip
    # on CPU there is nothing to time: the caller's setting stays through the run
    assert seen == [not choice] * 3 and result.extra["cudnn_benchmark"] is False
    assert torch.backends.cudnn.benchmark is (not choice)


def test_auto_mixed_precision_follows_the_weights_on_cuda():
    cuda = torch.device("cuda")
    assert autocast_dtype("auto", cuda, torch.float16) == torch.float16
    assert autocast_dtype("auto", cuda, torch.bfloat16) == torch.bfloat16
    assert autocast_dtype("auto", torch.device("cpu"), torch.float32) is None
    assert autocast_dtype("bf16", torch.device("cpu"), torch.float32) == torch.bfloat16


def test_resumed_optimizer_keeps_its_own_implementation_flags():
    p = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([p], lr=1e-3)
    saved = [{**optimizer.param_groups[0], "fused": True, "capturable": True, "params": [0]}]
    (group,) = keep_implementation_flags(saved, optimizer)
    assert group["fused"] is None and group["capturable"] is False and group["lr"] == 1e-3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"frozen_dtype": "fp8"}, "frozen_dtype='fp8' is not supported: use one of 'auto', 'compute', 'keep'"),
        ({"norm_dtype": "bf16"}, "norm_dtype='bf16' is not supported: use one of 'auto', 'float32', 'compute'"),
        ({"compile": "reduce-overhead"}, "compile='reduce-overhead' is not supported"),
        ({"cuda_graph": True}, "cuda_graph=True is not supported: use one of 'auto', 'yes', 'no'"),
        ({"cudnn_benchmark": "yes"}, "cudnn_benchmark='yes' must be True or False"),
        ({"activation_memory_budget": 0.5}, "activation_memory_budget=0.5 only acts on a compiled UNet"),
        ({"activation_memory_budget": 0, "compile": "default"}, r"activation_memory_budget=0 must be a number in"),
        ({"gradient_checkpointing": []}, r"gradient_checkpointing=\[\] must be True, False or a non-empty list"),
    ],
)
def test_speed_options_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MotionDistillationConfig(**kwargs)


@pytest.mark.slow
def test_compiled_unet_trains_like_the_eager_one():
    eager = train_motion(tiny_unet3d(), clip(channels=4, size=8), embeds(16), scheduler(), cfg(), progress=False)
    fast = train_motion(tiny_unet3d(), clip(channels=4, size=8), embeds(16), scheduler(), cfg(compile="default"),
                        progress=False)
    assert fast.losses == pytest.approx(eager.losses, rel=1e-3, abs=1e-4)


@pytest.mark.parametrize("choice", ["conv2d", "math_attention", "fast", "triton_attention", "triton_fast"])
def test_fast_temporal_kernels_compute_the_same_function_and_are_undone(choice):
    from motion_adapters.frame_attention import FrameAttnProcessor
    from motion_adapters.training_step import FrameConv, ShortSequenceAttnProcessor, temporal_kernels

    kind = FrameAttnProcessor if choice.startswith("triton") else ShortSequenceAttnProcessor

    unet = tiny_show1().eval()
    x, text = torch.randn(1, 3, 4, 8, 8), embeds(64)
    names = [n for n, _ in unet.named_parameters()]
    temporal = sum(".temp_attentions." in key for key in unet.attn_processors)
    with torch.no_grad():
        reference = unet(x, torch.tensor([10]), text).sample
        with temporal_kernels(unet, choice):
            convs = sum(isinstance(m, FrameConv) for m in unet.modules())
            processors = sum(isinstance(p, kind) for p in unet.attn_processors.values())
            assert [n for n, _ in unet.named_parameters()] == names
            fast = unet(x, torch.tensor([10]), text).sample
    convs_expected = choice in ("conv2d", "fast", "triton_fast")
    assert (convs > 0) == convs_expected and (processors == temporal > 0) == (choice != "conv2d")
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, FrameConv) for m in unet.modules())
    assert not any(isinstance(p, kind) for p in unet.attn_processors.values())


@pytest.mark.slow
def test_regional_compile_computes_the_same_function_and_is_undone():
    from motion_adapters.training_step import REGIONAL_COMPILE_TYPES, regional_compile

    unet = tiny_show1().eval()
    x, text = torch.randn(1, 3, 4, 8, 8), embeds(64)
    layers = [m for m in unet.modules() if type(m).__name__ in REGIONAL_COMPILE_TYPES]
    limit = torch._dynamo.config.recompile_limit
    with torch.no_grad():
        reference = unet(x, torch.tensor([10]), text).sample
        with regional_compile(unet, True) as count:
            assert count == len(layers) > 0 and all(m._compiled_call_impl is not None for m in layers)
            compiled = unet(x, torch.tensor([10]), text).sample
    torch.testing.assert_close(compiled, reference, rtol=1e-4, atol=1e-5)
    assert all(m._compiled_call_impl is None for m in layers) and torch._dynamo.config.recompile_limit == limit
    with regional_compile(unet, False) as count:
        assert count == 0 and all(m._compiled_call_impl is None for m in layers)


def test_norms_in_compute_dtype_read_and_write_bf16_under_autocast_and_are_undone():
    from motion_adapters.lean_backward import norms_in_compute_dtype

    unet = tiny_show1().eval()
    x, text = torch.randn(1, 3, 4, 8, 8), embeds(64)
    norms = [m for m in unet.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
    outputs = {}

    def record(module, inputs, output):
        outputs[id(module)] = output.dtype

    hooks = [n.register_forward_hook(record) for n in norms]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference = unet(x, torch.tensor([10]), text).sample.float()
        assert torch.float32 in set(outputs.values())  # CUDA autocast runs every norm in float32, CPU some
        outputs.clear()
        with norms_in_compute_dtype(unet, True) as count:
            half = unet(x, torch.tensor([10]), text).sample.float()
    assert count == len(norms) > 0 and set(outputs.values()) == {torch.bfloat16}
    assert all(type(n) in (torch.nn.GroupNorm, torch.nn.LayerNorm) and "forward" not in vars(n) for n in norms)
    assert not torch.equal(half, reference)
    torch.testing.assert_close(half, reference, rtol=0.05, atol=0.05)
    for hook in hooks:
        hook.remove()
    with norms_in_compute_dtype(unet, False) as count:
        assert count == 0


def test_norm_dtype_compute_trains_with_half_norm_weights_and_restores_them_exactly():
    unet = tiny_show1()
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    seen = set()

    def look(state):
        seen.update(p.dtype for m in state.unet.modules() if isinstance(m, torch.nn.GroupNorm) for p in m.parameters())

    config = cfg(mixed_precision="bf16", frozen_dtype="compute", norm_dtype="compute")
    result = train_motion(unet, clip(), embeds(64), scheduler(), config, callbacks=[look], progress=False)
    assert seen == {torch.bfloat16} and result.extra["norm_dtype"] == "compute"
    assert all(torch.isfinite(torch.tensor(result.losses)))
    adapted = {f"{m}.weight" for m in result.info.module_names}
    for name, p in unet.named_parameters():
        assert p.dtype == torch.float32, name
        if name not in adapted:
            torch.testing.assert_close(p.detach(), before[name], rtol=0, atol=0, msg=name)
    assert all(not torch.equal(dict(unet.named_parameters())[n], before[n]) for n in adapted)
    plain = train_motion(tiny_show1(), clip(), embeds(64), scheduler(), cfg(norm_dtype="compute"), progress=False)
    assert plain.extra["norm_dtype"] == "float32"  # no mixed precision: nothing to change
    cpu_auto = train_motion(tiny_show1(), clip(), embeds(64), scheduler(), cfg(mixed_precision="bf16"), progress=False)
    assert cpu_auto.extra["norm_dtype"] == "float32"  # "auto" changes the norms on CUDA only


def _swapped_step(swaps, train_mode=False, trainable=("to_q.weight", "to_k.weight")):
    """One forward and backward pass of a tiny Show-1 UNet inside the layer swaps `swaps` (functions of the UNet).

    Returns the output, the trainable parameters' gradients, the numbers of activation values autograd kept, what
    each swap yielded, and the class names of the modules inside the swaps (with or without an instance forward).
    """
    x = torch.randn(1, 3, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    unet = tiny_show1().train(train_mode)  # train mode: the temporal convolutions' dropout (p=0.1) is on
    inject_temporal_adapter(unet, target="temporal_attn.to_[qkv]", mode="full")
    for name, p in unet.named_parameters():
        p.requires_grad_(".temp_attentions." in name and name.endswith(trainable))
    kept, weights = [], {p.data_ptr() for p in unet.parameters()}

    def keep(t):  # activations only: weights are held by the model anyway
        kept.append(0 if t.data_ptr() in weights else t.numel())
        return t

    torch.manual_seed(5)  # same dropout masks in every run: the swapped layers draw no other random numbers
    with contextlib.ExitStack() as stack:
        yielded = [stack.enter_context(swap(unet)) for swap in swaps]
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            out = unet(x, torch.tensor([10]), embeds(64)).sample
        modules = {"all": [type(m).__name__ for m in unet.modules()],
                   "swapped": {type(m).__name__ for m in unet.modules() if "forward" in vars(m)}}  # fmt: skip
    out.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}
    assert all("forward" not in vars(m) for m in unet.modules())
    return out.detach(), grads, sum(kept), yielded, modules


def _assert_same_step(fast, reference, kept_at_most):
    (fast_out, fast_grads, fast_kept, _, _), (out, grads, kept, _, _) = fast, reference
    torch.testing.assert_close(fast_out, out, rtol=0, atol=0)
    assert grads.keys() == fast_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(fast_grads[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert fast_kept < kept_at_most * kept


@pytest.mark.parametrize("choice", ["library", "conv2d"])
def test_frozen_convs_keep_no_input_give_the_same_gradients_and_hold_less(choice):
    from motion_adapters.lean_backward import frozen_convs_keep_no_input
    from motion_adapters.training_step import temporal_kernels

    def run(enabled):
        return _swapped_step([lambda u: temporal_kernels(u, choice), lambda u: frozen_convs_keep_no_input(u, enabled)])

    reference, fast = run(False), run(True)
    frame_convs = fast[4]["all"].count("FrameConv")
    assert reference[3][1] == 0 and fast[3][1] > 0 and (frame_convs > 0) == (choice == "conv2d")
    _assert_same_step(fast, reference, kept_at_most=0.9)


@pytest.mark.parametrize("train_mode", [False, True])
def test_frozen_activations_recomputed_give_the_same_gradients_and_hold_less(train_mode, monkeypatch):
    from motion_adapters import lean_backward
    from motion_adapters.lean_backward import frozen_activations_recomputed, frozen_convs_keep_no_input

    # bit for bit against the modules as written: the GEGLU kernels round once where PyTorch's operators round
    # twice (tests/test_geglu.py compares them)
    monkeypatch.setattr(lean_backward, "GEGLU_KERNELS", False)

    def run(enabled):
        return _swapped_step([lambda u: frozen_convs_keep_no_input(u, True),
                              lambda u: frozen_activations_recomputed(u, enabled)],
                             train_mode=train_mode, trainable=("to_q.weight", "to_v.weight"))  # fmt: skip

    reference, fast = run(False), run(True)
    assert reference[3][1] == 0 and fast[3][1] > 0
    assert {"Sequential", "FeedForward", "ResnetBlock2D"} <= fast[4]["swapped"]
    _assert_same_step(fast, reference, kept_at_most=0.8)


@pytest.mark.parametrize("float32_norms", [True, False])
def test_group_norm_act_keeping_input_follows_the_norm_dtype_under_autocast(float32_norms):
    from motion_adapters.lean_backward import group_norm_act_keeping_input, norms_in_compute_dtype

    norm = torch.nn.GroupNorm(2, 4).requires_grad_(False)
    x = torch.randn(2, 4, 3, 5).permute(0, 1, 3, 2).requires_grad_(True)  # non-contiguous, as in TemporalConvLayer
    with torch.autocast("cpu", dtype=torch.bfloat16), norms_in_compute_dtype(norm, not float32_norms):
        reference = torch.nn.functional.silu(norm(x))
        fused = group_norm_act_keeping_input(norm, x, "silu", float32_norms)
    assert fused.dtype == reference.dtype == (torch.float32 if float32_norms else torch.bfloat16)
    torch.testing.assert_close(fused, reference, rtol=0, atol=0)
    (g_ref,) = torch.autograd.grad(reference.float().sum(), x)
    (g_fused,) = torch.autograd.grad(fused.float().sum(), x)
    assert g_fused.shape == x.shape
    torch.testing.assert_close(g_fused, g_ref, rtol=0, atol=0)


@pytest.mark.parametrize("norm, act, resample", [("default", "silu", "down"), ("scale_shift", "gelu", "up"),
                                                  ("default", "gelu", None)])
def test_recomputed_resnet_blocks_match_diffusers(norm, act, resample):
    from diffusers.models.resnet import ResnetBlock2D

    from motion_adapters.lean_backward import frozen_activations_recomputed

    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=8, out_channels=16, temb_channels=12, groups=4, time_embedding_norm=norm,
                          non_linearity=act, up=resample == "up", down=resample == "down").requires_grad_(False)
    block.conv1.weight.requires_grad_(True)  # a trainable layer between the two recomputed pairs
    x, temb = torch.randn(2, 8, 6, 6, requires_grad=True), torch.randn(2, 12)

    def run(enabled):
        with frozen_activations_recomputed(block, enabled) as count:
            out = block(x, temb)
        grads = torch.autograd.grad(out.square().sum(), [x, block.conv1.weight])
        return out, grads, count

    (out, grads, count), (fast_out, fast_grads, fast_count) = run(False), run(True)
    assert (count, fast_count) == (0, 1) and "forward" not in vars(block)
    torch.testing.assert_close(fast_out, out, rtol=0, atol=0)
    for fast, reference in zip(fast_grads, grads):
        torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)


def test_recomputed_resnets_upsample_in_the_activations_dtype_under_autocast(monkeypatch):
    """CUDA's autocast runs nearest upsampling in float32 (the block's output, and what follows, then float32)."""
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    from motion_adapters import lean_backward
    from motion_adapters.lean_backward import frozen_activations_recomputed

    assert lean_backward.UPSAMPLE_IN_INPUT_DTYPE  # the default (benchmarks/results/training_token_rows_h200.json)
    autocast_in_upsampler = []
    forward = Upsample2D.forward
    monkeypatch.setattr(Upsample2D, "forward", lambda self, x, *a, **k: autocast_in_upsampler.append(
        torch.is_autocast_enabled("cpu")) or forward(self, x, *a, **k))  # fmt: skip
    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=12, groups=4, up=True).requires_grad_(False)
    x = torch.randn(2, 8, 6, 6).bfloat16().requires_grad_(True)  # activations in the compute dtype, as in training
    temb = torch.randn(2, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # on the CPU autocast upsamples in bf16 (CUDA: float32)
        expected = block(x, temb)
        with frozen_activations_recomputed(block, True):
            out = block(x, temb)
    assert autocast_in_upsampler == [True, True, False, False]  # diffusers' block, then the recomputed one's
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)  # bf16 norms on both paths, rounded apart


def test_bit_mask_dropout_keeps_the_mask_of_nn_dropout_in_an_eighth_of_the_bytes():
    from motion_adapters.lean_backward import _BitMaskDropout, _pack_bits, _unpack_bits

    for shape, nbytes in (((3, 5, 7), 14), ((4, 16), 8)):  # 105 values (padded) and 64
        mask = torch.rand(shape) < 0.5
        packed = _pack_bits(mask)
        assert packed.dtype == torch.uint8 and packed.numel() == nbytes
        assert torch.equal(_unpack_bits(packed, mask.shape), mask)
    mask = (torch.rand(2, 3, 4, 5) < 0.5).contiguous(memory_format=torch.channels_last)  # packed in memory order
    packed = _pack_bits(mask)
    assert torch.equal(packed, _pack_bits(mask.permute(0, 2, 3, 1).contiguous()))
    unpacked = _unpack_bits(packed, mask.shape, (0, 2, 3, 1))
    assert torch.equal(unpacked, mask) and unpacked.stride() == mask.stride()
    first_in_highest_bit = torch.tensor([0b10010000], dtype=torch.uint8)
    assert torch.equal(_pack_bits(torch.tensor([True, False, False, True] + [False] * 4)), first_in_highest_bit)
    x = torch.randn(4, 6, 5, requires_grad=True)
    torch.manual_seed(1)
    reference = torch.nn.functional.dropout(x, 0.3, training=True)
    torch.manual_seed(1)
    ours = _BitMaskDropout.apply(x, 0.3)
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    assert not torch.equal(ours, x)  # the mask dropped something
    (grad,) = torch.autograd.grad(ours.sum(), x)
    torch.testing.assert_close(grad, (reference != 0).float() / 0.7)


def test_frozen_activations_leave_trainable_and_dropout_feed_forwards_to_autograd():
    from diffusers.models.attention import FeedForward

    from motion_adapters.lean_backward import frozen_activations_recomputed

    trained = FeedForward(8, activation_fn="geglu")
    dropped = FeedForward(8, activation_fn="geglu", dropout=0.1).requires_grad_(False)
    plain_gelu = FeedForward(8, activation_fn="gelu").requires_grad_(False)
    norm_trains = torch.nn.Sequential(torch.nn.GroupNorm(2, 8), torch.nn.SiLU())
    model = torch.nn.ModuleList([trained, dropped.train(), plain_gelu, norm_trains])
    with frozen_activations_recomputed(model, True) as count:
        assert count == 0
    with frozen_activations_recomputed(dropped.eval(), True) as count:
        assert count == 1  # in eval mode its dropout does nothing


def test_frozen_convs_leave_a_trainable_convolution_to_autograd():
    from motion_adapters.lean_backward import frozen_convs_keep_no_input

    conv = torch.nn.Conv2d(2, 2, 3, padding=1)
    model = torch.nn.Sequential(conv, torch.nn.Conv2d(2, 2, 3, padding="same")).requires_grad_(False)
    conv.weight.requires_grad_(True)
    with frozen_convs_keep_no_input(model, True) as count:
        assert count == 0  # the first trains, the second pads by name
        model(torch.randn(1, 2, 4, 4)).sum().backward()
    assert conv.weight.grad is not None


def test_layer_swaps_leave_a_module_with_its_own_instance_forward_alone():
    from motion_adapters.lean_backward import frozen_convs_keep_no_input, norms_in_compute_dtype

    hooked = torch.nn.GroupNorm(2, 4)
    hooked.forward = lambda x: x  # what an offload hook does: a forward set on the instance
    model = torch.nn.Sequential(torch.nn.GroupNorm(2, 4), hooked, torch.nn.Conv2d(4, 4, 1)).requires_grad_(False)
    with norms_in_compute_dtype(model, True) as norms, frozen_convs_keep_no_input(model, True) as convs:
        assert (norms, convs) == (1, 1) and not isinstance(model[1].forward, functools.partial)
    assert model[1].forward(torch.ones(1)).item() == 1.0 and "forward" not in vars(model[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("float32_norms, fused_norms", [(True, False), (False, False), (False, True)])
def test_frozen_activations_recomputed_on_cuda_under_bf16_autocast(monkeypatch, float32_norms, fused_norms):
    from motion_adapters import lean_backward
    from motion_adapters.lean_backward import (
        frozen_activations_recomputed,
        frozen_convs_keep_no_input,
        norms_in_compute_dtype,
    )
    from motion_adapters.training_step import temporal_kernels

    if not fused_norms:  # PyTorch's chain throughout, GEGLU's product too (its kernel rounds once): bit for bit
        monkeypatch.setattr(lean_backward, "GEGLU_KERNELS", False)
        # and the ResNets' nearest upsampling in float32 as autocast runs it: in its input's dtype (the default) the
        # residual sum of an upsampling ResNet after a float32 norm is rounded to bf16 where autocast's is float32
        monkeypatch.setattr(lean_backward, "UPSAMPLE_IN_INPUT_DTYPE", False)

    device = torch.device("cuda")
    x, text = torch.randn(1, 3, 8, 16, 16, device=device), embeds(64).to(device)

    def run(enabled, half=True):
        unet = tiny_show1().to(device).train()  # dropout on: CUDA's fused native_dropout draws the masks
        inject_temporal_adapter(unet, target="temporal_attn.to_[qkv]", mode="full")
        for name, p in unet.named_parameters():
            p.requires_grad_(".temp_attentions." in name and name.endswith(("to_q.weight", "to_v.weight")))
        torch.manual_seed(7)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=half), temporal_kernels(unet, "fast"), \
                frozen_convs_keep_no_input(unet, True), norms_in_compute_dtype(unet, not float32_norms), \
                frozen_activations_recomputed(unet, enabled, float32_norms, fused_norms) as count:
            out = unet(x, torch.tensor([10], device=device), text).sample
        out.float().pow(2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}, count

    (out, grads, count), (fast_out, fast_grads, fast_count) = run(False), run(True)
    assert count == 0 and fast_count > 0
    if not fused_norms:  # PyTorch's kernels: the same output bit for bit
        torch.testing.assert_close(fast_out, out, rtol=0, atol=0)
        for name in grads:
            torch.testing.assert_close(fast_grads[name], grads[name], rtol=2e-2, atol=1e-4, msg=name)
        return
    # the fused kernels round once where PyTorch's chain rounds after each op, so the two bf16 runs differ by
    # rounding: both are measured against the same step in float32 (||run - exact|| / ||exact||), and the fused
    # run must be about as close to it as PyTorch's
    exact_out, exact_grads, _ = run(False, half=False)

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm())

    errors = {"torch": [rel(out, exact_out)] + [rel(grads[n], exact_grads[n]) for n in grads],
              "fused": [rel(fast_out, exact_out)] + [rel(fast_grads[n], exact_grads[n]) for n in grads]}  # fmt: skip
    assert all(f <= 1.5 * t + 1e-3 for f, t in zip(errors["fused"], errors["torch"])), errors


@pytest.mark.parametrize("triton_usable", [True, False])
def test_auto_temporal_kernels_pick_triton_frame_attention_on_cuda_only_where_triton_runs(monkeypatch, triton_usable):
    import motion_adapters.training as training

    monkeypatch.setattr(training, "fused_norm_available", lambda x=None: triton_usable)
    cuda = torch.device("cuda")
    assert training._temporal_kernels("auto", cuda) == ("triton_fast" if triton_usable else "fast")
    assert training._temporal_kernels("auto", torch.device("cpu")) == "library"
    assert training._temporal_kernels("math_attention", cuda) == "math_attention"
    if triton_usable:
        assert training._temporal_kernels("triton_attention", cuda) == "triton_attention"
    else:
        with pytest.raises(ValueError, match="temporal_kernels='triton_attention' cannot run.*'auto' or 'fast'"):
            training._temporal_kernels("triton_attention", cuda)


def test_bench_training_names_an_unknown_variant_before_it_runs_anything(capsys):
    with pytest.raises(SystemExit):
        bench_training.main(["--tiny", "--variants", "full,full_rerun"])
    assert "unknown ['full_rerun']" in capsys.readouterr().err


def test_bench_training_times_the_conv_shapes_that_pay_and_refuses_a_misordered_run(tmp_path, capsys):
    shape = {"kind": "fwd", "x": [8, 32, 16, 16], "w": [32, 32, 3, 3], "stride": [1, 1], "pad": [1, 1]}
    study = {"benchmark": "conv_shapes", "timed_env": {"cudnn_benchmark": True}, "results": [
        # 0.01 ms saved a call x 4 calls x 100 steps = 4 ms against 3 ms of timing: pays
        {**shape, "count": 4, "call_ms": 0.05, "timed_call_ms": 0.04, "first_call_ms": 1.0,
         "timed_first_call_ms": 4.0},
        # the same saving against 5 ms: does not
        {**shape, "kind": "dgrad", "count": 4, "call_ms": 0.05, "timed_call_ms": 0.04, "first_call_ms": 1.0,
         "timed_first_call_ms": 6.0},
        {**shape, "x": [1, 32, 8, 256], "w": [32, 32, 3, 1, 1], "count": 20},  # temporal: never compared
    ]}  # fmt: skip
    path = tmp_path / "conv_timing.json"
    path.write_text(json.dumps(study))
    assert bench_training.paying_conv_shapes(path, 100) == {("fwd", (8, 32, 16, 16), (32, 32, 3, 3))}
    assert bench_training.paying_conv_shapes(path, 1000) == {("fwd", (8, 32, 16, 16), (32, 32, 3, 3)),
                                                             ("dgrad", (8, 32, 16, 16), (32, 32, 3, 3))}
    plain = tmp_path / "conv_shapes.json"
    plain.write_text(json.dumps({"benchmark": "conv_shapes", "results": study["results"]}))
    with pytest.raises(SystemExit, match="not a `bench_conv_shapes.py --compare-timed` result"):
        bench_training.paying_conv_shapes(plain, 100)
    with pytest.raises(SystemExit):
        bench_training.main(["--tiny", "--variants", "full_timed_convs"])
    assert "needs --timed-conv-shapes" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a train_motion run before it would have cached its shapes' choices
        bench_training.main(["--tiny", "--variants", "baseline,full,full_timed_convs",
                             "--timed-conv-shapes", str(path)])
    assert "put full_timed_convs first" in capsys.readouterr().err

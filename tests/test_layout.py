"""Channels-last sampling through a Show-1 UNet (`motion_adapters.layout`), its norms in Triton's interpreter on CPU."""

import pytest
import torch
from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel
from fixtures_tiny import tiny_unet

from motion_adapters import layout
from motion_adapters.fused_norm import channels_last_rows
from motion_adapters.lean_backward import fused_norm_activations
from motion_adapters.training_step import FrameConv, temporal_kernels

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _no_tf32(monkeypatch):
    """float32 convolutions in float32 on a GPU too: cuDNN's TF32 would differ by more than the layouts do."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def unet_inputs(unet, frames=2, size=8, batch=2):
    g = torch.Generator().manual_seed(0)
    config = unet.config
    inputs = {
        "sample": torch.randn(batch, config.in_channels, frames, size, size, generator=g).to(DEVICE),
        "timestep": torch.tensor([500] * batch, device=DEVICE),
        "encoder_hidden_states": torch.randn(batch, 5, config.encoder_hid_dim, generator=g).to(DEVICE),
    }
    if config.class_embed_type == "timestep":
        inputs["class_labels"] = torch.tensor([250] * batch, device=DEVICE)
    return inputs


def conv_input_layouts(unet):
    """Record, for every convolution call, whether its input was channels-last; returns (records, remove)."""
    seen = []
    convs = (torch.nn.Conv2d, torch.nn.Conv3d, FrameConv)
    names = {m: name for name, m in unet.named_modules() if isinstance(m, convs)}

    def hook(module, args):
        seen.append((names[module], tuple(args[0].shape), channels_last_rows(args[0]) is not None))

    handles = [m.register_forward_pre_hook(hook) for m in names]
    return seen, lambda: [h.remove() for h in handles]


def functional_conv_layouts(monkeypatch):
    """Record (input shape, channels-last) of every `F.conv2d` / `F.conv3d` call: the convolution modules' own, and
    those of the sampling layers that call them without the bias."""
    seen = []
    for name in ("conv2d", "conv3d"):

        def recording(x, *args, _original=getattr(torch.nn.functional, name), **kwargs):
            seen.append((tuple(x.shape), channels_last_rows(x) is not None))
            return _original(x, *args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, name, recording)
    return seen


@pytest.mark.parametrize(
    ("stage", "fused", "kernels"),
    [pytest.param(*case, marks=pytest.mark.slow)  # each over 30 s on a 2-core CPU
     for case in (("sr1", True, "conv2d"), ("keyframes", False, "conv2d"), ("sr1", True, "library"))],
)
def test_channels_last_sampling_keeps_every_convolution_input_channels_last_and_the_output(
    monkeypatch, stage, fused, kernels
):
    unet = tiny_unet(stage).to(DEVICE)
    inputs = unet_inputs(unet)
    with torch.no_grad():
        expected = unet(**inputs).sample
        with temporal_kernels(unet, kernels), fused_norm_activations(unet, fused):
            with layout.channels_last_sampling(unet) as count:
                convs = [m for m in unet.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d, FrameConv))]
                seen = functional_conv_layouts(monkeypatch)
                sampled = unet(**inputs).sample
                monkeypatch.undo()
    temporal = [m for m in unet.modules() if type(m) is TransformerTemporalModel]
    norms = [m for m in unet.modules() if type(m) is torch.nn.GroupNorm]
    assert count == len(convs) + len(temporal) + len(norms) and temporal
    # conv_in turns the input channels-last; every later convolution gets channels-last input (no conversion)
    assert len(seen) == len(convs)
    if kernels != "library" or DEVICE == "cuda":  # the CPU's Conv3d returns a contiguous output; cuDNN's does not
        assert [call for call in seen if not call[-1]] == [((4, unet.config.in_channels, 8, 8), False)]  # conv_in
    torch.testing.assert_close(sampled, expected, rtol=1e-4, atol=1e-4)
    # restored: weights contiguous again (safetensors saves contiguous tensors), forwards the class's
    assert all(m.weight.is_contiguous() for m in convs)
    assert all("forward" not in vars(m) for m in unet.modules())


def test_channels_last_sampling_stands_aside_with_gradients_and_when_disabled():
    unet = tiny_unet("keyframes").to(DEVICE)
    inputs = unet_inputs(unet, frames=1)
    with torch.no_grad():
        expected = unet(**inputs).sample
    with layout.channels_last_sampling(unet):
        with_grad = unet(**inputs).sample
    assert with_grad.requires_grad
    torch.testing.assert_close(with_grad.detach(), expected, rtol=1e-5, atol=1e-5)  # the modules as written
    with layout.channels_last_sampling(unet, enabled=False) as count:
        assert count == 0 and all(m.weight.is_contiguous() for m in unet.modules() if isinstance(m, torch.nn.Conv2d))


def test_weights_are_restored_when_the_call_fails():
    unet = tiny_unet("keyframes").to(DEVICE)
    with pytest.raises(RuntimeError, match="boom"), layout.channels_last_sampling(unet):
        assert not unet.conv_in.weight.is_contiguous()
        raise RuntimeError("boom")
    assert unet.conv_in.weight.is_contiguous() and all("forward" not in vars(m) for m in unet.modules())


@pytest.mark.slow  # 38 s at batch 1 on a 2-core CPU
@pytest.mark.parametrize("batch", [1, 2])  # train_motion trains at batch 1
def test_channels_last_training_keeps_the_layout_and_gives_the_same_adapter_gradients(batch):
    from motion_adapters.lean_backward import frozen_activations_recomputed, frozen_convs_keep_no_input

    unet = tiny_unet("keyframes").to(DEVICE).requires_grad_(False)  # eval: no dropout, so both runs draw alike
    trainable = [p for name, p in unet.named_parameters() if ".temp_attentions." in f".{name}" and ".to_q." in name]
    for p in trainable:
        p.requires_grad_(True)
    inputs = unet_inputs(unet, batch=batch)

    def step(channels_last):
        with temporal_kernels(unet, "conv2d"), layout.channels_last_training(unet, channels_last) as count, \
                frozen_convs_keep_no_input(unet, True), \
                frozen_activations_recomputed(unet, True, True, fused_norms=channels_last):  # the reference: torch
            seen, remove = conv_input_layouts(unet)
            out = unet(**inputs).sample
            remove()
            grads = torch.autograd.grad(out.square().mean(), trainable)
        return out.detach(), grads, count, seen

    out, grads, count, _ = step(False)
    cl_out, cl_grads, cl_count, seen = step(True)
    assert count == 0 and cl_count > 0
    assert [call for call in seen if not call[-1]] == [("conv_in", (2 * batch, unet.config.in_channels, 8, 8), False)]
    torch.testing.assert_close(cl_out, out, rtol=1e-4, atol=1e-5)
    for cl_grad, grad in zip(cl_grads, grads):
        torch.testing.assert_close(cl_grad, grad, rtol=1e-3, atol=1e-6)
    assert all(m.weight.is_contiguous() for m in unet.modules() if isinstance(m, torch.nn.Conv2d))
    assert all("forward" not in vars(m) for m in unet.modules())


def batch_one_training_step():
    """A tiny keyframes UNet with trainable temporal q/k/v, and `step(kernels)`: one channels-last batch-1 forward
    with the training step's layer swaps, returning the output and the q/k/v gradients."""
    from motion_adapters.lean_backward import frozen_activations_recomputed, frozen_convs_keep_no_input

    unet = tiny_unet("keyframes").to(DEVICE).requires_grad_(False)
    trainable = [p for name, p in unet.named_parameters() if ".temp_attentions." in f".{name}" and
                 any(f".to_{x}." in name for x in "qkv")]  # fmt: skip
    for p in trainable:
        p.requires_grad_(True)
    inputs = unet_inputs(unet, batch=1)

    def step(kernels):
        with temporal_kernels(unet, kernels), layout.channels_last_training(unet, True), \
                frozen_convs_keep_no_input(unet, True), frozen_activations_recomputed(unet, True, True, True):
            out = unet(**inputs).sample
            grads = torch.autograd.grad(out.square().mean(), trainable)
        return out.detach(), grads

    return unet, step


def assert_same_step(out, grads, reference, reference_grads):
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
    for grad, expected in zip(grads, reference_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-3, atol=1e-6)


@pytest.mark.slow  # over 30 s on a 2-core CPU (Triton's interpreter): run with -m slow
@pytest.mark.parametrize("token_rows", [True, False], ids=["token_rows", "frames_last"])
def test_batch_one_temporal_transformers_run_on_token_rows_with_the_same_gradients(monkeypatch, token_rows):
    """At batch 1 with the Triton frame attention, the temporal transformers keep the channels-last token order
    (`TOKEN_ROWS`, the default), or go through frames-last sequences as diffusers has them: same values."""
    unet, step = batch_one_training_step()
    calls = []
    rows = layout._temporal_transformer_rows
    monkeypatch.setattr(layout, "_temporal_transformer_rows", lambda *a: calls.append(1) or rows(*a))
    monkeypatch.setattr(layout, "TOKEN_ROWS", token_rows)

    reference, reference_grads = step("conv2d")  # PyTorch's attention processor: the sequences as diffusers has them
    assert calls == []
    out, grads = step("triton_fast")
    assert len(calls) == token_rows * sum(isinstance(m, TransformerTemporalModel) for m in unet.modules())
    assert_same_step(out, grads, reference, reference_grads)


@pytest.mark.slow  # over 30 s on a 2-core CPU (Triton's interpreter): run with -m slow
def test_batch_one_frozen_temporal_convolutions_run_as_frame_taps_with_the_same_gradients(monkeypatch):
    """In a channels-last batch-1 training step the frozen temporal convolutions qualify for `_FrameTapsConv`."""
    from motion_adapters import lean_backward

    unet, step = batch_one_training_step()
    calls = []
    apply = lean_backward._FrameTapsConv.apply
    monkeypatch.setattr(lean_backward._FrameTapsConv, "apply", lambda *a: calls.append(1) or apply(*a))

    monkeypatch.setattr(lean_backward, "FRAME_CONV_GEMMS", False)
    reference, reference_grads = step("triton_fast")
    assert calls == []
    monkeypatch.setattr(lean_backward, "FRAME_CONV_GEMMS", True)
    out, grads = step("triton_fast")
    assert len(calls) == sum(isinstance(m, torch.nn.Conv3d) and m.kernel_size[1:] == (1, 1) for m in unet.modules())
    assert_same_step(out, grads, reference, reference_grads)


@pytest.mark.slow  # over 30 s on a 2-core CPU (Triton's interpreter): run with -m slow
def test_batch_one_training_step_with_the_untimed_levers_gives_the_same_gradients(monkeypatch):
    """The levers built but not yet timed, on together: residual gradients summed in the norms' kernels
    (SKIP_GRADS_IN_NORMS), padded heads (PAIRS_PADDED_HEADS: none here, the tiny UNet's heads are of one channel)
    and folded frame taps (FRAME_TAPS_FOLDED_MAX_ROWS, every temporal convolution here): the same output and q/k/v
    gradients as the defaults."""
    from motion_adapters import frame_attention, im2col_conv, lean_backward

    unet, step = batch_one_training_step()
    reference, reference_grads = step("triton_fast")
    folds = []
    fold = lean_backward.fold_frame_taps
    monkeypatch.setattr(lean_backward, "fold_frame_taps",
                        lambda *a, **kw: folds.append(kw.get("reverse", False)) or fold(*a, **kw))
    monkeypatch.setattr(lean_backward, "SKIP_GRADS_IN_NORMS", True)
    monkeypatch.setattr(frame_attention, "PAIRS_PADDED_HEADS", True)
    monkeypatch.setattr(lean_backward, "FRAME_TAPS_FOLDED_MAX_ROWS", 320)
    out, grads = step("triton_fast")
    names = [name for name, m in unet.named_modules() if type(m).__name__ in ("TemporalConvLayer", "Attention")]
    layers = [name for name in names if "temp_convs" in name]
    first_trainable = min(i for i, name in enumerate(names) if "temp_attentions" in name)
    before = [name for name in names[:first_trainable] if "temp_convs" in name]  # the first down block's, here
    # every temporal convolution's forward pass; the input gradients of all but those before the first trainable
    # layer (no gradient flows through them)
    assert len(before) == 2 and folds.count(False) == 4 * len(layers)
    assert folds.count(True) == 4 * (len(layers) - len(before))
    assert im2col_conv.fold_frame_taps is fold
    assert_same_step(out, grads, reference, reference_grads)


@pytest.mark.slow  # over 30 s on a 2-core CPU (Triton's interpreter): run with -m slow
def test_batch_one_training_steps_with_deferred_updates_land_gradients_in_the_buffers_and_train_alike():
    """The training step's layer swaps on a tiny keyframes UNet (token rows, the Triton frame attention): every
    trained q/k/v weight's gradient lands in its layer's buffer (`DeferredUpdates.grads_in_buffers`), and three
    steps with each update deferred to the next step's start, layer by layer, the forward passes after an update
    reading the weights as it stacked them (`waiting`), end with the weights of three steps updated at once."""
    from motion_adapters.lean_backward import frozen_activations_recomputed, frozen_convs_keep_no_input
    from motion_adapters.deferred_updates import DeferredUpdates

    def run(defer):
        unet = tiny_unet("keyframes").to(DEVICE).requires_grad_(False)
        trainable = [p for name, p in unet.named_parameters() if ".temp_attentions." in f".{name}" and
                     any(f".to_{x}." in name for x in "qkv")]  # fmt: skip
        for p in trainable:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(trainable, lr=1e-3, fused=True)
        inputs = unet_inputs(unet, batch=1)
        frames = inputs["sample"].shape[2]
        deferred = DeferredUpdates.find(unet, trainable, optimizer, torch.float32, frames) if defer else None
        assert (deferred is not None) == defer
        with temporal_kernels(unet, "triton_fast"), layout.channels_last_training(unet, True), \
                frozen_convs_keep_no_input(unet, True), frozen_activations_recomputed(unet, True, True, True):  # fmt: skip
            for step in range(3):
                if deferred is not None and step:
                    deferred.step_layers(None)
                optimizer.zero_grad(set_to_none=True)
                with deferred.in_forward_order() if deferred is not None and step == 0 else torch.enable_grad(), \
                        deferred.waiting() if deferred is not None and step else torch.enable_grad():  # fmt: skip
                    unet(**inputs).sample.square().mean().backward()
                if deferred is None:
                    optimizer.step()
                else:
                    assert deferred.grads_in_buffers()
        if deferred is not None:
            optimizer.step()
            deferred.close()
        return [p.detach().clone() for p in trainable]

    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)

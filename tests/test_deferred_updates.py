"""Each step's optimizer update deferred to the start of the next (`training_step.OVERLAP_OPTIMIZER`).

On the CPU (Triton's interpreter for the attention kernels): the gradient buffers `projected_frame_attention`
writes, `DeferredUpdates` (its layer-by-layer updates against the run's optimizer, the forward order, the state it
creates) and the fallback when gradients do not land in the buffers. The CUDA graph that overlaps the updates with
the forward pass is the GPU test's (`-m gpu`).
"""

import pytest
import torch
from diffusers.models.attention_processor import Attention

from motion_adapters import frame_attention as fa
from motion_adapters.deferred_updates import DeferredUpdates

pytest.importorskip("triton")
C, HEADS, FRAMES, N = 20, 4, 6, 3


def attention(seed):
    torch.manual_seed(seed)
    return Attention(query_dim=C, heads=HEADS, dim_head=C // HEADS, bias=False)


class TwoLayers(torch.nn.Module):
    """Two temporal self-attentions on `projected_frame_attention`, as layout's token rows call it; registered in
    the reverse of the order the forward pass runs them."""

    def __init__(self):
        super().__init__()
        self.second, self.first = attention(1), attention(0)

    def forward(self, x):
        for attn in (self.first, self.second):
            x = x + fa.projected_frame_attention(x, attn.to_q.weight, attn.to_k.weight, attn.to_v.weight, FRAMES,
                                                 HEADS, weight_grad=getattr(attn, fa.WEIGHT_GRAD_ATTR, None),
                                                 ready=getattr(attn, fa.WEIGHTS_READY_ATTR, None),
                                                 stacked=getattr(attn, fa.STACKED_WEIGHT_ATTR, None))  # fmt: skip
        return x


def trained(model):
    return [p for name, p in model.named_parameters() if ".to_" in f".{name}" and "to_out" not in name]


def inputs(steps):
    g = torch.Generator().manual_seed(5)
    return [torch.randn(FRAMES * N, C, generator=g) for _ in range(steps)]


def optimizer_of(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01, fused=True)


def clip_scale(params, max_norm=0.05):
    """The divisor `StepRunner` hands a fused AdamW for clipping at `max_norm` (small enough here to clip)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    return (max_norm / (norm + 1e-6)).clamp(max=1.0).reciprocal()


def test_weight_grad_buffers_become_the_weights_gradients():
    """With `weight_grad`, the backward pass writes the stacked gradient into the buffer and autograd keeps its row
    blocks as `.grad` (no copy): the same values as without it; a buffer of another shape is refused."""
    model = TwoLayers()
    params = trained(model)
    x = inputs(1)[0]
    model(x).square().sum().backward()
    expected = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    buffers = {}
    for attn in (model.first, model.second):
        buffers[attn] = torch.full((3 * C, C), float("nan"))
        setattr(attn, fa.WEIGHT_GRAD_ATTR, buffers[attn])
    model(x).square().sum().backward()
    for attn in (model.first, model.second):
        weights = (attn.to_q.weight, attn.to_k.weight, attn.to_v.weight)
        for i, w in enumerate(weights):
            assert w.grad.data_ptr() == buffers[attn][i * C].data_ptr()
    for got, want in zip(trained(model), expected):
        torch.testing.assert_close(got.grad, want, rtol=1e-6, atol=1e-7)
    w = model.first.to_q.weight
    with pytest.raises(ValueError, match=r"weight_grad must be a contiguous \(60, 20\) torch.float32 tensor"):
        fa.projected_frame_attention(x, w, w, w, FRAMES, HEADS, weight_grad=torch.zeros(60, 21))


def test_padded_heads_write_the_unpadded_gradient_into_the_buffer(monkeypatch):
    """Heads of 5 padded to 8 (`PAIRS_PADDED_HEADS`): the buffer holds the (3 * out, C) gradient of the weights."""
    monkeypatch.setattr(fa, "PAIRS_PADDED_HEADS", True)
    model = TwoLayers()
    x = inputs(1)[0]
    model(x).square().sum().backward()
    expected = [p.grad.clone() for p in trained(model)]
    for p in trained(model):
        p.grad = None
    for attn in (model.first, model.second):
        setattr(attn, fa.WEIGHT_GRAD_ATTR, torch.full((3 * C, C), float("nan")))
    model(x).square().sum().backward()
    for got, want in zip(trained(model), expected):
        torch.testing.assert_close(got.grad, want, rtol=1e-6, atol=1e-7)
        assert got.grad.data_ptr() in {getattr(a, fa.WEIGHT_GRAD_ATTR)[i * C].data_ptr()
                                       for a in (model.first, model.second) for i in range(3)}  # fmt: skip


def test_updates_deferred_layer_by_layer_give_the_same_run():
    """Four steps, clipped: updating after each backward pass with the run's optimizer, against deferring each
    update to the next step's start, layer by layer in forward order with the layers' optimizers (and the last one
    flushed by the run's): the same weights and the same optimizer state, bit for bit."""
    steps = inputs(4)

    def run(deferred_updates):
        model = TwoLayers()
        params = trained(model)
        optimizer = optimizer_of(params)
        deferred = DeferredUpdates.find(model, params, optimizer) if deferred_updates else None
        scale = None
        for i, x in enumerate(steps):
            if deferred is not None and scale is not None:
                deferred.step_layers(scale)
            optimizer.zero_grad(set_to_none=True)
            with deferred.in_forward_order() if deferred is not None and i == 0 else torch.enable_grad():
                model(x).square().mean().backward()
            scale = clip_scale(params)
            if deferred is None:
                optimizer.grad_scale = scale
                optimizer.step()
                del optimizer.grad_scale
            else:
                assert deferred.grads_in_buffers()
                if i == 0:
                    assert [attn for attn, _ in deferred.layers] == [model.first, model.second]
                    deferred.initialize_state()
        if deferred is not None:  # the flush
            optimizer.grad_scale = scale
            optimizer.step()
            deferred.close()
            assert not hasattr(model.first, fa.WEIGHT_GRAD_ATTR)
        return [p.detach().clone() for p in params], optimizer.state_dict()["state"]

    (weights, state), (deferred_weights, deferred_state) = run(False), run(True)
    for got, want in zip(deferred_weights, weights):
        assert torch.equal(got, want)
    assert state.keys() == deferred_state.keys()
    for key in state:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(deferred_state[key][name], state[key][name]), (key, name)


@pytest.mark.parametrize("padded", [False, True])
def test_layer_updates_write_the_stacked_weights_the_forward_pass_then_reads(padded, monkeypatch):
    """With a compute dtype, each layer's update writes its weights stacked in it (padded heads included: heads of 5
    here, 8 apart with PAIRS_PADDED_HEADS); inside `waiting` the forward pass reads those (no stacking of its own)
    and gives what stacking them itself gives."""
    monkeypatch.setattr(fa, "PAIRS_PADDED_HEADS", padded)
    model = TwoLayers()
    params = trained(model)
    optimizer = optimizer_of(params)
    deferred = DeferredUpdates.find(model, params, optimizer, torch.bfloat16, FRAMES)
    x = inputs(1)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().square().sum().backward()
    deferred.initialize_state()
    deferred.step_layers(None)
    width = 8 if padded else C // HEADS
    for attn, weights in deferred.layers:
        expected = fa._stacked_weight(tuple(weights), HEADS, width, torch.bfloat16)
        assert deferred.stacked[attn].shape == (3 * HEADS * width, C)
        assert torch.equal(deferred.stacked[attn], expected)
    stacked = []
    stack = fa._stacked_weight
    monkeypatch.setattr(fa, "_stacked_weight", lambda *a: stacked.append(1) or stack(*a))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with deferred.waiting():
            out = model(x)
        assert not stacked and not hasattr(model.first, fa.STACKED_WEIGHT_ATTR)
        expected = model(x)
    assert len(stacked) == 2 and torch.equal(out, expected)


def test_initialized_state_is_what_adamw_creates_at_its_first_step():
    """`initialize_state` creates the step and moments as AdamW's first step would (its keys, dtypes, devices), and
    leaves a state that exists alone."""
    reference = TwoLayers()
    optimizer = optimizer_of(trained(reference))
    reference(inputs(1)[0]).sum().backward()
    optimizer.step()
    model = TwoLayers()
    params = trained(model)
    deferred = DeferredUpdates.find(model, params, optimizer_of(params))
    deferred.initialize_state()
    for p, q in zip(params, trained(reference)):
        made, adamw = deferred.optimizer.state[p], optimizer.state[q]
        assert made.keys() == adamw.keys()
        for key in made:
            assert (made[key].dtype, made[key].device, made[key].shape) == \
                (adamw[key].dtype, adamw[key].device, adamw[key].shape)  # fmt: skip
        assert float(made["step"]) == 0 and not made["exp_avg"].any() and not made["exp_avg_sq"].any()
    deferred.optimizer.state[params[0]]["step"] += 3
    deferred.initialize_state()
    assert float(deferred.optimizer.state[params[0]]["step"]) == 3


def test_deferral_needs_every_trained_weight_to_be_an_attention_projection():
    """`find`: None where some trained parameter is not a q/k/v weight (here a LayerNorm's), where a layer trains
    only some of its q/k/v, or under another optimizer; a `DeferredUpdates` otherwise."""
    model = TwoLayers()
    params = trained(model)
    assert DeferredUpdates.find(model, params, optimizer_of(params)) is not None
    extra = torch.nn.Parameter(torch.zeros(3))
    assert DeferredUpdates.find(model, params + [extra], optimizer_of(params + [extra])) is None
    assert DeferredUpdates.find(model, params[:-1], optimizer_of(params[:-1])) is None
    assert DeferredUpdates.find(model, params, torch.optim.SGD(params, lr=0.1)) is None


def test_gradients_outside_the_buffers_turn_deferral_off_with_the_update_applied(monkeypatch):
    """A step runner whose model does not write the buffers (here the attention computed by PyTorch): the step
    before the capture finds it, applies its own update at once and goes on without deferring."""
    from motion_adapters.config import MotionDistillationConfig
    from motion_adapters.training_step import StepRunner

    class Plain(TwoLayers):
        def forward(self, x, t=None, encoder_hidden_states=None):
            for attn in (self.first, self.second):
                x = x + attn(x.unflatten(0, (FRAMES, N)).transpose(0, 1)).transpose(0, 1).flatten(0, 1)
            return type("Out", (), {"sample": x})()

    model, reference = Plain(), Plain()
    x0 = inputs(1)[0]
    runners = []
    for m in (model, reference):
        params = trained(m)
        runner = StepRunner(m, x0, None, torch.linspace(0.99, 0.01, 10), params, optimizer_of(params),
                            MotionDistillationConfig(max_grad_norm=0.05), None)  # fmt: skip
        monkeypatch.setattr(runner, "loss", lambda t, noise, m=m: m(x0 + noise).sample.square().mean())
        runners.append(runner)
    runners[0].deferred = DeferredUpdates.find(model, trained(model), runners[0].optimizer)
    noise = torch.randn_like(x0)
    runners[0]._deferred_step(torch.tensor([3]), noise, last_warmup=True)
    runners[1]._eager_step(torch.tensor([3]), noise)
    assert runners[0].deferred is None and not runners[0]._pending
    assert not hasattr(model.first, fa.WEIGHT_GRAD_ATTR)
    for got, want in zip(trained(model), trained(reference)):
        assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_train_motion_with_the_overlapped_optimizer_trains_as_without_it(monkeypatch, tmp_path):
    """A tiny Show-1 UNet on the GPU, CUDA graph, bf16, clipping on, a checkpoint every 3 of 8 steps (each a flush,
    then an eager step), dropout off: `OVERLAP_OPTIMIZER` on and off give the same losses and adapter weights
    (within bf16 noise: the graphs differ), and the overlap does run (a graph captured with it)."""
    from test_training_speed import clip, embeds, scheduler, tiny_show1

    from motion_adapters import training_step
    from motion_adapters.config import MotionDistillationConfig
    from motion_adapters.injection import adapter_parameters
    from motion_adapters.training import train_motion

    captured = []
    capture = training_step.StepRunner._capture
    monkeypatch.setattr(training_step.StepRunner, "_capture",
                        lambda self, inputs: captured.append(self.deferred is not None) or capture(self, inputs))

    def run(overlap, out):
        monkeypatch.setattr(training_step, "OVERLAP_OPTIMIZER", overlap)
        unet = tiny_show1().cuda()
        for module in unet.modules():  # no dropout: the eager steps after a flush would draw other masks
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        config = MotionDistillationConfig(max_train_steps=8, num_frames=8, cuda_graph="yes", mixed_precision="bf16",
                                          checkpointing_steps=3, seed=3)  # fmt: skip
        result = train_motion(unet, clip(frames=8, size=16).cuda(), embeds(64).cuda(), scheduler(), config,
                              output_dir=out, progress=False)  # fmt: skip
        return result.losses, [p.detach().float().cpu() for p in adapter_parameters(unet).values()]

    (losses, weights), (overlapped, overlapped_weights) = run(False, tmp_path / "a"), run(True, tmp_path / "b")
    assert captured == [False, True]
    torch.testing.assert_close(torch.tensor(overlapped), torch.tensor(losses), rtol=2e-2, atol=1e-4)
    for got, want in zip(overlapped_weights, weights):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-4)


def test_step_runner_defers_only_graphed_runs_that_allow_it(monkeypatch):
    """`OVERLAP_OPTIMIZER`: a graphed run defers (on this CPU only its setup runs); not with the flag off, nor
    eagerly, nor when the caller reads the weights after each step (`defer_updates=False`: `train_motion` with
    callbacks), nor under a GradScaler."""
    from motion_adapters import training_step
    from motion_adapters.config import MotionDistillationConfig
    from motion_adapters.training_step import StepRunner

    def runner(flag=True, graph=True, defer_updates=True, scaler=None):
        monkeypatch.setattr(training_step, "OVERLAP_OPTIMIZER", flag)
        model = TwoLayers()
        params = trained(model)
        made = StepRunner(model, torch.zeros(1, 3, FRAMES, 2, 2), None, torch.ones(10), params, optimizer_of(params),
                          MotionDistillationConfig(), torch.bfloat16, scaler, graph,
                          defer_updates=defer_updates)  # fmt: skip
        deferred = made.deferred
        made.close()
        assert not hasattr(model.first, fa.WEIGHT_GRAD_ATTR)
        return deferred

    deferred = runner()
    assert deferred is not None and set(deferred.stacked) == {a for a, _ in deferred.layers}
    assert all(s.dtype == torch.bfloat16 and s.shape == (3 * C, C) for s in deferred.stacked.values())
    assert runner(flag=False) is None and runner(graph=False) is None and runner(defer_updates=False) is None
    assert runner(scaler=torch.amp.GradScaler("cpu")) is None

"""FrozenPrefix: the layers before the first trainable one, found on a traced pass, recorded and read back."""

import pytest
import torch
import torch.nn as nn
from test_training_speed import embeds, tiny_show1

from motion_adapters.frozen_prefix import FrozenPrefix
from motion_adapters.injection import inject_temporal_adapter


def adapted_unet(mode="full"):
    unet = tiny_show1()
    inject_temporal_adapter(unet, mode=mode)
    if mode == "lora":  # non-zero LoRA weights, so that the adapter changes what it computes
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.1)
    return unet.eval()  # no dropout: the recorded and the computed prefix must be bit for bit the same


def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, 4, 16, 16, generator=g), torch.tensor([100 + 300 * seed])


def forward(unet, sample, t, text):
    return unet(sample, t, encoder_hidden_states=text).sample


def traced(unet, text):
    prefix = FrozenPrefix(unet)
    sample, t = inputs(0)
    with prefix.tracing():
        forward(unet, sample, t, text).square().mean().backward()
    unet.zero_grad(set_to_none=True)
    return prefix


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_prefix_is_the_frozen_layers_before_the_first_temporal_attention(mode):
    unet = adapted_unet(mode)
    prefix = traced(unet, embeds(64))
    names = [m.name for m in prefix.modules]
    assert "conv_in" in names and "down_blocks.0" in names
    assert "down_blocks.1.attentions.0" in names  # the spatial attention just before the first temporal one
    for entry in prefix.modules:
        assert not any(p.requires_grad for p in entry.module.parameters()), entry.name
        # inside the first temporal attention only frozen parts of it (LoRA's base layers) may be
        assert ".attn1" not in entry.name or entry.name.endswith("base_layer"), entry.name
    assert not any(n.startswith("up_blocks") or n.startswith("mid_block") for n in names)
    assert not any(a != b and b.startswith(a + ".") for a in names for b in names)  # the largest modules only
    assert prefix.nbytes > 0


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_replayed_prefix_gives_the_same_output_and_gradients(mode):
    unet, text = adapted_unet(mode), embeds(64)
    prefix = traced(unet, text)
    sample, t = inputs(1)

    out = forward(unet, sample, t, text)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}
    unet.zero_grad(set_to_none=True)

    prefix.record(lambda: forward(unet, sample, t, text))
    calls = []
    hook = unet.conv_in.register_forward_pre_hook(lambda *a: calls.append(1))
    with prefix.replaying():
        replayed = forward(unet, sample, t, text)
        replayed.square().mean().backward()
    hook.remove()
    assert calls == [1]  # hooks still fire; the module's own forward did not run (its buffer was returned)
    torch.testing.assert_close(replayed, out, rtol=0, atol=0)
    for n, p in unet.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=0, atol=0, msg=n)
    assert "forward" not in vars(unet.conv_in)  # the class's forward is back


def test_replaying_reads_what_record_last_wrote_not_this_input():
    unet, text = adapted_unet(), embeds(64)
    prefix = traced(unet, text)
    (a, ta), (b, tb) = inputs(1), inputs(2)
    prefix.record(lambda: forward(unet, a, ta, text))
    with torch.no_grad(), prefix.replaying():
        mixed = forward(unet, b, tb, text)  # the prefix of a, the rest on b's timestep
    with torch.no_grad():
        assert not torch.equal(mixed, forward(unet, b, tb, text))
        prefix.record(lambda: forward(unet, b, tb, text))
        with prefix.replaying():
            torch.testing.assert_close(forward(unet, b, tb, text), forward(unet, b, tb, text), rtol=0, atol=0)


def test_recording_stops_after_the_last_prefix_module():
    unet, text = adapted_unet(), embeds(64)
    prefix = traced(unet, text)
    ran = []
    hook = unet.up_blocks[0].register_forward_pre_hook(lambda *a: ran.append(1))
    sample, t = inputs(1)
    prefix.record(lambda: forward(unet, sample, t, text))
    hook.remove()
    assert ran == []


class _Chain(nn.Module):
    """frozen -> trainable, the trainable layer keeping the frozen one's output for its weight's gradient."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(4, 4).requires_grad_(False)
        self.act = nn.ReLU()
        self.trained = nn.Linear(4, 4)

    def forward(self, x):
        return self.trained(self.act(self.frozen(x)))


def test_module_whose_output_the_backward_pass_keeps_is_not_in_the_prefix():
    model = _Chain()
    prefix = FrozenPrefix(model)
    with prefix.tracing():
        model(torch.randn(2, 4)).sum().backward()
    names = [m.name for m in prefix.modules]
    assert names == ["frozen"]  # ReLU's output is what `trained` keeps; ReLU keeps its own output too


def test_module_called_twice_a_pass_is_not_in_the_prefix():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(4, 4).requires_grad_(False)
            self.trained = nn.Linear(4, 4)

        def forward(self, x):
            return self.shared(self.trained(self.shared(x)))

    model = Twice()
    prefix = FrozenPrefix(model)
    with prefix.tracing():
        model(torch.randn(2, 4)).sum().backward()
    assert prefix.modules == []


def test_record_drops_prefix_modules_a_later_pass_does_not_call():
    class Once(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(4, 4).requires_grad_(False)
            self.cached = nn.Linear(4, 4).requires_grad_(False)
            self.trained = nn.Linear(4, 4)
            self.memo = None

        def forward(self, x):
            if self.memo is None:
                self.memo = self.cached(torch.ones(4))
            return self.trained(self.first(x).relu() + self.memo)

    model = Once()
    prefix = FrozenPrefix(model)
    with prefix.tracing():
        model(torch.randn(2, 4)).sum().backward()
    assert [m.name for m in prefix.modules] == ["cached", "first"]
    x = torch.randn(2, 4)
    assert len(prefix.buffers) == 2
    prefix.record(lambda: model(x))
    assert [m.name for m in prefix.modules] == ["first"]
    assert len(prefix.buffers) == 1 and prefix.nbytes == 2 * 4 * 4  # the dropped module's buffer is freed
    with prefix.replaying():
        torch.testing.assert_close(model(x), model(x))


def test_record_refuses_an_output_of_another_shape_than_traced():
    model = _Chain()
    prefix = FrozenPrefix(model)
    with prefix.tracing():
        model(torch.randn(2, 4)).sum().backward()
    with pytest.raises(RuntimeError, match=r"'frozen' returned \(3, 4\)"):
        prefix.record(lambda: model(torch.randn(3, 4)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphed_training_with_the_prefix_a_step_ahead_matches_it_computed_in_the_step(monkeypatch):
    from diffusers import DDPMScheduler

    from motion_adapters import training_step
    from motion_adapters.config import MotionDistillationConfig
    from motion_adapters.frozen_prefix import FrozenPrefix as Prefix
    from motion_adapters.training import train_motion

    device = torch.device("cuda")
    video = torch.rand(3, 8, 32, 32) * 2 - 1
    recorded = []
    record = Prefix.record
    monkeypatch.setattr(Prefix, "record", lambda self, f: (recorded.append(len(self.modules)), record(self, f)))

    def run(overlap):
        monkeypatch.setattr(training_step, "OVERLAP_FROZEN_PREFIX", overlap)
        unet = tiny_show1().to(device)
        for m in unet.modules():  # the same computation both ways: no dropout masks to differ
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        config = MotionDistillationConfig(max_train_steps=6, learning_rate=1e-3, num_frames=8, height=32, width=32,
                                          checkpointing_steps=0, cuda_graph="yes", mixed_precision="bf16")
        result = train_motion(unet, video, embeds(64).to(device), DDPMScheduler(num_train_timesteps=1000), config,
                              progress=False)
        params = {n: p.detach().float().cpu() for n, p in unet.named_parameters()}
        return result.losses, params, result.extra["frozen_prefix"]

    off_losses, off_params, off_prefix = run(False)
    assert recorded == [] and off_prefix is None
    on_losses, on_params, on_prefix = run(True)
    assert len(recorded) >= 2 and recorded[0] > 0  # filled before the first replay, then inside the graph
    assert {"conv_in", "down_blocks.0"} <= set(on_prefix["modules"]) and on_prefix["bytes"] > 0
    torch.testing.assert_close(torch.tensor(on_losses), torch.tensor(off_losses), rtol=1e-3, atol=1e-5)
    for name, p in on_params.items():
        torch.testing.assert_close(p, off_params[name], rtol=1e-2, atol=1e-4, msg=name)

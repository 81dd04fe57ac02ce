"""benchmarks/bench_precision.py: the rounding it simulates, and its comparison on a tiny Show-1 UNet."""

import json

import pytest
import torch
from scripts import load_script

bench = load_script("benchmarks/bench_precision.py")


def test_rounding_keeps_what_each_format_holds():
    x = torch.tensor([1.0 + 2**-9, 1.0 + 2**-12, -3.0, 1e-3])
    assert torch.equal(bench.rounded(x, None), x)
    assert bench.rounded(x, "bfloat16")[0] == 1.0  # 7 mantissa bits
    assert bench.rounded(x, "float16")[0] == 1.0 + 2**-9 and bench.rounded(x, "float16")[1] == 1.0  # 10 bits
    # e4m3: 3 mantissa bits after scaling the largest magnitude to 448; the scaled values are e4m3's exactly
    y = bench.rounded(x, "e4m3")
    scale = 3.0 / bench.E4M3_MAX
    assert y[2] == -3.0
    assert torch.equal((y / scale).to(torch.float8_e4m3fn).to(torch.float32), y / scale)
    # one scale a weight's output channel: each channel's largest magnitude is kept exactly
    w = torch.tensor([[0.5, 0.013], [40.0, -7.0]])
    rounded_w = bench.rounded(w, "e4m3", channel_scales=True)
    assert rounded_w[0, 0] == 0.5 and rounded_w[1, 0] == 40.0
    # one scale a row of channels (dimension 1 of an (N, C, H, W) activation)
    a = torch.rand(2, 8, 3, 3) * torch.tensor([1.0, 1000.0]).view(2, 1, 1, 1)
    rows = bench.rounded(a, "e4m3", rows=1)
    torch.testing.assert_close(rows.abs().amax(1), a.abs().amax(1))
    with pytest.raises(ValueError, match="fmt='int8'"):
        bench.rounded(x, "int8")


def test_simulated_layers_round_their_inputs_and_are_restored():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Conv2d(1, 1, 3, padding=1))
    model[0].weight.requires_grad_(True)
    x = torch.randn(4, 16)
    exact = model[0](x)
    patched = bench.simulate(model, "e4m3", "bfloat16", "bfloat16", "all")
    assert len(patched) == 2
    low = model[0](x)
    assert not torch.equal(low, exact)
    torch.testing.assert_close(low, exact, rtol=0.02, atol=0.02)  # bf16 for the trained layer: within a rounding
    assert torch.equal(low, low.to(torch.bfloat16).float())  # outputs rounded to bf16
    low.sum().backward()
    assert model[0].weight.grad is not None  # the trained weight keeps its gradient through the rounding
    bench.restore(patched)
    assert torch.equal(model[0](x), exact) and "forward" not in vars(model[0])


def test_tiny_comparison_orders_the_formats_by_their_mantissas(tmp_path):
    out = tmp_path / "precision.json"
    data = bench.main(["--tiny", "--draws", "1", "--variants", "float32,float16,bfloat16,e4m3,float32_other_dropout",
                       "--out", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == data  # written after each run, the last write complete
    runs = data["draws"][0]["runs"]
    assert runs["float32"]["eps_relative_error"] == 0.0 and runs["float32"]["loss_difference"] == 0.0
    errors = [runs[name]["eps_relative_error"] for name in ("float16", "bfloat16", "e4m3")]
    assert 0 < errors[0] < errors[1] < errors[2]  # 10, 7, 3 mantissa bits
    assert runs["float32_other_dropout"]["eps_relative_error"] > 0  # other masks: the noise scale
    assert list(runs) == ["float32", "float16", "bfloat16", "e4m3", "float32_other_dropout"]

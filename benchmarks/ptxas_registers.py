"""Compile the Triton kernels' options for an H100 / H200 (sm_90a) without a GPU and record what ptxas reports.

For each kernel and setting: registers a thread, spill stores and loads (bytes), shared memory (bytes, Triton's),
and whether the PTX multiplies on wgmma / mma.sync and feeds them with asynchronous copies (cp.async), i.e. a
pipelined loop. These are compile-time facts, not timings: they say which variants to time first.

    python benchmarks/ptxas_registers.py --out benchmarks/results/ptxas_registers_sm90.json
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_training import environment, module_settings, write  # noqa: E402

from motion_adapters import frame_attention as fa  # noqa: E402

#: show-1-base's temporal-attention head widths at 8 frames: (label, frames, channels a head)
HEADS = [("20x32, heads of 10", 8, 10), ("10x16, heads of 15", 8, 15), ("5x8, heads of 20", 8, 20)]
PAIRS = {"SHORT_KERNEL": "pairs"}
DOTS = {"SHORT_KERNEL": "dots", "DOTS_MIN_CHANNELS": 0}
#: label -> frame_attention settings (the labels of results/ptxas_registers_sm90.json, whose "pairs" was the default
#: then; "dots" is now, with `DOTS_ROWS` = 32: "dots_32")
ATTENTION = {
    "pairs": PAIRS,
    "pairs_dv_last": {**PAIRS, "PAIRS_DV": "last"},
    "pairs_dv_first": {**PAIRS, "PAIRS_DV": "first"},
    "pairs_int32": {**PAIRS, "PAIRS_INT32_OFFSETS": True},
    "pairs_rolled_int32": {**PAIRS, "PAIRS_UNROLL": 1, "PAIRS_INT32_OFFSETS": True, "PAIRS_DV": "first"},
    "dots": {**DOTS, "DOTS_ROWS": 64},
    "dots_half_p": {**DOTS, "DOTS_ROWS": 64, "DOTS_HALF_PROBABILITIES": True},
    "dots_32": {**DOTS, "DOTS_ROWS": 32},
    "dots_128": {**DOTS, "DOTS_ROWS": 128},
}


def ptxas_report(compiled) -> dict:
    """What ptxas -v says of a compiled kernel's PTX for sm_90a, and what the PTX multiplies with."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptx = compiled.asm["ptx"]
    ptxas = get_ptxas(90).path  # the ptxas Triton itself assembles sm_90 code with
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", str(source), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True).stderr  # fmt: skip

    def number(pattern: str) -> int:
        found = re.search(pattern, out)
        return int(found.group(1)) if found else 0

    return {"registers": number(r"Used (\d+) registers"), "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads"), "shared": compiled.metadata.shared,
            "mma": "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else None,
            "cp_async": "cp.async" in ptx}  # fmt: skip


def compile_for_sm90(kernel, meta: dict, options: dict | None = None):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {n: "constexpr" if n in meta else "*bf16" if n.endswith("_ptr") else "fp32" if n == "scale"
                 else "i32" for n in kernel.arg_names}  # fmt: skip
    constants = {k: v for k, v in meta.items() if k in kernel.arg_names}
    return triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32),
                          options=options or {})  # fmt: skip


def with_settings(module, settings: dict, fn):
    """`fn()` with `module`'s attributes set as `settings` says (restored after)."""
    with module_settings(*[(module, name, value) for name, value in settings.items()]):
        return fn()


def attention_rows() -> list[dict]:
    rows = []
    for label, settings in ATTENTION.items():
        for shape, frames, width in HEADS:
            def build(frames=frames, width=width):
                x = torch.empty(4, frames, 64 * width, dtype=torch.bfloat16)
                kernels, _, meta = fa._launch(x, 64)
                meta = fa._pairs_meta(meta, x, backward=True)
                warps = meta.pop("num_warps")
                return [(k.__name__, ptxas_report(compile_for_sm90(k, meta, options={"num_warps": warps})))
                        for k in kernels]  # fmt: skip

            for name, report in with_settings(fa, settings, build):
                rows.append({"kernel": name, "setting": label, "shape": shape, **report})
                print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    import triton

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ptxas_registers_sm90.json"))
    parser.add_argument("--commit", default=None)
    args = parser.parse_args(argv)
    from triton.backends.nvidia.compiler import get_ptxas_version

    ptxas = get_ptxas_version(90).strip().splitlines()[-1]
    data = {"benchmark": "ptxas_registers", "env": {**environment(torch.device("cpu"), args.commit),
                                                    "triton": triton.__version__, "target": "sm_90a",
                                                    "ptxas": ptxas},
            "attention": attention_rows()}  # fmt: skip
    write(args.out, data)
    return data


if __name__ == "__main__":
    main()

"""Compile the Triton kernels' options for an H100 / H200 (sm_90a) without a GPU and record what ptxas reports.

For each kernel and setting: registers a thread, spill stores and loads (bytes), shared memory (bytes, Triton's),
and whether the PTX multiplies on wgmma / mma.sync and feeds them with asynchronous copies (cp.async), i.e. a
pipelined loop. These are compile-time facts, not timings: they say which variants to time first.

    python benchmarks/ptxas_registers.py --out benchmarks/results/ptxas_registers_sm90.json

With `--padded-heads`: show-1-base's 40 x 64 level (8 frames, 64 heads of 5) on the "pairs" kernels and on the
"padded pairs" kernels (`frame_attention.PAIRS_PADDED_HEADS`), compiled as a launch on 16-byte aligned tensors
specialises them, with the global memory instructions of their SASS counted by width (nvdisasm):

    python benchmarks/ptxas_registers.py --padded-heads --out benchmarks/results/padded_heads_sm90.json
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


def compile_for_sm90(kernel, meta: dict, options: dict | None = None, aligned: bool = False):
    """`kernel` compiled for sm_90a; `aligned`: its pointers and row / frame strides 16-byte aligned, as a launch on
    such tensors specialises them (what lets Triton vectorise their loads)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {n: "constexpr" if n in meta else "*bf16" if n.endswith("_ptr") else "fp32" if n == "scale"
                 else "i32" for n in kernel.arg_names}  # fmt: skip
    constants = {k: v for k, v in meta.items() if k in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
             if aligned and n.endswith(("_ptr", "_sn", "_sf"))}  # fmt: skip
    return triton.compile(ASTSource(kernel, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                          options=options or {})  # fmt: skip


def memory_instructions(compiled) -> dict:
    """How many global loads and stores of each width the kernel's SASS holds (`nvdisasm`, e.g. `LDG.E.128`)."""
    import os
    from collections import Counter

    import triton

    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([os.fspath(nvdisasm), "-c", os.fspath(cubin)], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    ops = Counter(m.group(1) for line in sass.splitlines()
                  if (m := re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?((?:LDG|STG|LDL|STL)[A-Z0-9_.]*)", line)))
    return dict(sorted(ops.items()))


def padded_head_rows() -> list[dict]:
    """The "pairs" and "padded pairs" kernels at show-1-base's 40 x 64 level: ptxas's report and SASS memory ops."""
    rows = []
    for kernel, width in (("pairs", 5), ("padded", fa.PADDED_HEAD)):
        x = torch.empty(4, 8, 64 * width, dtype=torch.bfloat16)
        kernels, _, meta = fa._launch(x, 64, kernel, head_channels=5)
        meta = fa._pairs_meta(meta, x, backward=True)
        warps = meta.pop("num_warps")
        for k in kernels:
            compiled = compile_for_sm90(k, meta, options={"num_warps": warps}, aligned=True)
            rows.append({"kernel": k.__name__, "shape": "40x64, heads of 5, 8 frames", **ptxas_report(compiled),
                         "memory_instructions": memory_instructions(compiled)})  # fmt: skip
            print(rows[-1], flush=True)
    return rows


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
    parser.add_argument("--padded-heads", action="store_true",
                        help="the pairs and padded pairs kernels at the 40 x 64 level, with SASS memory ops")
    args = parser.parse_args(argv)
    from triton.backends.nvidia.compiler import get_ptxas_version

    ptxas = get_ptxas_version(90).strip().splitlines()[-1]
    rows = {"padded_heads": padded_head_rows()} if args.padded_heads else {"attention": attention_rows()}
    data = {"benchmark": "ptxas_registers", "env": {**environment(torch.device("cpu"), args.commit),
                                                    "triton": triton.__version__, "target": "sm_90a",
                                                    "ptxas": ptxas},
            **rows}  # fmt: skip
    write(args.out, data)
    return data


if __name__ == "__main__":
    main()

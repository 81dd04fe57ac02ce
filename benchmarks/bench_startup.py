"""Where `train_motion`'s one-off seconds go: setup and the first steps of a process's first run, profiled.

On the show-1-base architecture with random weights (as `bench_training.py`), in one process:

1. `first`: `train_motion` for `--steps` steps, the process's first call, its setup and first step under cProfile
   (the profiler is switched off by a callback after step 1; it slows the Python it watches, so the first step's
   seconds here are an upper bound).
2. `second`: the same call again in the same process, unprofiled: what is left once the process has loaded the
   kernels and built cuDNN's plans.

The JSON holds each call's seconds (setup before the first step, each step) and the first call's functions with
the most own time and the most time including callees (cProfile's tottime and cumtime), and who called the latter.

    python benchmarks/bench_startup.py --out benchmarks/results/startup_h200.json
    python benchmarks/bench_startup.py --tiny --out /tmp/startup_tiny.json  # CPU smoke test
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_training import TINY, build_unet, environment, git_commit, inputs, write  # noqa: E402
from diffusers import DDPMScheduler  # noqa: E402

from motion_adapters.config import MotionDistillationConfig  # noqa: E402
from motion_adapters.models import show1_base_config  # noqa: E402
from motion_adapters.training import train_motion  # noqa: E402


def function_name(func: tuple[str, int, str]) -> str:
    """A pstats key (path, line, name) as "folder/file.py:line(name)", or "~(name)" for built-ins."""
    path, line, name = func
    return f"{Path(path).parent.name}/{Path(path).name}:{line}({name})" if line else f"{path}({name})"


def top_functions(profile: cProfile.Profile, key: str, rows: int) -> list[dict]:
    """cProfile's `rows` functions with the largest `key` ("tottime" or "cumtime"), in seconds."""
    entries = [{"function": function_name(func), "calls": calls, "tottime_s": round(tottime, 4),
                "cumtime_s": round(cumtime, 4)}
               for func, (_, calls, tottime, cumtime, _) in pstats.Stats(profile).stats.items()]  # fmt: skip
    entries.sort(key=lambda e: e[f"{key}_s"], reverse=True)
    return entries[:rows]


def callers_of_top(profile: cProfile.Profile, rows: int, callers: int = 4) -> list[dict]:
    """For the `rows` functions of most cumulative time: who called them, the callers of most time first."""
    top = sorted(pstats.Stats(profile).stats.items(), key=lambda item: item[1][3], reverse=True)[:rows]
    out = []
    for func, (_, _, _, cumtime, by_caller) in top:
        ranked = sorted(by_caller.items(), key=lambda item: item[1][3], reverse=True)[:callers]
        named = [{"caller": function_name(c), "cumtime_s": round(v[3], 4)} for c, v in ranked]
        out.append({"function": function_name(func), "cumtime_s": round(cumtime, 4), "callers": named})
    return out


def timed_call(unet, video, embeds, scheduler, config, profile: cProfile.Profile | None) -> dict:
    """One `train_motion` call; with `profile`, its setup and first step profiled. Seconds of setup and steps."""
    first_step_done = []

    def stop_profile(state):
        if profile is not None and not first_step_done:
            profile.disable()
        first_step_done.append(time.perf_counter())
        return False

    if unet.device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    if profile is not None:
        profile.enable()
    result = train_motion(unet, video, embeds, scheduler, config, progress=False, callbacks=[stop_profile])
    total = time.perf_counter() - began
    steps = result.extra["step_seconds"]
    return {
        "seconds": round(total, 4),
        "train_motion_seconds": round(result.seconds, 4),
        "setup_seconds": round(total - sum(steps), 4),
        "step_seconds": [round(s, 5) for s in steps],
        "losses": [round(v, 6) for v in result.losses],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/startup_h200.json"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rows", type=int, default=40, help="functions listed per key")
    parser.add_argument("--tiny", action="store_true", help="a tiny Show-1 UNet: a CPU smoke test of the code")
    parser.add_argument("--commit", default=None, help="the commit to record (default: git rev-parse)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    unet_config = TINY if args.tiny else show1_base_config()
    frames, height, width = (4, 16, 16) if args.tiny else (8, 40, 64)
    text_len, text_dim = (8, 64) if args.tiny else (77, 4096)
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    video, embeds = inputs(frames, height, width, text_len, text_dim, device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    settings = {"mixed_precision": "bf16"} if device.type == "cuda" else {"mixed_precision": "no", "cuda_graph": "no"}
    config = MotionDistillationConfig(max_train_steps=args.steps, checkpointing_steps=0, num_frames=frames, **settings)
    out = {"benchmark": "startup", "env": environment(device, args.commit or git_commit(Path(__file__).parents[1])),
           "settings": {"model": "tiny" if args.tiny else "show-1-base (random weights)", "frames": frames,
                        "height": height, "width": width, "steps": args.steps, "config": settings}}  # fmt: skip
    began = time.perf_counter()
    unet = build_unet(unet_config, 0, device, dtype)
    out["build_seconds"] = round(time.perf_counter() - began, 3)
    profile = cProfile.Profile()
    out["first"] = timed_call(unet, video, embeds, scheduler, config, profile)
    out["second"] = timed_call(unet, video, embeds, scheduler, config, None)
    out["first_profile"] = {"by_tottime": top_functions(profile, "tottime", args.rows),
                            "by_cumtime": top_functions(profile, "cumtime", args.rows),
                            "callers": callers_of_top(profile, args.rows)}  # fmt: skip
    write(args.out, out)
    for name in ("first", "second"):
        run = out[name]
        print(f"{name}: setup {run['setup_seconds']:.2f} s, steps {run['step_seconds'][:5]} ...")
    return out


if __name__ == "__main__":
    main()

"""Compile Triton kernels for a Hopper GPU (sm_90) without one: what Triton's CPU interpreter lets through."""

import os
import subprocess
import sys


def compiled_for_hopper(code: str) -> str:
    """Run `code` (which calls `triton.compile(..., target=GPUTarget("cuda", 90, 32))`) with the interpreter off.

    Returns its standard output; fails the test with its standard error when it exits with an error.
    """
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout

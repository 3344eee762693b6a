"""Ahead-of-time sm_90 compiles of Triton kernels from a test (common.grouped_gemm.aot: Triton's bundled ptxas, no
GPU), so that what the interpreter cannot show (inline PTX, static branches, atomics' ordering) fails CI instead of
a GPU session."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compile_in_child(script: str, *args: str) -> str:
    """Run `script` (python -c, with args) in a child process without TRITON_INTERPRET (this process imported
    Triton in interpreter mode) and with fp fusion on as on a GPU; return its stdout. A script prints "NO-PTXAS ..."
    where Triton has no ptxas: the test is skipped."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=600,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    if out.stdout.startswith("NO-PTXAS"):
        pytest.skip(f"no ptxas to compile for sm_90: {out.stdout}")
    return out.stdout

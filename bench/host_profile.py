#!/usr/bin/env python3
"""Host time of the eager learner step (one GPU): where the CPU spends a decode-size fwd+bwd that the GPU finishes
in a fraction of it.

Per token count: the step's host time (Python + launches, measured without waiting on the GPU) against its GPU time
from a CUDA-graph replay, for ours (with and without common/kernels/fast_launch.py) and the bf16 baseline of
bench/moe.py; the host time of one grouped GEMM call through ops (checks, the picked tile, the launch); and a
cProfile of the step (top functions by own and by cumulative time).
usage: python bench/host_profile.py [--shape dsv4] [--tokens 16,128] [--out DIR]
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe as B  # noqa: E402  (bench/moe.py: shapes, weights, both MLPs)
from learner_profile import batches, graph_ms, setup  # noqa: E402

from common.grouped_gemm import ops  # noqa: E402


def host_us(fn, n=50):
    """Mean host microseconds per call of fn, the GPU queue drained before and after (not counted)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def profile_text(fn, n=30, rows=40):
    fn()
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    st = pstats.Stats(pr, stream=out)
    st.sort_stats("tottime").print_stats(rows)
    st.sort_stats("cumulative").print_stats(rows)
    return out.getvalue()


def main():
    a, s, w, lora, gen = setup()
    lines = [f"# {torch.cuda.get_device_name(0)}, shape {a.shape}, LoRA r={B.RANK}, host us per step"]
    profiles = []
    for t, routing, xg, dy in batches(a, s, gen):
        for name, fn, fast in (("ours, Triton's launch path", B.ours_mlp, "0"), ("ours", B.ours_mlp, "1"),
                               ("bf16", B.bf16_mlp, "1")):
            os.environ["MXFP4_FAST_LAUNCH"] = fast  # common/kernels/fast_launch.py, read on every launch

            def step(fn=fn):
                return torch.autograd.grad(fn(xg, routing.offsets, w, lora, s["act"], 2.0), [xg, *lora], dy)
            for _ in range(3):
                step()
            host = host_us(step)
            eager = B.bench(step)
            graph = graph_ms(step)
            lines.append(f"| {t} | {name} | host {host:.0f} us | eager {eager * 1e3:.0f} us | graph "
                         f"{graph * 1e3:.0f} us |")
            print(lines[-1], flush=True)
            if name == "ours":
                profiles.append(f"## {t} tokens, ours\n" + profile_text(step))
        # one grouped GEMM through ops: checks, the picked tile, the (cached) launch
        c, sc = w["w2"]
        h = torch.randn(xg.shape[0], s["I"], device="cuda", dtype=torch.bfloat16, generator=gen)
        call = lambda: ops.grouped_mm_mxfp4(h, routing.offsets, c, sc)  # noqa: E731
        lines.append(f"| {t} | ops.grouped_mm_mxfp4 | host {host_us(call, 200):.1f} us |")
        print(lines[-1], flush=True)
        profiles.append(f"## {t} tokens, one ops.grouped_mm_mxfp4 call\n" + profile_text(call, 200, 25))
    text = "\n".join(lines) + "\n\n" + "\n".join(profiles)
    print(text)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "host_profile.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    sys.exit(main())

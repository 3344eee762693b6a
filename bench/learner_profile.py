#!/usr/bin/env python3
"""Where the learner's fwd+bwd time goes at small batches (one GPU): eager vs CUDA-graph replay of the same step,
and the per-kernel GPU time from torch.profiler, for ours (packed MXFP4) and the bf16 baseline of bench/moe.py.

If the eager step takes much longer than its graph replay, the step is bound by host-side launch work, not by
the kernels. usage: python bench/learner_profile.py [--shape dsv4] [--tokens 16,128] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe as B  # noqa: E402  (bench/moe.py: shapes, weights, both MLPs)

from common.grouped_gemm import permute, route  # noqa: E402


def graph_ms(step, rep=100):
    """Median ms of a CUDA-graph replay of step (captured after a warm-up on a side stream), over `rep` ms."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    return B.bench(g.replay, rep)


def kernel_table(step, rows=12):
    from torch.profiler import ProfilerActivity, profile
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows)


def setup():
    """(args, shape, weights, LoRA factors, generator) from the command line shared by the learner benches."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="dsv4")
    ap.add_argument("--tokens", default="16,128")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    s = B.SHAPES[a.shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    w, lora = B.make_weights(s, gen)
    return a, s, w, lora, gen


def batches(a, s, gen):
    """Per token count of --tokens: (tokens, routing, sorted x as a leaf wanting grad, dy), balanced routing."""
    for t in (int(v) for v in a.tokens.split(",")):
        ids = (torch.arange(t * s["k"], device="cuda") % s["E"]).view(t, s["k"])
        routing = route(ids, s["E"])
        x = permute(torch.randn(t, s["H"], device="cuda", dtype=torch.bfloat16, generator=gen), routing)
        dy = torch.randn(x.shape[0], s["H"], device="cuda", dtype=torch.bfloat16, generator=gen)
        yield t, routing, x.detach().requires_grad_(True), dy


def main():
    a, s, w, lora, gen = setup()
    lines = [f"# {torch.cuda.get_device_name(0)}, shape {a.shape}, LoRA r={B.RANK}"]
    for t, routing, xg, dy in batches(a, s, gen):
        for name, fn in (("ours", B.ours_mlp), ("bf16", B.bf16_mlp)):
            def step(fn=fn):
                return torch.autograd.grad(fn(xg, routing.offsets, w, lora, s["act"], 2.0), [xg, *lora], dy)
            eager = B.bench(step)
            graph = graph_ms(step)
            lines.append(f"| {t} | {name} | eager {eager:.3f} ms | graph {graph:.3f} ms | eager/graph "
                         f"{eager / graph:.2f} |")
            print(lines[-1], flush=True)
            print(kernel_table(step), flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "learner_profile.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())

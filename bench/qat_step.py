#!/usr/bin/env python3
"""Fake-QAT step of the expert MLP on the fused path vs a bf16 grouped-GEMM step with weight gradients, one GPU.

  ours  common.grouped_gemm.qat.MXFP4QATGroupedMLP: both masters quantized by the codec's kernel, gated + down
        MXFP4 GEMMs (in-kernel dequant), dX GEMMs, and the straight-through dW13 / dW2 as grouped dy^T x
        (wgrad backend "torch" = torch._grouped_mm, and "triton" = common/grouped_gemm/_wgrad_kernels.py)
  w4a8  ours with the MXFP8 activation fake quant before each GEMM
  bf16  torch._grouped_mm with trainable bf16 weights (fwd + dX + dW by torch autograd), bench/moe.py's bf16_mlp
Each step computes the gradients of x and of both weights (torch.autograd.grad) for a fixed dy, on expert-sorted
rows with balanced routing (bench/moe.py). The masters are the exact dequantization of random packed bytes, so
ours and bf16 compute nearly the same function: the relative L2 error of the gradients is printed as a check.
Times are triton.testing.do_bench medians (ms); peak memory is what a step allocates beyond the resident
masters. Target (issue 24): ours <= 1.1x bf16 at >= 1024 tokens.
usage: python bench/qat_step.py [--shape dsv4] [--tokens 16,256,1024,4096] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe as B  # noqa: E402  (bench/moe.py: shapes, bench, peak memory, the bf16 baseline)

from common.grouped_gemm import permute, route  # noqa: E402
from common.grouped_gemm.qat import MXFP4QATGroupedMLP, quantize_master  # noqa: E402
from common.grouped_gemm.wgrad import expert_wgrad  # noqa: E402
from common.profiles import get_profile  # noqa: E402

PROFILE = "flashinfer"


def masters(s, gen):
    """bf16 masters [E, 2I, H] and [E, H, I]: the dequantization of random packed bytes (bench/moe.py's)."""
    w, _ = B.make_weights(s, gen)
    return [w[k + "_bf16"].clone().requires_grad_(True) for k in ("w13", "w2")]


def ours(x, offs, w13, w2, act, backend="auto", act_profile=None):
    return MXFP4QATGroupedMLP.apply(x, offs, w13, w2, PROFILE, act, "halves", None, None, act_profile,
                                    ("w13", "w2"), backend)


def bf16(x, offs, w13, w2, act):
    return B.bf16_mlp(x, offs, {"w13_bf16": w13, "w2_bf16": w2}, None, act, 1.0)


def run(s, tokens, gen):
    w13, w2 = masters(s, gen)
    prof = get_profile(PROFILE)
    print(f"# masters {sum(t.numel() * 2 for t in (w13, w2)) / 1e9:.3f} GB bf16", flush=True)
    results = []
    for t in tokens:
        ids = (torch.arange(t * s["k"], device="cuda") % s["E"]).view(t, s["k"])
        routing = route(ids, s["E"])
        xt = torch.randn(t, s["H"], device="cuda", dtype=torch.bfloat16, generator=gen)
        x = permute(xt, routing).contiguous().requires_grad_(True)
        offs = routing.offsets
        dy = torch.randn(x.shape[0], s["H"], device="cuda", dtype=torch.bfloat16, generator=gen)
        leaves = [x, w13, w2]
        steps = {
            "ours": lambda: torch.autograd.grad(ours(x, offs, w13, w2, s["act"]), leaves, dy),
            "ours_triton_wgrad": lambda: torch.autograd.grad(ours(x, offs, w13, w2, s["act"], "triton"), leaves,
                                                             dy),
            "w4a8": lambda: torch.autograd.grad(ours(x, offs, w13, w2, s["act"], act_profile=PROFILE), leaves, dy),
            "bf16": lambda: torch.autograd.grad(bf16(x, offs, w13, w2, s["act"]), leaves, dy),
        }
        r = dict(shape=s, tokens=t, rows=x.shape[0])
        g_ours, g_bf16 = steps["ours"](), steps["bf16"]()
        r["rel_err_dx_dw13_dw2"] = [round(B.rel(a, b), 5) for a, b in zip(g_ours, g_bf16)]
        del g_ours, g_bf16
        for name, fn in steps.items():
            r[f"{name}_ms"] = B.bench(fn)
            r[f"{name}_peak_mb"] = B.peak_mb(fn)
        for name in ("ours", "ours_triton_wgrad", "w4a8"):
            r[f"{name}_ratio"] = r[f"{name}_ms"] / r["bf16_ms"]
        # parts of ours: the two master quantizations, and the two weight gradients by backend
        r["quantize_ms"] = B.bench(lambda: (quantize_master(w13, prof), quantize_master(w2, prof)))
        pre_rows = torch.randn(x.shape[0], 2 * s["I"], device="cuda", dtype=torch.bfloat16, generator=gen)
        act_rows = torch.randn(x.shape[0], s["I"], device="cuda", dtype=torch.bfloat16, generator=gen)
        for backend in ("torch", "triton"):
            r[f"wgrad_{backend}_ms"] = B.bench(lambda: (expert_wgrad(dy, act_rows, offs, backend=backend),
                                                        expert_wgrad(pre_rows, x.detach(), offs, backend=backend)))
        results.append(r)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "shape"}),
              flush=True)
        del x, dy, pre_rows, act_rows
        torch.cuda.empty_cache()
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="dsv4", choices=sorted(B.SHAPES))
    ap.add_argument("--tokens", default="16,256,1024,4096")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/qat_step.py needs a CUDA GPU")
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} shape {a.shape} {B.SHAPES[a.shape]}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    results = run(B.SHAPES[a.shape], [int(t) for t in a.tokens.split(",")], gen)
    print("tokens  ours ms  bf16 ms  ratio  (triton dW)  w4a8  peak MB ours/bf16")
    for r in results:
        print(f"{r['tokens']:6d} {r['ours_ms']:8.3f} {r['bf16_ms']:8.3f} {r['ours_ratio']:6.2f} "
              f"{r['ours_triton_wgrad_ratio']:11.2f} {r['w4a8_ratio']:6.2f}  "
              f"{r['ours_peak_mb']:.0f}/{r['bf16_peak_mb']:.0f}")
    with open(os.path.join(a.out, "qat_step.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Where the dense prefill path's time goes (common/grouped_gemm/dense.py), one GPU: the expert dequant (kb-major
codes -> bf16, GB/s counting packed bytes read and bf16 written, against a device copy measured in the same run),
cuBLAS's grouped GEMMs alone on the same rows, and the whole layer vs the fused layer, per token count.

usage: python3 bench/dense_parts.py [--shape dsv4|gptoss] [--tokens 1024,2048,4096,8192] [--rep 50]
Times: triton.testing.do_bench medians (ms).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe import SHAPES, bench, device_rates, random_packed  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="dsv4", choices=sorted(SHAPES))
    ap.add_argument("--tokens", default="1024,2048,4096,8192")
    ap.add_argument("--rep", type=int, default=50)
    a = ap.parse_args()
    from common import envs
    from common.grouped_gemm import dense, moe_layer_forward, route
    from common.grouped_gemm.layout import to_kb_major

    s = SHAPES[a.shape]
    e, h, i, k = s["E"], s["H"], s["I"], s["k"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = random_packed((e, 2 * i, h), gen)
    w2 = random_packed((e, h, i), gen)
    kb13, kb2 = (to_kb_major(w13[0]), w13[1]), (to_kb_major(w2[0]), w2[1])
    copy_bps, _ = device_rates()
    print(f"# {torch.cuda.get_device_name(0)}, {a.shape}: E={e} H={h} I={i} top-{k}; device copy "
          f"{copy_bps / 1e12:.2f} TB/s (read + write)")
    print("\n| weight | packed MB | bf16 MB | dequant ms | GB/s (read + write) | / copy |\n|---|---|---|---|---|---|")
    bufs = {}
    for name, w in (("w13", kb13), ("w2", kb2)):
        ne, n, kk = w[1].shape[0], w[1].shape[1], w[1].shape[2] * 32
        bufs[name] = torch.empty(ne * n * kk, dtype=torch.bfloat16, device="cuda")
        ms = bench(lambda w=w, name=name: dense.dequantize_experts(*w, out=bufs[name]), a.rep)
        packed = w[0].numel() + w[1].numel()
        moved = packed + ne * n * kk * 2
        print(f"| {name} | {packed / 1e6:.0f} | {ne * n * kk * 2 / 1e6:.0f} | {ms:.3f} | {moved / ms / 1e6:.0f} | "
              f"{moved / ms / 1e-3 / copy_bps:.2f} |")
    wb13 = dense.dequantize_experts(*kb13).clone()
    wb2 = dense.dequantize_experts(*kb2).clone()
    print("\n| tokens | rows/expert | grouped_mm w13 ms | grouped_mm w2 ms | dense layer ms | fused layer ms | "
          "dense / fused |\n|---|---|---|---|---|---|---|")
    for t in (int(v) for v in a.tokens.split(",")):
        logits = torch.randn(t, e, device="cuda", generator=gen)
        tw, ti = torch.topk(torch.softmax(logits, -1), k, dim=-1)
        tw, ti = (tw / tw.sum(-1, keepdim=True)).float(), ti.to(torch.int32)
        x = (torch.randn(t, h, device="cuda", generator=gen) * 0.5).to(torch.bfloat16)
        rt = route(ti, e)
        xs = x.index_select(0, rt.token)
        act = torch.randn(t * k, i, device="cuda", generator=gen).to(torch.bfloat16)
        g13 = bench(lambda: torch._grouped_mm(xs, wb13.transpose(1, 2), offs=rt.offsets[1:]), a.rep)
        g2 = bench(lambda: torch._grouped_mm(act, wb2.transpose(1, 2), offs=rt.offsets[1:]), a.rep)
        times = {}
        for mode in ("dense", "fused"):
            os.environ[envs.HOPPER_PREFILL.name] = mode
            times[mode] = bench(lambda: moe_layer_forward(x, ti, tw, kb13, kb2, activation=s["act"]), a.rep)
        print(f"| {t} | {t * k / e:.0f} | {g13:.3f} | {g2:.3f} | {times['dense']:.3f} | {times['fused']:.3f} | "
              f"{times['dense'] / times['fused']:.2f} |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The engine's MoE layer with expert LoRA served unmerged (issue 22 target: r=16 adapters cost <= 1.15x the layer
without them at 16 / 128 tokens, and stay <= vLLM Marlin's time without adapters at 16 tokens), replayed from a CUDA
graph as vLLM runs decode. Same packed bytes (kb-major, as hopper_triton serves them), same routing, one process.
usage: python bench/lora_layer.py [--shapes dsv4] [--tokens 16,128,1024] [--rank 16]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe as B  # noqa: E402
from learner_profile import graph_ms  # noqa: E402

from common.grouped_gemm import moe_layer_forward  # noqa: E402
from common.grouped_gemm.layout import to_kb_major  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="dsv4")
    ap.add_argument("--tokens", default="16,128,1024")
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    r = args.rank
    print(f"{torch.cuda.get_device_name()}: engine MoE layer from a CUDA graph, expert LoRA r={r} (fp32 factors, "
          f"as served) vs none; ms, median of triton.testing.do_bench")
    print("| shape | tokens | no LoRA ms | LoRA ms | ratio | rel. change of the output |")
    print("|---|---|---|---|---|---|")
    for name in args.shapes.split(","):
        s = B.SHAPES[name]
        w, _ = B.make_weights(s, gen)
        w = {n: (to_kb_major(w[n][0]), w[n][1]) for n in ("w13", "w2")}
        e, h, i = s["E"], s["H"], s["I"]
        lora = (torch.randn(e, r, h, device="cuda", generator=gen) / h ** 0.5,
                torch.randn(e, 2 * i, r, device="cuda", generator=gen) * 0.01,
                torch.randn(e, r, i, device="cuda", generator=gen) / i ** 0.5,
                torch.randn(e, h, r, device="cuda", generator=gen) * 0.01, 2.0)
        for t in map(int, args.tokens.split(",")):
            ids = (torch.arange(t * s["k"], device="cuda") % e).view(t, s["k"])
            tw = torch.softmax(torch.randn(t, s["k"], device="cuda", generator=gen), -1)
            x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16, generator=gen)

            def plain():
                return moe_layer_forward(x, ids, tw, w["w13"], w["w2"], activation=s["act"])

            def adapted():
                return moe_layer_forward(x, ids, tw, w["w13"], w["w2"], activation=s["act"], lora=lora)

            change = ((adapted().float() - plain().float()).norm() / plain().float().norm()).item()
            base, with_lora = graph_ms(plain), graph_ms(adapted)
            print(f"| {name} | {t} | {base:.3f} | {with_lora:.3f} | {with_lora / base:.2f} | {change:.1e} |",
                  flush=True)
        del w


if __name__ == "__main__":
    main()

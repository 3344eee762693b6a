#!/usr/bin/env python3
"""gpt-oss learner fwd+bwd (LoRA r=16): w13 rows as [gate; up] halves vs the interleaved (gate, up) pairs the
learner keeps from the checkpoint, same bytes, same tiles (one GPU). Eager do_bench and CUDA-graph medians, and the
largest relative difference of the gradients (the dX of w13 and the LoRA-13 terms reduce over w13's rows in
another order: fp32-close, not bitwise; the forward and d pre are bitwise, tests/common/test_grouped_gemm.py).
usage: python bench/gate_up_pairs.py [--tokens 128,1024,4096]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe as B  # noqa: E402
from learner_profile import graph_ms  # noqa: E402

from common.grouped_gemm import MXFP4GroupedMLP, permute, route  # noqa: E402


def pairs(t: torch.Tensor) -> torch.Tensor:
    """[gate; up] halves along dim -2 -> (gate, up) pairs."""
    gate, up = t.chunk(2, dim=-2)
    return torch.stack((gate, up), dim=-2).flatten(-3, -2).contiguous()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="128,1024,4096")
    a = ap.parse_args()
    s = B.SHAPES["gptoss"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    w, lora = B.make_weights(s, gen)
    layouts = {"halves": (w["w13"], lora),
               "interleaved": ((pairs(w["w13"][0]), pairs(w["w13"][1])),
                               [lora[0], pairs(lora[1].detach()).requires_grad_(True), lora[2], lora[3]])}
    print(torch.cuda.get_device_name(0), "| tokens | eager halves ms | eager pairs ms | ratio | graph halves ms | "
          "graph pairs ms | ratio | max rel diff of gradients |", flush=True)
    for t in [int(v) for v in a.tokens.split(",")]:
        ids = (torch.arange(t * s["k"], device="cuda") % s["E"]).view(t, s["k"])
        r = route(ids, s["E"])
        xg = permute(torch.randn(t, s["H"], device="cuda", dtype=torch.bfloat16, generator=gen), r)
        xg.requires_grad_(True)
        dy = torch.randn(xg.shape[0], s["H"], device="cuda", dtype=torch.bfloat16, generator=gen)

        def step(layout):
            w13, lo = layouts[layout]
            y = MXFP4GroupedMLP.apply(xg, r.offsets, *w13, *w["w2"], *lo, 2.0, "swiglu_oai", None, None, layout)
            return torch.autograd.grad(y, [xg, *lo], dy)

        gh, gp = step("halves"), step("interleaved")
        diff = max(B.rel(p, h) for p, h in zip(gp, (gh[0], gh[1], pairs(gh[2]), gh[3], gh[4])))
        eh, ep = B.bench(lambda: step("halves")), B.bench(lambda: step("interleaved"))
        ch, cp = graph_ms(lambda: step("halves")), graph_ms(lambda: step("interleaved"))
        print(f"| {t} | {eh:.3f} | {ep:.3f} | {ep / eh:.3f} | {ch:.3f} | {cp:.3f} | {cp / ch:.3f} | {diff:.1e} |",
              flush=True)


if __name__ == "__main__":
    main()

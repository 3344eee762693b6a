#!/usr/bin/env python3
"""The engine's whole MoE layer (moe_layer_forward) eager and replayed from a CUDA graph, as vLLM runs decode, for
the forward's word decode (the kernels' own choice per batch size, with and without the one-multiply scale bound)
and the byte decode (forced at every size: bench/decode_ab.py), with each output's relative error against the byte
decode's. One GPU.
usage: python bench/layer_graph.py [--shapes dsv4,gptoss] [--tokens 16,128,1024] [--decodes words,bound,bytes]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode_ab  # noqa: E402
import moe as B  # noqa: E402
from learner_profile import graph_ms  # noqa: E402

from common.grouped_gemm import moe_layer_forward  # noqa: E402
from common.grouped_gemm.layout import to_kb_major  # noqa: E402


# name: (decode_ab words setting, pass max_scale_byte, kb-major codes as the hopper_triton engine serves them; the
# word decode is the only one that reads kb-major codes)
DECODES = {"words": ("auto", False, False), "bound": ("auto", True, False), "bytes": ("off", False, False),
           "kb": ("auto", False, True), "kb_bound": ("auto", True, True)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="dsv4,gptoss")
    ap.add_argument("--tokens", default="16,128,1024")
    ap.add_argument("--decodes", default="kb,words,bound,bytes", help="words (the kernels' choice), bound (the "
                    "same with max_scale_byte), bytes (the byte decode at every size), each on canonical codes; kb, "
                    "kb_bound: the word decode on kb-major codes (the engine's layout)")
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name in args.shapes.split(","):
        s = B.SHAPES[name]
        w, _ = B.make_weights(s, gen)
        msb = max(int(w[k][1].max()) for k in ("w13", "w2"))
        w_kb = {n: (to_kb_major(w[n][0]), w[n][1]) for n in ("w13", "w2")}
        for t in map(int, args.tokens.split(",")):
            ids = (torch.arange(t * s["k"], device="cuda") % s["E"]).view(t, s["k"])
            tw = torch.softmax(torch.randn(t, s["k"], device="cuda", generator=gen), -1)
            xt = torch.randn(t, s["H"], device="cuda", dtype=torch.bfloat16, generator=gen)
            with decode_ab.forced(words="off"):
                ref = moe_layer_forward(xt, ids, tw, w["w13"], w["w2"], activation=s["act"]).float()
            for dec in args.decodes.split(","):
                words, bound, kb = DECODES[dec]
                mb = msb if bound else None
                ww = w_kb if kb else w

                def f(mb=mb, ww=ww):
                    return moe_layer_forward(xt, ids, tw, ww["w13"], ww["w2"], activation=s["act"], max_scale_byte=mb)

                with decode_ab.forced(words=words):
                    err = ((f().float() - ref).norm() / ref.norm()).item()
                    eager, graph = B.bench(f), graph_ms(f)
                print(f"{name} {t} words={words} one_mul={mb is not None} kb_major={kb}: layer eager {eager:.3f} ms "
                      f"graph {graph:.3f} ms rel vs bytes {err:.1e}", flush=True)
        del w


if __name__ == "__main__":
    main()

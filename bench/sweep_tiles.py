#!/usr/bin/env python3
"""Every tile configuration of the engine's two decode-size GEMMs, timed and checked one by one (one GPU).

For each shape and token count it launches the gated GEMM (token gather fused, output in the down GEMM's K order)
and the down GEMM (weighted scatter fused) exactly as moe_layer_forward does, with an explicit TileConfig instead
of the autotuner, and prints per config: do_bench median (ms), bandwidth reached on the active experts' packed
weights (GB/s), registers and spills of the compiled kernel, and the relative L2 error of its fp32 output against
common.grouped_gemm.reference (bound 1e-4: the products are exact, only the fp32 summation order differs). This is how the autotune
candidates of configs.py are chosen; the autotuner then picks among them per shape.
usage: python bench/sweep_tiles.py [--shapes dsv4,gptoss] [--tokens 16,128] [--kinds gated,fwd] [--layout kb]
       [--tiles 64x128x4x4,...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe as B  # noqa: E402

from common.grouped_gemm import TileConfig, grouped_mm_mxfp4, grouped_mm_mxfp4_gated, route  # noqa: E402
from common.grouped_gemm.interleave import interleave_k  # noqa: E402
from common.grouped_gemm import reference as R  # noqa: E402
from common.grouped_gemm.layout import to_kb_major  # noqa: E402
from common.grouped_gemm import ops  # noqa: E402

# (block_n, block_k, num_warps, num_stages): swap_ab decode-size tiles, 16 token rows
SWEEP = [(128, 128, 4, 3), (128, 128, 4, 4), (64, 128, 4, 4), (64, 128, 4, 6), (128, 64, 4, 4), (128, 64, 4, 6),
         (64, 64, 4, 6), (64, 64, 4, 8), (64, 256, 4, 3), (128, 256, 4, 2), (256, 64, 8, 4), (256, 128, 8, 3),
         (128, 128, 8, 4)]


def last_compiled(jit):
    """(n_regs, n_spills) of the newest kernel in a JITFunction's cache (the one the call just compiled/used)."""
    try:
        caches = jit.device_caches[torch.cuda.current_device()][0]
        k = list(caches.values())[-1]
        return k.n_regs, k.n_spills
    except Exception:  # noqa: BLE001 - cache layout differs across Triton versions; the figures are optional
        return -1, -1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="dsv4,gptoss")
    ap.add_argument("--tokens", default="16,128")
    ap.add_argument("--kinds", default="gated,fwd")
    ap.add_argument("--tiles", default="", help="comma-separated BNxBKxWARPSxSTAGES tiles instead of the built-in "
                    "sweep, e.g. 64x128x4x4,128x128x4x3")
    ap.add_argument("--layout", default="kb", choices=("kb", "canonical"),
                    help="code layout: kb-major (the hopper_triton engine's, default) or canonical")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    sweep = [tuple(int(v) for v in t.split("x")) for t in args.tiles.split(",")] if args.tiles else SWEEP
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name in args.shapes.split(","):
        s = B.SHAPES[name]
        w, _ = B.make_weights(s, gen)
        if args.layout == "kb":  # the timed and checked calls read the engine's layout, the reference canonical
            w_run = {n: (to_kb_major(w[n][0]), w[n][1]) for n in ("w13", "w2")}
        else:
            w_run = w
        for t in map(int, args.tokens.split(",")):
            ids = (torch.arange(t * s["k"], device="cuda") % s["E"]).view(t, s["k"])
            tw = torch.softmax(torch.randn(t, s["k"], device="cuda", generator=gen), -1).reshape(-1).float()
            r = route(ids, s["E"])
            xt = torch.randn(t, s["H"], device="cuda", dtype=torch.bfloat16, generator=gen)
            a = torch.randn(t * s["k"], s["I"], device="cuda", dtype=torch.bfloat16, generator=gen)
            xt_i, a_i = interleave_k(xt), interleave_k(a)
            ref = {"gated": R.grouped_mm_gated_ref(xt[r.token.long()], r.offsets, *w["w13"],
                                                   activation=s["act"])[0],
                   "fwd": R.grouped_mm_ref(a, r.offsets, *w["w2"])}
            # packed bytes the GEMM must read: only experts with rows (gpt-oss at 16 tokens reaches 64 of 128)
            active = torch.unique(ids).numel() / s["E"]
            wbytes = {k: active * sum(p.numel() for p in w[n]) for k, n in (("gated", "w13"), ("fwd", "w2"))}
            for kind in args.kinds.split(","):
                for bn, bk, nw, ns in sweep:
                    cfg = TileConfig(16, bn, bk, nw, ns, swap_ab=True)
                    try:
                        if kind == "gated":
                            def run(cfg=cfg):
                                return grouped_mm_mxfp4_gated(xt_i, r.offsets, *w_run["w13"], activation=s["act"],
                                                              gather_rows=r.token, x_interleaved=True,
                                                              out_interleaved=True, config=cfg)
                            out = grouped_mm_mxfp4_gated(xt, r.offsets, *w_run["w13"], activation=s["act"],
                                                         gather_rows=r.token, out_dtype=torch.float32, config=cfg)[0]
                        else:
                            def run(cfg=cfg):
                                return grouped_mm_mxfp4(a_i, r.offsets, *w_run["w2"], scatter_rows=r.source,
                                                        row_weights=tw, x_interleaved=True, config=cfg)
                            out = grouped_mm_mxfp4(a, r.offsets, *w_run["w2"], out_dtype=torch.float32, config=cfg)
                        err = B.rel(out, ref[kind])
                        run()
                        regs, spills = last_compiled(ops._fwd_jit)
                        ms = B.bench(run)
                    except Exception as exc:  # noqa: BLE001 - a tile that does not fit is a row of the table
                        rows.append(dict(shape=name, tokens=t, kind=kind, tile=f"{bn}x{bk} w{nw} s{ns}",
                                         error=str(exc).splitlines()[0][:120]))
                        print(rows[-1], flush=True)
                        continue
                    rows.append(dict(shape=name, tokens=t, kind=kind, tile=f"{bn}x{bk} w{nw} s{ns}",
                                     ms=round(ms, 4), gbs=round(wbytes[kind] / ms / 1e6), regs=regs, spills=spills,
                                     even_k=s["H" if kind == "gated" else "I"] % bk == 0,
                                     word_pairs=cfg.word_pairs, rel_err=float(f"{err:.2e}"), ok=err < 1e-4))
                    print(rows[-1], flush=True)
        del w
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sweep_tiles.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("| shape | tokens | GEMM | tile (rows x K, warps, stages) | ms | GB/s (active packed) | regs | rel err |")
    print("|---|---|---|---|---|---|---|---|")
    for r_ in rows:
        if "ms" in r_:
            print(f"| {r_['shape']} | {r_['tokens']} | {r_['kind']} | {r_['tile']} | {r_['ms']:.4f} | {r_['gbs']} | "
                  f"{r_['regs']} | {r_['rel_err']:.1e}{'' if r_['ok'] else ' FAIL'} |")


if __name__ == "__main__":
    main()

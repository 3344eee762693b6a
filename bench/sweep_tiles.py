#!/usr/bin/env python3
"""Every tile configuration of the engine's two decode-size GEMMs, timed and checked one by one (one GPU).

For each shape and token count it launches the gated GEMM (token gather fused, output in the down GEMM's K order)
and the down GEMM (weighted scatter fused) exactly as moe_layer_forward does, with an explicit TileConfig instead
of the autotuner, and prints per config: the do_bench median of its CUDA-graph replay (ms; eager timings of calls
this short measured the host's launch path, not the GPU), bandwidth reached on the active experts' packed weights
(GB/s), registers and spills of the compiled kernel, and the relative L2 error of its fp32 output against
common.grouped_gemm.reference (bound 1e-4: the products are exact, only the fp32 summation order differs). This is
how the autotune candidates of configs.py are chosen; the autotuner then picks among them per shape.
usage: python bench/sweep_tiles.py [--shapes dsv4,gptoss] [--tokens 16,128] [--kinds gated,fwd] [--layout kb]
       [--tiles 64x128x4x4,128x128x4x2x128@32,...] [--one-mul] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe as B  # noqa: E402
from learner_profile import graph_ms  # noqa: E402

from common.grouped_gemm import TileConfig, grouped_mm_mxfp4, grouped_mm_mxfp4_gated, route  # noqa: E402
from common.grouped_gemm.interleave import reorder_k  # noqa: E402
from common.grouped_gemm import reference as R  # noqa: E402
from common.grouped_gemm.layout import to_kb_major  # noqa: E402
from common.grouped_gemm import ops  # noqa: E402

# (block_n, block_k, num_warps, num_stages): swap_ab decode-size tiles, 16 token rows
SWEEP = [(128, 128, 4, 3), (128, 128, 4, 4), (64, 128, 4, 4), (64, 128, 4, 6), (128, 64, 4, 4), (128, 64, 4, 6),
         (64, 64, 4, 6), (64, 64, 4, 8), (64, 256, 4, 3), (128, 256, 4, 2), (256, 64, 8, 4), (256, 128, 8, 3),
         (128, 128, 8, 4)]


def parse_tile(spec: str) -> TileConfig:
    """BNxBKxWARPSxSTAGES[xMAXREGS][@BLOCK_M] -> a swap_ab TileConfig (BLOCK_M 16 unless given)."""
    body, _, bm = spec.partition("@")
    f = [int(v) for v in body.split("x")]
    if len(f) not in (4, 5):
        raise SystemExit(f"--tiles: {spec!r} is not BNxBKxWARPSxSTAGES[xMAXREGS][@BLOCK_M]")
    return TileConfig(int(bm or 16), f[0], f[1], f[2], f[3], swap_ab=True, max_regs=f[4] if len(f) == 5 else None)


def tile_name(cfg: TileConfig) -> str:
    regs = f" r{cfg.max_regs}" if cfg.max_regs else ""
    return f"{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}{regs} m{cfg.block_m}"


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
    ap.add_argument("--one-mul", action="store_true", help="pass max_scale_byte=128 (the engine's one-multiply "
                    "decode; the random weights' scale bytes stay below it)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    sweep = ([parse_tile(t) for t in args.tiles.split(",")] if args.tiles
             else [TileConfig(16, bn, bk, nw, ns, swap_ab=True) for bn, bk, nw, ns in SWEEP])
    msb = ops.ONE_MUL_MAX_SCALE_BYTE if args.one_mul else None
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name in args.shapes.split(","):
        s = B.SHAPES[name]
        w, _ = B.make_weights(s, gen)
        if msb is not None and max(int(w[n][1].max()) for n in ("w13", "w2")) > msb:
            raise SystemExit(f"--one-mul: the {name} weights hold scale bytes above {msb}")
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
            # the inputs in the order the timed calls reduce in (the layer passes them so: no reordering copy)
            x_order = ops.reduction_order(w_run["w13"][0], t * s["k"])
            xt_i = reorder_k(xt, "natural", x_order)
            a_order = ops.reduction_order(w_run["w2"][0], t * s["k"])
            a_i = reorder_k(a, "natural", a_order)
            ref = {"gated": R.grouped_mm_gated_ref(xt[r.token.long()], r.offsets, *w["w13"],
                                                   activation=s["act"])[0],
                   "fwd": R.grouped_mm_ref(a, r.offsets, *w["w2"])}
            # packed bytes the GEMM must read: only experts with rows (gpt-oss at 16 tokens reaches 64 of 128)
            active = torch.unique(ids).numel() / s["E"]
            wbytes = {k: active * sum(p.numel() for p in w[n]) for k, n in (("gated", "w13"), ("fwd", "w2"))}
            for kind in args.kinds.split(","):
                for cfg in sweep:
                    try:
                        if kind == "gated":
                            def run(cfg=cfg):
                                return grouped_mm_mxfp4_gated(xt_i, r.offsets, *w_run["w13"], activation=s["act"],
                                                              gather_rows=r.token,
                                                              x_order=x_order,
                                                              out_order=a_order, max_scale_byte=msb, config=cfg)
                            out = grouped_mm_mxfp4_gated(xt, r.offsets, *w_run["w13"], activation=s["act"],
                                                         gather_rows=r.token, out_dtype=torch.float32,
                                                         max_scale_byte=msb, config=cfg)[0]
                        else:
                            def run(cfg=cfg):
                                return grouped_mm_mxfp4(a_i, r.offsets, *w_run["w2"], scatter_rows=r.source,
                                                        row_weights=tw, x_order=a_order,
                                                        max_scale_byte=msb, config=cfg)
                            out = grouped_mm_mxfp4(a, r.offsets, *w_run["w2"], out_dtype=torch.float32,
                                                   max_scale_byte=msb, config=cfg)
                        err = B.rel(out, ref[kind])
                        run()
                        regs, spills = last_compiled(ops._fwd_jit)
                        ms = graph_ms(run)
                    except Exception as exc:  # noqa: BLE001 - a tile that does not fit is a row of the table
                        rows.append(dict(shape=name, tokens=t, kind=kind, tile=tile_name(cfg),
                                         error=str(exc).splitlines()[0][:120]))
                        print(rows[-1], flush=True)
                        continue
                    rows.append(dict(shape=name, tokens=t, kind=kind, tile=tile_name(cfg),
                                     ms=round(ms, 4), gbs=round(wbytes[kind] / ms / 1e6), regs=regs, spills=spills,
                                     even_k=s["H" if kind == "gated" else "I"] % cfg.block_k == 0,
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

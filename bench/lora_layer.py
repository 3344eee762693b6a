#!/usr/bin/env python3
"""The engine's MoE layer with expert LoRA served unmerged (issue 22 target: r=16 adapters cost <= 1.15x the layer
without them at 16 / 128 tokens, and stay <= vLLM Marlin's time without adapters at 16 tokens), replayed from a CUDA
graph as vLLM runs decode. Same packed bytes (kb-major, as hopper_triton serves them), same routing, one process.

Three forwards per row: the layer without adapters; "old", the LoRA composition hopper_triton ran before this round
(fp32 factors rounded to bf16 on every call, the sorted rows copied for the A13 projection: 7 launches more than
without adapters); "new", moe_layer_forward with the bf16 kernel copies mxfp4_serve.expert_lora keeps (2 launches
more: the two rank-R projections, the A13 one gathering the rows itself). "bits" says whether new == old
(torch.equal; it held on kb-major codes until the projections split K, seventh round). "A2 fused" is "new" with
the A2 projection in the gated GEMM's epilogue up to FUSED_BUCKET rows per expert (mlp.LORA_FUSE_A2_MAX_BUCKET;
off by default since it measured slower on an H100, bench/RESULTS.md eighth round) instead of its own launch.
--rounds N times no-LoRA, A2 fused, new and Marlin N times in turn and reports medians (one machine drifts by ~1%
between minutes).
--project-tiles BLOCK_KxSTAGES[xWARPS],... also times "new" with other tiles of the projection kernel
(common.grouped_gemm.lora.PROJECT_BLOCK_K / PROJECT_STAGES, 256x4 since the H100 sweep of 2026-12-07 chose it over
128x3; the learner's projections change with it, and their bits: another K tile sums in another order; a tile past
the shared-memory budget falls back to lora.FALLBACK_TILE). --parts times each launch of the layer alone, from
its own CUDA graph, with and without the adapters' share (where the adapters' time goes). --one-mul passes
max_scale_byte=128, as hopper_triton does for a layer whose scale bytes all are <= 128 (these are).
Where vLLM is importable, vLLM's Marlin MXFP4 MoE without adapters runs on the same bytes and routing (the issue's
second baseline). usage: python bench/lora_layer.py [--shapes dsv4] [--tokens 16,128,1024] [--rank 16] [--one-mul]
                                  [--project-tiles 256x3,256x4] [--parts]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe as B  # noqa: E402
from learner_profile import graph_ms  # noqa: E402

from common.grouped_gemm import grouped_mm_mxfp4, grouped_mm_mxfp4_gated, moe_layer_forward, route  # noqa: E402
from common.grouped_gemm import lora as L  # noqa: E402
from common.grouped_gemm import mlp  # noqa: E402
from common.grouped_gemm.combine import sum_slots  # noqa: E402
from common.grouped_gemm.layout import to_kb_major  # noqa: E402
from mxfp4_serve.expert_lora import kernel_rank  # noqa: E402

FUSED_BUCKET = 64  # rows per expert up to which "A2 fused" computes the A2 projection in the gated GEMM


def marlin_or_none(w):
    """vLLM's Marlin MXFP4 MoE on the same canonical bytes (bench/vs_marlin.py), the issue's second baseline, timed
    in the same run; None where vLLM is not importable."""
    try:
        from vs_marlin import marlin_layer

        return marlin_layer(w)
    except ImportError as exc:
        print(f"# Marlin not timed: {exc}")
        return None


def old_forward(x, ids, tw, w13, w2, act, lora, max_scale_byte):
    """hopper_triton's LoRA layer before this round (commit 834f90f's parent), step by step."""
    a13, b13, a2, b2, scaling = lora
    t, k = ids.shape
    rt = route(ids, w13[0].shape[0])
    xs = x.index_select(0, rt.token.long())
    h13 = L.project(xs, rt.offsets, a13, scaling)
    y_act, _ = grouped_mm_mxfp4_gated(xs, rt.offsets, *w13, activation=act, lora=(h13, b13.to(torch.bfloat16)),
                                      max_scale_byte=max_scale_byte)
    h2 = L.project(y_act, rt.offsets, a2, scaling)
    y = grouped_mm_mxfp4(y_act, rt.offsets, *w2, lora=(h2, b2.to(torch.bfloat16)), scatter_rows=rt.source,
                         row_weights=tw.reshape(-1).float(), max_scale_byte=max_scale_byte)
    return sum_slots(y, k, x.dtype)


def kernel_copies(fp32, r):
    """The bf16 copies mxfp4_serve.expert_lora.refresh keeps: rounded by torch, rank padded by zero columns."""
    out = []
    for f, dim in zip(fp32, (1, 2, 1, 2)):
        pad = torch.zeros(*(kernel_rank(r) if d == dim else s for d, s in enumerate(f.shape)), dtype=torch.bfloat16,
                          device=f.device)
        pad.narrow(dim, 0, r).copy_(f)
        out.append(pad)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="dsv4")
    ap.add_argument("--tokens", default="16,128,1024")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--one-mul", action="store_true")
    ap.add_argument("--project-tiles", default="")
    ap.add_argument("--parts", action="store_true")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    r, msb = args.rank, (128 if args.one_mul else None)
    # BLOCK_KxSTAGES or BLOCK_KxSTAGESxWARPS (warps: lora.PROJECT_WARPS, 4 unless given)
    tiles = [(tuple(map(int, t.split("x"))) + (L.PROJECT_WARPS,))[:3] for t in args.project_tiles.split(",") if t]
    print(f"{torch.cuda.get_device_name()}: engine MoE layer from a CUDA graph, expert LoRA r={r} vs none; "
          f"max_scale_byte={msb}; projection tile {L.PROJECT_BLOCK_K}x{L.PROJECT_STAGES}; ms, median of "
          f"triton.testing.do_bench; Marlin: vLLM's MXFP4 MoE without adapters, same bytes and routing")
    extra = "".join(f" new {bk}x{st}x{wp} ms |" for bk, st, wp in tiles)
    print(f"| shape | tokens | no LoRA ms | old LoRA ms | old ratio | A2 fused ms | A2 fused ratio | new LoRA ms | "
          f"new ratio | bits new == old |{extra} Marlin ms | new / Marlin | rel. change of the output |")
    print("|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(tiles) + "---|---|---|")
    parts_rows = []
    for name in args.shapes.split(","):
        s = B.SHAPES[name]
        w, _ = B.make_weights(s, gen)
        marlin = marlin_or_none(w) if s["act"] == "silu" else None
        w = {n: (to_kb_major(w[n][0]), w[n][1]) for n in ("w13", "w2")}
        e, h, i = s["E"], s["H"], s["I"]
        fp32 = [torch.randn(e, r, h, device="cuda", generator=gen) / h ** 0.5,
                torch.randn(e, 2 * i, r, device="cuda", generator=gen) * 0.01,
                torch.randn(e, r, i, device="cuda", generator=gen) / i ** 0.5,
                torch.randn(e, h, r, device="cuda", generator=gen) * 0.01]
        served = (*kernel_copies(fp32, r), 2.0)
        for t in map(int, args.tokens.split(",")):
            ids = (torch.arange(t * s["k"], device="cuda") % e).view(t, s["k"])
            tw = torch.softmax(torch.randn(t, s["k"], device="cuda", generator=gen), -1)
            x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16, generator=gen)

            def plain():
                return moe_layer_forward(x, ids, tw, w["w13"], w["w2"], activation=s["act"], max_scale_byte=msb)

            def old():
                return old_forward(x, ids, tw, w["w13"], w["w2"], s["act"], (*fp32, 2.0), msb)

            def new():
                return moe_layer_forward(x, ids, tw, w["w13"], w["w2"], activation=s["act"], lora=served,
                                         max_scale_byte=msb)

            def fused():
                fuse, mlp.LORA_FUSE_A2_MAX_BUCKET = mlp.LORA_FUSE_A2_MAX_BUCKET, FUSED_BUCKET
                try:
                    return new()
                finally:
                    mlp.LORA_FUSE_A2_MAX_BUCKET = fuse

            same = torch.equal(new(), old())
            change = ((new().float() - plain().float()).norm() / plain().float().norm()).item()
            ti, twf = ids.to(torch.int32).contiguous(), tw.float().contiguous()
            timed = {"plain": plain, "fused": fused, "new": new}
            if marlin is not None:
                timed["marlin"] = lambda: marlin(x, twf, ti)
            runs = {key: [] for key in timed}
            for _ in range(max(1, args.rounds)):
                for key, fn in timed.items():
                    runs[key].append(graph_ms(fn))
            med = {key: sorted(v)[len(v) // 2] for key, v in runs.items()}
            base, t_fused, t_new, t_old = med["plain"], med["fused"], med["new"], graph_ms(old)
            swept = ""
            default = (L.PROJECT_BLOCK_K, L.PROJECT_STAGES, L.PROJECT_WARPS)
            ref = new()
            for tile in tiles:
                L.PROJECT_BLOCK_K, L.PROJECT_STAGES, L.PROJECT_WARPS = tile
                # "=" when the bits equal the default tile's (the MMA may chain its k-steps in the same order
                # whatever the tile), "!=" when this tile would change the learner's and the engine's bits
                swept += f" {graph_ms(new):.3f} {'=' if torch.equal(new(), ref) else '!='} |"
                L.PROJECT_BLOCK_K, L.PROJECT_STAGES, L.PROJECT_WARPS = default
            if marlin is not None:
                vs = f" {med['marlin']:.4f} | {t_new / med['marlin']:.3f} |"
            else:
                vs = " - | - |"
            print(f"| {name} | {t} | {base:.4f} | {t_old:.4f} | {t_old / base:.3f} | {t_fused:.4f} | "
                  f"{t_fused / base:.3f} | {t_new:.4f} | {t_new / base:.3f} | {same} |{swept}{vs} {change:.1e} |",
                  flush=True)
            if args.parts:
                parts_rows.append((name, t, parts(x, ids, tw, w, s["act"], served, msb)))
        del w
    if parts_rows:
        names = list(parts_rows[0][2])
        print("\nEach launch alone from its own CUDA graph, ms (median of triton.testing.do_bench); sum = the launches "
              "added up (the layer's graph also pays the gaps between them)")
        print("| shape | tokens | " + " | ".join(names) + " |")
        print("|---|---|" + "---|" * len(names))
        for name, t, row in parts_rows:
            print(f"| {name} | {t} | " + " | ".join(f"{row[n]:.4f}" for n in names) + " |", flush=True)


def parts(x, ids, tw, w, act_name, served, msb) -> dict[str, float]:
    """moe_layer_forward's launches one by one (mlp.py's order), the LoRA ones and the GEMMs with and without
    their LoRA epilogue."""
    from common.grouped_gemm.ops import reduction_order

    a13, b13, a2, b2, scaling = served
    t, k = ids.shape
    rt = route(ids, w["w13"][0].shape[0])
    rows = tw.reshape(-1).float()
    order = reduction_order(w["w2"][0], t * k)
    h13 = L.project(x, rt.offsets, a13, scaling, gather_rows=rt.token)

    def gated(lora, project=None):
        return grouped_mm_mxfp4_gated(x, rt.offsets, *w["w13"], activation=act_name, lora=lora,
                                      gather_rows=rt.token, out_order=order, max_scale_byte=msb, project=project)[0]

    act = gated(None)
    a2o = L.factor_in_order(a2, order)
    h2 = L.project(act, rt.offsets, a2o, scaling)

    def down(lora):
        return grouped_mm_mxfp4(act, rt.offsets, *w["w2"], lora=lora, scatter_rows=rt.source, row_weights=rows,
                                x_order=order, max_scale_byte=msb)

    y = down(None)
    one = torch.zeros(1, device=x.device)
    out = {"a 1-element kernel": graph_ms(lambda: one.add_(1)),
           "route": graph_ms(lambda: route(ids, w["w13"][0].shape[0])),
           "A13 project": graph_ms(lambda: L.project(x, rt.offsets, a13, scaling, gather_rows=rt.token)),
           "gated": graph_ms(lambda: gated(None)), "gated + B13": graph_ms(lambda: gated((h13, b13))),
           "gated + B13 + A2 fused": graph_ms(lambda: gated((h13, b13), (a2o, scaling))),
           "A2 project": graph_ms(lambda: L.project(act, rt.offsets, a2o, scaling)),
           "down": graph_ms(lambda: down(None)), "down + B2": graph_ms(lambda: down((h2, b2))),
           "sum slots": graph_ms(lambda: sum_slots(y, k, x.dtype))}
    out["sum, no LoRA"] = out["route"] + out["gated"] + out["down"] + out["sum slots"]
    out["sum, LoRA"] = (out["route"] + out["A13 project"] + out["gated + B13"] + out["A2 project"]
                        + out["down + B2"] + out["sum slots"])
    out["sum, LoRA, A2 fused"] = (out["sum, LoRA"] - out["gated + B13"] - out["A2 project"]
                                  + out["gated + B13 + A2 fused"])
    return out


if __name__ == "__main__":
    main()

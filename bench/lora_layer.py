#!/usr/bin/env python3
"""The engine's MoE layer with expert LoRA served unmerged (issue 22 target: r=16 adapters cost <= 1.15x the layer
without them at 16 / 128 tokens, and stay <= vLLM Marlin's time without adapters at 16 tokens), replayed from a CUDA
graph as vLLM runs decode. Same packed bytes (kb-major, as hopper_triton serves them), same routing, one process.

Three forwards per row: the layer without adapters; "old", the LoRA composition hopper_triton ran before this round
(fp32 factors rounded to bf16 on every call, the sorted rows copied for the A13 projection: 7 launches more than
without adapters); "new", moe_layer_forward with the bf16 kernel copies mxfp4_serve.expert_lora keeps (2 launches
more: the two rank-R projections, the A13 one gathering the rows itself). "bits" says whether new == old
(torch.equal; it holds on kb-major codes where both gated GEMMs get the same tile, which the autotuner picks for
each separately: tests/common/test_grouped_lora.py checks it with fixed tiles).
--project-tiles BLOCK_KxSTAGES,... also times "new" with other tiles of the projection kernel
(common.grouped_gemm.lora.PROJECT_BLOCK_K / PROJECT_STAGES, 256x4 since the H100 sweep of 2026-12-07 chose it over
128x3; the learner's projections change with it, and their bits: another K tile sums in another order; a tile past
the shared-memory budget falls back to lora.FALLBACK_TILE). --one-mul passes max_scale_byte=128, as hopper_triton
does for a layer whose scale bytes all are <= 128 (these are).
Where vLLM is importable, vLLM's Marlin MXFP4 MoE without adapters runs on the same bytes and routing (the issue's
second baseline). usage: python bench/lora_layer.py [--shapes dsv4] [--tokens 16,128,1024] [--rank 16] [--one-mul]
                                  [--project-tiles 256x3,256x4]
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
from common.grouped_gemm.combine import sum_slots  # noqa: E402
from common.grouped_gemm.layout import to_kb_major  # noqa: E402
from mxfp4_serve.expert_lora import kernel_rank  # noqa: E402



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
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    r, msb = args.rank, (128 if args.one_mul else None)
    tiles = [tuple(map(int, t.split("x"))) for t in args.project_tiles.split(",") if t]
    print(f"{torch.cuda.get_device_name()}: engine MoE layer from a CUDA graph, expert LoRA r={r} vs none; "
          f"max_scale_byte={msb}; projection tile {L.PROJECT_BLOCK_K}x{L.PROJECT_STAGES}; ms, median of "
          f"triton.testing.do_bench; Marlin: vLLM's MXFP4 MoE without adapters, same bytes and routing")
    extra = "".join(f" new {bk}x{st} ms |" for bk, st in tiles)
    print(f"| shape | tokens | no LoRA ms | old LoRA ms | old ratio | new LoRA ms | new ratio | bits new == old |"
          f"{extra} Marlin ms | new / Marlin | rel. change of the output |")
    print("|---|---|---|---|---|---|---|---|" + "---|" * len(tiles) + "---|---|---|")
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

            same = torch.equal(new(), old())
            change = ((new().float() - plain().float()).norm() / plain().float().norm()).item()
            base, t_old, t_new = graph_ms(plain), graph_ms(old), graph_ms(new)
            swept = ""
            default = (L.PROJECT_BLOCK_K, L.PROJECT_STAGES)
            ref = new()
            for bk, st in tiles:
                L.PROJECT_BLOCK_K, L.PROJECT_STAGES = bk, st
                # "=" when the bits equal the default tile's (the MMA may chain its k-steps in the same order
                # whatever the tile), "!=" when this tile would change the learner's and the engine's bits
                swept += f" {graph_ms(new):.3f} {'=' if torch.equal(new(), ref) else '!='} |"
                L.PROJECT_BLOCK_K, L.PROJECT_STAGES = default
            if marlin is not None:
                ti, twf = ids.to(torch.int32).contiguous(), tw.float().contiguous()
                t_marlin = graph_ms(lambda: marlin(x, twf, ti))
                vs = f" {t_marlin:.3f} | {t_new / t_marlin:.2f} |"
            else:
                vs = " - | - |"
            print(f"| {name} | {t} | {base:.3f} | {t_old:.3f} | {t_old / base:.2f} | {t_new:.3f} | "
                  f"{t_new / base:.2f} | {same} |{swept}{vs} {change:.1e} |", flush=True)
        del w


if __name__ == "__main__":
    main()

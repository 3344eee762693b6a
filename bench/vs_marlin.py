#!/usr/bin/env python3
"""The engine's MoE layer against vLLM's own MXFP4 MoE on Hopper (Marlin), same GPU, same process, same weight
bytes and routing: each timed eagerly and replayed from a CUDA graph (as vLLM runs decode), outputs compared.

Needs vLLM 0.25 on a Hopper GPU. Shape: DeepSeek-V4-Flash per GPU at EP=8 (hidden
4096, moe intermediate 2048, 32 local experts, top-6, silu). Marlin gets the same canonical bytes repacked by
vLLM's own prepare_moe_mxfp4_layer_for_marlin; ours reads them in the engine's kb-major code layout (what the
hopper_triton backend serves, with its one-multiply decode when every scale byte is <= 128), and once more
canonical with two multiplies (column ours_canonical: the fourth round's engine). Floor = packed expert bytes / copy
bandwidth measured in the run.
usage: python bench/vs_marlin.py [--tokens 16,64,128,1024] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe as B  # noqa: E402
from learner_profile import graph_ms  # noqa: E402

from common.grouped_gemm import moe_layer_forward  # noqa: E402
from common.grouped_gemm.layout import to_kb_major  # noqa: E402
from common.grouped_gemm.ops import ONE_MUL_MAX_SCALE_BYTE  # noqa: E402


def marlin_layer(w):
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.experts.marlin_moe import fused_marlin_moe
    from vllm.model_executor.layers.quantization.utils.marlin_utils_fp4 import prepare_moe_mxfp4_layer_for_marlin
    from vllm.scalar_type import scalar_types

    m13, m2, s13, s2, _, _ = prepare_moe_mxfp4_layer_for_marlin(
        types.SimpleNamespace(params_dtype=torch.bfloat16), w["w13"][0], w["w2"][0], w["w13"][1], w["w2"][1],
        None, None)
    qt = scalar_types.float4_e2m1f.id
    return lambda x, tw, ti: fused_marlin_moe(x, m13, m2, None, None, s13, s2, tw, ti, quant_type_id=qt,
                                              activation=MoEActivation.SILU)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="16,64,128,1024")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    s = B.SHAPES["dsv4"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    w, _ = B.make_weights(s, gen)
    packed = sum(p.numel() for n in ("w13", "w2") for p in w[n])
    copy_bw = B.device_rates()[0]
    marlin = marlin_layer(w)
    w_kb = {n: (to_kb_major(w[n][0]), w[n][1]) for n in ("w13", "w2")}
    # the engine's one-multiply decision (mxfp4_serve/backends/hopper_triton.py): every scale byte <= 128 at load
    msb = ONE_MUL_MAX_SCALE_BYTE if max(int(w[n][1].max()) for n in ("w13", "w2")) <= ONE_MUL_MAX_SCALE_BYTE else None
    print(f"one-multiply decode: {msb is not None}", flush=True)
    rows = []
    for t in map(int, a.tokens.split(",")):
        logits = torch.randn(t, s["E"], device="cuda", generator=gen)
        tw, ti = torch.topk(torch.softmax(logits, -1), s["k"], dim=-1)
        tw = (tw / tw.sum(-1, keepdim=True)).float().contiguous()
        ti = ti.to(torch.int32).contiguous()
        x = (torch.randn(t, s["H"], device="cuda", generator=gen) * 0.5).to(torch.bfloat16)
        impls = {"ours": lambda: moe_layer_forward(x, ti, tw, w_kb["w13"], w_kb["w2"], activation="silu",
                                                   max_scale_byte=msb),
                 "ours_canonical": lambda: moe_layer_forward(x, ti, tw, w["w13"], w["w2"], activation="silu"),
                 "marlin": lambda: marlin(x, tw, ti)}
        outs = {k: f().float() for k, f in impls.items()}
        active = torch.unique(ti).numel() / s["E"]
        floor = packed * active / copy_bw * 1e3
        r = dict(tokens=t, floor_ms=round(floor, 4),
                 rel_ours_vs_marlin=float(f"{((outs['ours'] - outs['marlin']).norm() / outs['marlin'].norm()):.2e}"))
        for k, f in impls.items():
            r[f"{k}_eager_ms"] = round(B.bench(f), 4)
            r[f"{k}_graph_ms"] = round(graph_ms(f), 4)
        r["ours/marlin graph"] = round(r["ours_graph_ms"] / r["marlin_graph_ms"], 3)
        r["ours/floor graph"] = round(r["ours_graph_ms"] / floor, 3)
        rows.append(r)
        print(json.dumps(r), flush=True)
    print(f"# {torch.cuda.get_device_name(0)}, copy bandwidth {copy_bw / 1e12:.2f} TB/s, packed experts "
          f"{packed / 1e6:.0f} MB")
    print("| tokens | ours graph ms | Marlin graph ms | ours / Marlin | ours eager ms | Marlin eager ms | floor ms | "
          "ours / floor | rel err ours vs Marlin |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {r['ours_graph_ms']:.3f} | {r['marlin_graph_ms']:.3f} | {r['ours/marlin graph']:.2f} | "
              f"{r['ours_eager_ms']:.3f} | {r['marlin_eager_ms']:.3f} | {r['floor_ms']:.3f} | "
              f"{r['ours/floor graph']:.2f} | {r['rel_ours_vs_marlin']:.1e} |")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "vs_marlin.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

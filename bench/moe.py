#!/usr/bin/env python3
"""Benchmark of the grouped MXFP4 MoE kernels (common.grouped_gemm) against bf16 torch._grouped_mm, one GPU.

  learner  fwd+bwd of the expert MLP with LoRA r=16 on w13 and w2: ours (packed MXFP4 base, in-kernel dequant)
           vs bf16 torch._grouped_mm with a FROZEN bf16 base (fwd + dX + LoRA grads, same LoRA), torch autograd
  engine   forward only (no LoRA) on expert-sorted rows: ours vs bf16 torch._grouped_mm
  layer    the engine's whole MoE layer, what the plugin's Hopper backend runs: moe_layer_forward = Triton routing
           + gated GEMM gathering token rows + down GEMM scattering weighted rows + the fp32 sum over top-k
  routing  route() (Triton kernels), and the former pure-torch route + permute + weighted un-permute
Shapes (per GPU): dsv4 = DeepSeek-V4-Flash at EP=8 (hidden 4096, moe intermediate 2048, 32 local experts, top-6,
silu), gptoss = gpt-oss-120b (hidden 2880, intermediate 2880, 128 experts, top-4, clamp-swiglu). Routing is
balanced (token t, slot j -> expert (t*k + j) mod E). The bf16 weights are the exact dequantization of the packed
ones, so outputs and gradients are compared (relative L2). Times are triton.testing.do_bench medians (ms); next
to each, the roofline floor max(bytes / copy bandwidth, FLOPs / bf16 matmul rate), both measured in this run.
usage: python bench/moe.py [--shapes dsv4,gptoss] [--tokens 16,128,1024,4096,16384] [--only engine|learner]
                           [--out DIR] [--decode auto|bits] [--words auto|off]
--decode / --words override the kernels' own decode choices for A/B runs (bench/decode_ab.py); one process per
setting.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch
from triton.testing import do_bench

import common
from common.grouped_gemm import MXFP4GroupedMLP, moe_layer_forward, moe_mlp_forward, permute, route, unpermute
from common.grouped_gemm.routing import route_torch
from common.grouped_gemm import activations as A
from common.grouped_gemm import ops

import decode_ab

SHAPES = {"dsv4": dict(H=4096, I=2048, E=32, k=6, act="silu"),
          "gptoss": dict(H=2880, I=2880, E=128, k=4, act="swiglu_oai")}
RANK = 16


def bench(fn, rep=100):
    return do_bench(fn, warmup=10, rep=rep, return_mode="median")


def device_rates():
    """(copy bytes/s counting read + write, bf16 matmul FLOP/s), measured now."""
    n = 1 << 29
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    tm = bench(lambda: a @ b)
    return 2 * n / (t * 1e-3), 2 * 8192 ** 3 / (tm * 1e-3)


def random_packed(shape, gen):
    """(codes, scales) of a random MXFP4 weight [E, N, K] on the GPU; e8m0 exponents 2^-9..2^-6 keep the layer's
    activations O(1) at the dsv4 and gpt-oss shapes."""
    e, n, k = shape
    codes = torch.randint(0, 256, (e, n, k // 2), dtype=torch.uint8, device="cuda", generator=gen)
    scales = torch.randint(118, 122, (e, n, k // 32), dtype=torch.uint8, device="cuda", generator=gen)
    return codes, scales


def make_weights(s, gen):
    e, h, i = s["E"], s["H"], s["I"]
    w = {}
    for name, shape in (("w13", (e, 2 * i, h)), ("w2", (e, h, i))):
        codes, scales = random_packed(shape, gen)
        w[name] = (codes, scales)
        w[name + "_bf16"] = common.dequantize((codes, scales), torch.bfloat16)
    lora = [torch.randn(e, RANK, h, device="cuda", generator=gen) / h ** 0.5,
            torch.randn(e, 2 * i, RANK, device="cuda", generator=gen) / RANK ** 0.5,
            torch.randn(e, RANK, i, device="cuda", generator=gen) / i ** 0.5,
            torch.randn(e, h, RANK, device="cuda", generator=gen) / RANK ** 0.5]
    return w, [p.requires_grad_(True) for p in lora]


def bf16_mlp(x, offs, w, lora, act, scaling):
    """The bf16 baseline: torch._grouped_mm with frozen bf16 weights, LoRA as grouped GEMMs, torch autograd."""
    o = offs[1:]

    def lin(inp, wt, la, lb):
        y = torch._grouped_mm(inp, wt.transpose(1, 2), offs=o)
        if la is not None:
            h = torch._grouped_mm(inp, la.to(torch.bfloat16).transpose(1, 2), offs=o) * scaling
            y = y + torch._grouped_mm(h, lb.to(torch.bfloat16).transpose(1, 2), offs=o)
        return y

    l13, l2 = (lora[0], lora[1]) if lora else (None, None), (lora[2], lora[3]) if lora else (None, None)
    pre = lin(x, w["w13_bf16"], *l13)
    a = A.gated(pre, act)
    return lin(a, w["w2_bf16"], *l2)


def ours_mlp(x, offs, w, lora, act, scaling):
    return MXFP4GroupedMLP.apply(x, offs, *w["w13"], *w["w2"], *lora, scaling, act, None, None)


def peak_mb(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def floors(s, m, packed_bytes, rates, learner):
    """(bytes, FLOPs, floor ms) of the engine forward or the learner fwd+bwd at m sorted rows."""
    h, i, e = s["H"], s["I"], s["E"]
    active = min(e, m) / e
    act_bytes = 2 * m * (h + 2 * i + i + h)  # x, pre, a, y (bf16) once each
    flops = 6 * m * h * i
    wbytes = packed_bytes * active
    if learner:  # weights read in fwd and bwd; dy, dpre, dx and the saved tensors re-read
        wbytes, act_bytes, flops = 2 * wbytes, 2 * act_bytes + 2 * m * (h + 2 * i + h), 2 * flops
    total = wbytes + act_bytes
    return total, flops, max(total / rates[0], flops / rates[1]) * 1e3


def run_shape(name, s, tokens, rates, gen, results, only=None, one_mul=False):
    w, lora = make_weights(s, gen)
    # --one-mul: tell the engine GEMMs the scales' bound (one host read, as an engine would at weight load)
    msb = max(int(w[k][1].max()) for k in ("w13", "w2")) if one_mul else None
    packed = sum(t.numel() for k in ("w13", "w2") for t in w[k])
    print(f"# {name}: packed expert bytes {packed / 1e9:.3f} GB, bf16 {2 * packed * 32 / 17 / 1e9:.3f} GB",
          flush=True)
    scaling = 2.0
    for t in tokens:
        ids = (torch.arange(t * s["k"], device="cuda") % s["E"]).view(t, s["k"])
        tw = torch.softmax(torch.randn(t, s["k"], device="cuda", generator=gen), -1)
        xt = torch.randn(t, s["H"], device="cuda", dtype=torch.bfloat16, generator=gen)
        r = dict(shape=name, tokens=t)

        def torch_route_permute_unpermute():
            rt = route_torch(ids, s["E"])
            return unpermute(permute(xt, rt), rt, tw)

        r["routing_torch_ms"] = bench(torch_route_permute_unpermute)
        r["routing_ms"] = bench(lambda: route(ids, s["E"]))
        routing = route(ids, s["E"])
        x = permute(xt, routing).contiguous()
        offs = routing.offsets
        m = x.shape[0]
        # engine forward
        with torch.no_grad():
            if only != "learner":
                def layer():
                    return moe_layer_forward(xt, ids, tw, w["w13"], w["w2"], activation=s["act"],
                                             max_scale_byte=msb)

                y_layer = layer()
                y_ref = unpermute(bf16_mlp(x, offs, w, None, s["act"], scaling), routing, tw)
                r["layer_rel_err"] = rel(y_layer, y_ref)
                r["layer_ours_ms"] = bench(layer)
                r["layer_ours_peak_mb"] = peak_mb(layer)
                del y_layer, y_ref
            y0 = moe_mlp_forward(x, offs, w["w13"], w["w2"], activation=s["act"], max_scale_byte=msb)
            y1 = bf16_mlp(x, offs, w, None, s["act"], scaling)
            r["engine_rel_err"] = rel(y0, y1)
            r["engine_ours_ms"] = bench(lambda: moe_mlp_forward(x, offs, w["w13"], w["w2"], activation=s["act"],
                                                                max_scale_byte=msb))
            r["engine_bf16_ms"] = bench(lambda: bf16_mlp(x, offs, w, None, s["act"], scaling))
            r["engine_ours_peak_mb"] = peak_mb(lambda: moe_mlp_forward(x, offs, w["w13"], w["w2"],
                                                                       activation=s["act"]))
            r["engine_bf16_peak_mb"] = peak_mb(lambda: bf16_mlp(x, offs, w, None, s["act"], scaling))
        r["engine_bytes"], r["engine_flops"], r["engine_floor_ms"] = floors(s, m, packed, rates, False)
        r["engine_wfloor_ms"] = packed * min(s["E"], m) / s["E"] / rates[0] * 1e3  # packed weight bytes / copy bw
        r["engine_ratio"] = r["engine_ours_ms"] / r["engine_bf16_ms"]
        if only == "engine":
            results.append(r)
            print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
            del x, y0, y1
            torch.cuda.empty_cache()
            continue
        # learner fwd + bwd
        xg = x.detach().requires_grad_(True)
        dy = torch.randn(m, s["H"], device="cuda", dtype=torch.bfloat16, generator=gen)
        leaves = [xg, *lora]

        def step(fn):
            return torch.autograd.grad(fn(xg, offs, w, lora, s["act"], scaling), leaves, dy)

        g0, g1 = step(ours_mlp), step(bf16_mlp)
        r["learner_rel_err"] = max(rel(a, b) for a, b in zip(g0, g1))
        r["learner_ours_ms"] = bench(lambda: step(ours_mlp))
        r["learner_bf16_ms"] = bench(lambda: step(bf16_mlp))
        r["learner_ours_peak_mb"] = peak_mb(lambda: step(ours_mlp))
        r["learner_bf16_peak_mb"] = peak_mb(lambda: step(bf16_mlp))
        r["learner_bytes"], r["learner_flops"], r["learner_floor_ms"] = floors(s, m, packed, rates, True)
        r["learner_ratio"] = r["learner_ours_ms"] / r["learner_bf16_ms"]
        results.append(r)
        print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
        del x, xg, dy, g0, g1, y0, y1
        torch.cuda.empty_cache()
    del w


def layer_table(results):
    lines = ["| shape | tokens | layer ours ms (routing + both GEMMs) | GEMMs only ms | route() ms | former torch "
             "routing ms | floor ms (weights) | layer / floor | peak MB | rel err vs bf16 |", "|" + "---|" * 10]
    for r in results:
        if "layer_ours_ms" not in r:
            continue
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['layer_ours_ms']:.3f} | {r['engine_ours_ms']:.3f} | "
                     f"{r['routing_ms']:.3f} | {r['routing_torch_ms']:.3f} | {r['engine_wfloor_ms']:.3f} | "
                     f"{r['layer_ours_ms'] / r['engine_wfloor_ms']:.2f} | {r['layer_ours_peak_mb']:.0f} | "
                     f"{r['layer_rel_err']:.1e} |")
    return "\n".join(lines)


def table(results):
    lines = ["| shape | tokens | learner ours ms | learner bf16 ms | ratio | floor ms | engine ours ms | engine bf16 ms "
             "| ratio | floor ms (weights) | routing ms | peak MB learner ours/bf16 | peak MB engine ours/bf16 "
             "| rel err learner/engine |", "|" + "---|" * 14]
    for r in results:
        if "learner_ours_ms" not in r:
            continue
        lines.append(
            f"| {r['shape']} | {r['tokens']} | {r['learner_ours_ms']:.3f} | {r['learner_bf16_ms']:.3f} | "
            f"{r['learner_ratio']:.2f} | {r['learner_floor_ms']:.3f} | {r['engine_ours_ms']:.3f} | "
            f"{r['engine_bf16_ms']:.3f} | {r['engine_ratio']:.2f} | {r['engine_floor_ms']:.3f} "
            f"({r['engine_wfloor_ms']:.3f}) | {r['routing_ms']:.3f} | {r['learner_ours_peak_mb']:.0f}/"
            f"{r['learner_bf16_peak_mb']:.0f} | {r['engine_ours_peak_mb']:.0f}/{r['engine_bf16_peak_mb']:.0f} | "
            f"{r['learner_rel_err']:.1e}/{r['engine_rel_err']:.1e} |")
    return "\n".join(lines)


def check_configs():
    """Every autotune candidate of every kernel vs the pure-torch reference (fp32 output, tight bound), natively."""
    from common.grouped_gemm import configs as C
    from common.grouped_gemm import reference as R
    gen = torch.Generator(device="cuda").manual_seed(1)
    e, n, k = 5, 320, 608  # k: not a multiple of any BLOCK_K; n: not a multiple of BLOCK_N
    counts = torch.tensor([0, 1, 37, 200, 3])
    offs = torch.zeros(e + 1, dtype=torch.int32, device="cuda")
    offs[1:] = counts.cumsum(0).cuda()
    m = int(counts.sum())
    q = common.quantize(torch.randn(e, 2 * n, k, device="cuda", generator=gen), profile="flashinfer")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    dy = torch.randn(m, 2 * n, device="cuda", dtype=torch.bfloat16, generator=gen)
    ref_f = R.grouped_mm_ref(x, offs, q.codes, q.scales)
    ref_d = R.grouped_mm_dx_ref(dy, offs, q.codes, q.scales)
    ref_g, _ = R.grouped_mm_gated_ref(x, offs, q.codes, q.scales, activation="silu")
    worst = 0.0
    for kind in C.KINDS:
        for cfg in C.all_candidates(kind):
            if kind == "fwd":
                err = rel(ops.grouped_mm_mxfp4(x, offs, q.codes, q.scales, out_dtype=torch.float32, config=cfg), ref_f)
            elif kind == "dx":
                err = rel(ops.grouped_mm_mxfp4_dx(dy, offs, q.codes, q.scales, out_dtype=torch.float32, config=cfg),
                          ref_d)
            else:
                a, _ = ops.grouped_mm_mxfp4_gated(x, offs, q.codes, q.scales, activation="silu",
                                                  out_dtype=torch.float32, config=cfg)
                err = rel(a, ref_g)
            worst = max(worst, err)
            print(f"# check {kind} {cfg}: rel err {err:.2e}", flush=True)
    print(f"# check worst rel err {worst:.2e} (fp32 outputs; bound 1e-4)", flush=True)
    return worst


def check_edge_scales():
    """One-hot rows through the forward GEMM with fp32 output return single dequantized weights: compare them with
    common.dequantize for every code byte and the edge scale bytes (0 and 1: subnormal weights; 252: the largest
    byte whose 6 * scale is finite; a larger one puts inf in every row, and 0 * inf poisons the one-hot sums), for
    both MMA orientations. Reported, not asserted: the in-kernel decode is exact, but the MMA may flush
    subnormals."""
    from common.grouped_gemm import TileConfig
    e, n, k = 1, 64, 256
    codes = (torch.arange(n * k // 2, device="cuda") % 256).to(torch.uint8).view(e, n, k // 2)
    sc = torch.tensor([0, 1, 2, 127, 252], dtype=torch.uint8, device="cuda")
    scales = sc[torch.arange(n * k // 32, device="cuda") % sc.numel()].view(e, n, k // 32)
    w = common.dequantize((codes, scales), torch.float32)[0].T  # [k, n]
    eye = torch.eye(k, dtype=torch.bfloat16, device="cuda")
    offs = torch.tensor([0, k], dtype=torch.int32, device="cuda")
    blk = scales[0].repeat_interleave(32, 1).T  # scale byte of each element, [k, n]
    for swap in (False, True):
        cfg = TileConfig(16, 64, 128, 4, 3, swap_ab=swap)
        y = ops.grouped_mm_mxfp4(eye, offs, codes, scales, out_dtype=torch.float32, config=cfg)
        same = (y == w) | (y.isnan() & w.isnan())
        by = {int(b): int((~same & (blk == b)).sum()) for b in sc.tolist()}
        print(f"# edge scales {cfg}: mismatching weights per scale byte {by} (of {k * n // sc.numel()} each)",
              flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="dsv4,gptoss")
    ap.add_argument("--tokens", default="16,128,1024,4096,16384")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--only", choices=("engine", "learner"), default=None)
    ap.add_argument("--no-check", action="store_true", help="skip the per-candidate correctness check (A/B reruns)")
    ap.add_argument("--one-mul", action="store_true", help="pass the weights' scale bound to the engine GEMMs "
                    "(max_scale_byte: one multiply per decoded pair when <= 128)")
    ap.add_argument("--tag", default="", help="suffix of the output files (A/B runs into one folder)")
    ap.add_argument("--decode", choices=decode_ab.DECODES, default="auto", help="bits: the fp32 bit-placement "
                    "decode even where the bf16x2 one runs (A/B)")
    ap.add_argument("--words", choices=decode_ab.WORDS, default="auto", help="off: the byte decode for canonical "
                    "codes at every batch size (A/B)")
    a = ap.parse_args()
    with contextlib.ExitStack() as stack:
        stack.enter_context(decode_ab.forced(a.decode, a.words))
        return run(a, stack)


def run(a, stack):
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(torch.cuda.get_device_name(0), "torch", torch.__version__, "triton", __import__("triton").__version__,
          time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), flush=True)
    worst = 0.0 if a.no_check else check_configs()
    if worst >= 1e-4 and ops.decode_mode() != "bits":
        print(f"# decode {ops.decode_mode()} failed the check; retrying with the bits decode", flush=True)
        stack.enter_context(decode_ab.forced("bits"))
        worst = check_configs()
    print(f"# decode: {ops.decode_mode()}, word decode: {a.words}, one multiply: {a.one_mul}", flush=True)
    check_edge_scales()
    if a.check_only:
        return 0 if worst < 1e-4 else 1
    rates = device_rates()
    print(f"# copy bandwidth {rates[0] / 1e12:.2f} TB/s, bf16 matmul {rates[1] / 1e12:.0f} TFLOP/s", flush=True)
    results = []
    t0 = time.time()
    for name in a.shapes.split(","):
        run_shape(name, SHAPES[name], [int(t) for t in a.tokens.split(",")], rates, gen, results, a.only,
                  a.one_mul)
    print(f"# total {time.time() - t0:.0f} s", flush=True)
    for kind, tuner in ops._TUNED.items():
        for key, cfg in getattr(tuner, "cache", {}).items():
            print(f"# autotune {kind} {key} -> {cfg}", flush=True)
    md = table(results) + "\n\n" + layer_table(results)
    print(md)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"moe{a.tag}.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(0), rates=rates, results=results), f, indent=1)
    with open(os.path.join(a.out, f"moe{a.tag}.md"), "w") as f:
        f.write(md + "\n")


if __name__ == "__main__":
    sys.exit(main())

"""Weight-sync benchmark without vLLM: the engine-side stage + commit (mxfp4_serve.sync.EngineSync) and the
learner-side payload build, timed directly on tensors, for packed full / packed delta / bf16 dense payloads.

    python bench/sync.py            # full: 32 experts x gate/up/down of 4096x2048 (DeepSeek-V4-Flash shard), GPU
    python bench/sync.py --small    # CI-sized shapes on CPU

Bytes are payload tensor bytes (what crosses the learner -> engine link); times exclude the transport itself
(collective_rpc / NCCL), which the bytes column lets you estimate for a given link.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import common
from common.audit import tensor_hash
from common.moe.layouts import bump_generation
from mxfp4_serve.loader import ExpertWeightLoader
from mxfp4_serve.settings import ServeSettings
from mxfp4_serve.shards import ExpertGeometry
from mxfp4_serve.sync import PROTOCOL, EngineSync
from mxfp4_train.sync.delta import block_delta

PROFILE = "flashinfer"


def engine_layer(e: int, h: int, i: int, device: str) -> tuple[nn.Module, dict]:
    geom = ExpertGeometry("model.layers.0.mlp.experts", h, i, e, e)
    root, layer = nn.Module(), nn.Module()
    params = {}
    for n, shape in geom.param_shapes().items():
        p = nn.Parameter(torch.zeros(shape, dtype=torch.uint8, device=device), requires_grad=False)
        layer.register_parameter(n, p)
        params[n] = p
    layer.mxfp4_rl_loader = ExpertWeightLoader(geom, ServeSettings(profile=PROFILE), params, lambda g: g,
                                               list(range(e)))
    root.add_module("experts", layer)
    return root, params


def synced_layer(small: bool):
    """One engine layer (dsv4 shard shape, or CI-sized on the CPU when small) with its EngineSync, a seeded generator,
    random bf16 weights and their packed bytes: ((E, H, I), device, engine params, sync, generator, dense, packed)."""
    e, h, i = (4, 256, 128) if small else (32, 4096, 2048)
    device = "cuda" if torch.cuda.is_available() and not small else "cpu"
    model, params = engine_layer(e, h, i, device)
    g = torch.Generator(device=device).manual_seed(0)
    dense = {"w13_weight": torch.randn(e, 2 * i, h, generator=g, device=device).mul_(0.02).bfloat16(),
             "w2_weight": torch.randn(e, h, i, generator=g, device=device).mul_(0.02).bfloat16()}
    packed = {n: common.quantize(w, profile=PROFILE) for n, w in dense.items()}
    return (e, h, i), device, params, EngineSync(model), g, dense, packed


def serve_again(sync: EngineSync, params: dict, packed: dict) -> None:
    """Put `packed` back into the engine's parameters behind the sync's back (a benchmark's reset), then tell the
    layers their bytes changed and read their audit hashes again, outside any timing, as a live engine holds them
    from its last commit (without the first step a delta's base check compares with the stale cached hash)."""
    for n, q in packed.items():
        params[n].copy_(q.codes)
        params[n + "_scale"].copy_(q.scales)
    for layer in sync.layers.values():
        bump_generation(layer.module)
        for n in packed:
            layer.hash(n)


def timed(fn, device: str, repeat: int, setup=lambda: None) -> float:
    setup()
    fn()  # warm-up (kernels, allocator)
    best = float("inf")
    for _ in range(repeat):
        setup()
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--delta-fraction", type=float, default=0.01, help="fraction of blocks changed for the delta")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    (e, h, i), device, params, sync, g, dense, packed = synced_layer(args.small)
    name = "model.layers.0.mlp.experts."
    rows = []

    def run(kind: str, entries: list[dict]) -> None:
        def once():
            sync.stage({"protocol": PROTOCOL, "sync_id": kind, "profile": PROFILE, "entries": entries})
            sync.commit(kind, [x["name"] for x in entries])
        nbytes = sum(v.numel() * v.element_size() for x in entries for v in x.values() if isinstance(v, torch.Tensor))
        rows.append((kind, nbytes, timed(once, device, args.repeat, setup=restore)))

    def restore() -> None:  # every run starts from the same served bytes (the delta's base)
        serve_again(sync, params, packed)

    full = [{"name": name + n, "kind": "packed", "codes": q.codes, "scales": q.scales,
             "hashes": {"full": tensor_hash(q)}} for n, q in packed.items()]
    run("packed full", full)
    run("bf16 dense (engine quantizes)", [{"name": name + n, "kind": "dense", "weight": w,
                                          "hashes": {"full": tensor_hash(packed[n])}} for n, w in dense.items()])
    # delta: flip one code in a fraction of the blocks, applied against the bytes the engine holds now
    deltas, t_build = [], 0.0
    for n, q in packed.items():
        new = common.MXFP4Tensor(q.codes.clone(), q.scales.clone(), PROFILE)
        pick = torch.rand(q.scales.shape, generator=g, device=device) < args.delta_fraction
        new.codes.view(*q.scales.shape, 16)[..., 0][pick] ^= 0x01
        t0 = time.perf_counter()
        d = block_delta(q, new)
        t_build += time.perf_counter() - t0
        deltas.append({"name": name + n, "kind": "delta", "index": d.index, "codes": d.codes, "scales": d.scales,
                       "hashes": {"full": tensor_hash(new)}, "base_hashes": {"full": tensor_hash(q)}})
    run(f"packed delta ({100 * args.delta_fraction:g}% blocks)", deltas)
    print(f"sync of {e} experts x gate/up/down (H={h}, I={i}) on {device}; delta build {1e3 * t_build:.1f} ms")
    print(f"{'payload':<34} {'MB':>10} {'stage+commit ms':>16}")
    for kind, nbytes, t in rows:
        print(f"{kind:<34} {nbytes / 1e6:>10.2f} {1e3 * t:>16.1f}")


if __name__ == "__main__":
    main()

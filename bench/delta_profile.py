#!/usr/bin/env python3
"""Where a block-delta sync's time goes, without vLLM (issue 21: through a real engine on an H100 a 1% delta of 6
dsv4 layers took longer than a full sync, bench/RESULTS.md). One dsv4 layer (32 experts, gate/up 4096x2048 and
down 2048x4096, packed), a fraction of its blocks changed; each phase alone, synchronized, median of --repeat:
  learner  block diff, lanes update and hash as a sync computes them (mxfp4_train.sync.delta.block_delta_and_lanes:
           on a GPU two kernels, common.kernels.block_diff), and the torch composition it replaced there
           (block_delta, then common.audit.mxfp4_lanes_after), the same bits, timed in the same run
  engine   mxfp4_serve.sync.EngineSync.stage of the delta entries, alone and then with the commit (canonical
           layout, bench/sync.py); on a GPU with the stage kernel (common.kernels.delta_stage) and with the torch
           operations it replaced there, timed in the same run
then each side once under torch.profiler: the ops with the most self time on the host and on the device, and the
host reads of device values (aten::_local_scalar_dense: one sync each; nonzero and unique sync as well).
usage: python bench/delta_profile.py [--fraction 0.01] [--repeat 5] [--small]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from sync import PROFILE, serve_again, synced_layer

import common
from common.audit import hash_of_lanes, mxfp4_lanes, mxfp4_lanes_after, tensor_hash
from mxfp4_serve.sync import PROTOCOL, layers
from mxfp4_train.sync.delta import block_delta, block_delta_and_lanes

SYNCING_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::unique", "aten::_unique2", "aten::item")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device: str, repeat: int, setup=lambda: None) -> float:
    setup()
    fn()  # warm-up: kernels compile, the allocator grows
    times = []
    for _ in range(repeat):
        setup()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def profiled(fn, device: str, title: str, rows: int) -> None:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        _sync(device)
    events = prof.key_averages()
    syncs = {e.key: e.count for e in events if e.key in SYNCING_OPS}
    print(f"\n### {title}: host reads of device values {syncs}")
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48))
    if device == "cuda":
        print(events.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=48))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fraction", type=float, default=0.01, help="fraction of blocks changed")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--rows", type=int, default=18, help="profiler rows per table")
    ap.add_argument("--small", action="store_true", help="CI-sized shapes on the CPU")
    args = ap.parse_args()
    (e, h, i), device, params, sync, g, _, old = synced_layer(args.small)
    new = {}
    for n, q in old.items():
        t = common.MXFP4Tensor(q.codes.clone(), q.scales.clone(), PROFILE)
        pick = torch.rand(q.scales.shape, generator=g, device=device) < args.fraction
        t.codes.view(*q.scales.shape, 16)[..., 0][pick] ^= 0x01
        new[n] = t
    old_lanes = {n: mxfp4_lanes(q) for n, q in old.items()}
    prefix = "model.layers.0.mlp.experts."

    def restore() -> None:  # the engine serves the old bytes again: every delta applies to the same base
        serve_again(sync, params, old)

    def learner(composed: bool = False) -> list[dict]:
        entries = []
        for n, q in new.items():
            if composed:
                d = block_delta(old[n], q)
                lanes = mxfp4_lanes_after(old_lanes[n], old[n], q, d.index)
            else:
                d, lanes = block_delta_and_lanes(old[n], q, old_lanes[n])
            hsh = hash_of_lanes(q.shape, q.profile, *lanes, q.codes.numel(), q.scales.numel())
            entries.append({"name": prefix + n, "kind": "delta", "index": d.index, "codes": d.codes,
                            "scales": d.scales, "hashes": {"full": hsh}, "base_hashes": {"full": base[n]}})
        return entries

    base = {n: tensor_hash(q) for n, q in old.items()}
    restore()
    entries = learner()
    counter = iter(range(10**9))

    def engine(commit: bool = True) -> None:
        sid = f"delta{next(counter)}"
        sync.stage({"protocol": PROTOCOL, "sync_id": sid, "profile": PROFILE, "entries": entries})
        if commit:
            sync.commit(sid, [x["name"] for x in entries])
        else:
            sync.abort(sid)

    def engine_ms(how: str) -> tuple[float, float]:
        """(stage ms, stage + commit ms) with the block kernels ("auto") or the torch operations ("never")."""
        layers.BLOCK_KERNELS = how
        try:
            return (median_ms(lambda: engine(commit=False), device, args.repeat, setup=restore),
                    median_ms(engine, device, args.repeat, setup=restore))
        finally:
            layers.BLOCK_KERNELS = "auto"

    blocks = sum(x["index"].shape[0] for x in entries)
    where = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    mb = sum(q.nbytes for q in new.values()) / 1e6
    print(f"one dsv4-shaped layer (E {e}, H {h}, I {i}) on {where}: {blocks} changed blocks "
          f"({100 * args.fraction:g}%), {mb:.0f} MB packed")
    composed = learner(composed=True)
    same = all(torch.equal(a[f], b[f]) and a["hashes"] == b["hashes"]
               for a, b in zip(entries, composed, strict=True) for f in ("index", "codes", "scales"))
    t_learner = median_ms(learner, device, args.repeat)
    t_composed = median_ms(lambda: learner(composed=True), device, args.repeat)
    ways = {"block kernels": "auto", "torch operations": "never"} if device == "cuda" else {"torch operations": "never"}
    t_engine = {name: engine_ms(how) for name, how in ways.items()}
    print(f"| phase | ms (median of {args.repeat}) |\n|---|---|\n| learner: diff + lanes + hash | {t_learner:.2f} |\n"
          f"| learner, torch composition (same bits: {same}) | {t_composed:.2f} |")
    for name, (stage, both) in t_engine.items():
        print(f"| engine, {name}: stage | {stage:.2f} |\n| engine, {name}: stage + commit | {both:.2f} |")
    profiled(learner, device, "learner", args.rows)
    restore()
    profiled(engine, device, "engine", args.rows)


if __name__ == "__main__":
    main()

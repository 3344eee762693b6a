"""The colocated refit's data path without vLLM (GPU): one DeepSeek-V4-Flash per-GPU expert layer (32 experts x
gate/up/down 4096x2048, packed: 428 MB) from a learner process to an engine-worker process on the same GPU through
the CUDA IPC transport (common.moe.transport "ipc"), then the worker's stage + commit of it (mxfp4_serve.sync,
audit fingerprints on the device), and the learner's own audit hashes of the layer.

    python bench/ipc_transfer.py [--repeats 5]

Each figure is the median over --repeats; GB/s = 428 MB / seconds. The control plane (vLLM's update_weights RPC, a few
kB of header) is not in these numbers: bench/refit.py measures the whole path through a real engine.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import torch

E, H, I = 32, 4096, 2048
PROFILE = "flashinfer"
NAME = "model.layers.0.mlp.experts."


def payload(device: str) -> tuple[dict, dict]:
    from common import MXFP4Tensor
    from common.moe.wire import PROTOCOL

    g = torch.Generator(device=device).manual_seed(0)
    qs = {}
    entries = []
    for w, (n, k) in (("w13_weight", (2 * I, H)), ("w2_weight", (H, I))):
        q = MXFP4Tensor(torch.randint(0, 256, (E, n, k // 2), generator=g, device=device, dtype=torch.uint8),
                        torch.randint(118, 125, (E, n, k // 32), generator=g, device=device, dtype=torch.uint8),
                        PROFILE)
        qs[w] = q
        entries.append({"name": NAME + w, "kind": "packed", "codes": q.codes, "scales": q.scales, "hashes": {}})
    return {"protocol": PROTOCOL, "sync_id": "bench", "profile": PROFILE, "entries": entries}, qs


def worker(q_in, q_out) -> None:
    import sys

    sys.path.insert(0, "bench")
    from sync import engine_layer  # bench/sync.py: one engine MoE layer's parameters and loader, no vLLM

    from common.moe import transport
    from mxfp4_serve.sync import EngineSync

    ch = transport.open_channel("ipc", "127.0.0.1", 0, 1, 2)
    model, _ = engine_layer(E, H, I, "cuda")
    sync = EngineSync(model)
    while True:
        msg = q_in.get()
        if msg is None:
            break
        header, sync_id = msg
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        p = ch.receive_tensors(header, reuse=True)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        sync.stage({**p, "sync_id": sync_id})
        res = sync.commit(sync_id, [e["name"] for e in p["entries"]])
        torch.cuda.synchronize()
        q_out.put((t1 - t0, time.perf_counter() - t1, res["hashes"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from common.audit import tensor_hash
    from common.moe import transport

    p, qs = payload("cuda")
    nbytes = sum(q.nbytes for q in qs.values())
    ch = transport.open_channel("ipc", "127.0.0.1", 0, 0, 2)
    ctx = mp.get_context("spawn")
    q_in, q_out = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=worker, args=(q_in, q_out))
    proc.start()
    rows = {"learner pack + hash": [], "IPC receive (map + copy)": [], "stage + commit (+ audit)": [], "total": []}
    for rep in range(args.repeats + 1):
        for q in qs.values():  # every expert changes: the commit rewrites all of them
            q.codes[:, 0, 0] ^= 0x01
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        hashes = {NAME + w: tensor_hash(q) for w, q in qs.items()}
        entries = [{**e, "hashes": {"full": hashes[e["name"]]}} for e in p["entries"]]
        header = ch.header({**p, "entries": entries})
        t1 = time.perf_counter()
        q_in.put((header, f"bench-{rep}"))
        t_recv, t_commit, served = q_out.get(timeout=300)
        total = time.perf_counter() - t0
        assert all(served[k] == v for k, v in hashes.items()), "served hashes differ"
        if rep:  # the first round warms kernels, the IPC mapping and the receive buffers
            for k, v in zip(rows, (t1 - t0, t_recv, t_commit, total)):
                rows[k].append(v)
    q_in.put(None)
    proc.join(60)
    ch.close()
    t = tensor_hash(qs["w13_weight"])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        t = tensor_hash(qs["w13_weight"])
        t = tensor_hash(qs["w2_weight"])
    torch.cuda.synchronize()
    hash_s = (time.perf_counter() - t0) / 5
    print(f"{torch.cuda.get_device_name()}: one dsv4 expert layer ({nbytes / 1e6:.0f} MB packed), learner -> worker "
          f"process over CUDA IPC, median of {args.repeats}")
    print("| phase | ms | GB/s of the layer |")
    print("|---|---|---|")
    for k, v in rows.items():
        m = statistics.median(v)
        print(f"| {k} | {1e3 * m:.2f} | {nbytes / m / 1e9:.1f} |")
    print(f"| audit hash of the layer alone (device fingerprint) | {1e3 * hash_s:.2f} | {nbytes / hash_s / 1e9:.1f} |")


if __name__ == "__main__":
    main()

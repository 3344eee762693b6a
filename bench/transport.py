"""The learner -> engine transport alone (common.moe.transport): one DeepSeek-V4-Flash per-GPU expert layer
(32 experts x gate/up/down 4096x2048, packed: 428 MB) broadcast from a learner process to one engine process.

    python bench/transport.py                  # Gloo on this machine's loopback (CPU)
    python bench/transport.py --transport nccl # two GPUs of one host (ranks on cuda:0 and cuda:1)

Prints the median of --repeats transfers (time from the sender's first broadcast to the receiver holding every
byte) and the effective GB/s. The old path pickled the same tensors through collective_rpc (bench/RESULTS.md:
0.15 GB/s); the header travels out of band and is not timed (a few kB of JSON).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import time

import torch

from common.moe import transport
from common.moe.wire import PROTOCOL

E, H, I = 32, 4096, 2048


def payload() -> dict:
    def packed(name, n, k):
        return {"name": name, "kind": "packed", "codes": torch.randint(0, 256, (E, n, k // 2), dtype=torch.uint8),
                "scales": torch.randint(100, 130, (E, n, k // 32), dtype=torch.uint8), "hashes": {}}

    return {"protocol": PROTOCOL, "sync_id": "bench", "profile": "flashinfer",
            "entries": [packed("model.layers.0.mlp.experts.w13_weight", 2 * I, H),
                        packed("model.layers.0.mlp.experts.w2_weight", H, I)]}


def receiver(kind: str, port: int, header: dict, repeats: int, reuse: bool, q) -> None:
    ch = transport.open_channel(kind, "127.0.0.1", port, 1, 2, device="cuda:1" if kind == "nccl" else None)
    for _ in range(repeats):
        ch.receive_tensors(header, reuse=reuse)
        if kind == "nccl":
            torch.cuda.synchronize()
        q.put(time.perf_counter())
    ch.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transport", default="gloo", choices=transport.TRANSPORTS)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-reuse", action="store_true", help="allocate the receive buffers anew for every transfer")
    args = ap.parse_args()
    p = payload()
    header = transport.header_of(p)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=receiver, args=(args.transport, port, header, args.repeats, not args.no_reuse, q))
    proc.start()
    ch = transport.open_channel(args.transport, "127.0.0.1", port, 0, 2,
                                device="cuda:0" if args.transport == "nccl" else None)
    if args.transport == "nccl":
        p = {**p, "entries": [{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in e.items()}
                              for e in p["entries"]]}
    times, nbytes = [], 0
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        nbytes = ch.send_tensors(p)
        times.append(q.get(timeout=600) - t0)
    ch.close()
    proc.join()
    med = statistics.median(times)
    print(f"{args.transport} ({'fresh' if args.no_reuse else 'reused'} receive buffers): {nbytes / 1e6:.0f} MB per layer, median {med * 1e3:.1f} ms over {args.repeats} "
          f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}): {nbytes / med / 1e9:.2f} GB/s")


if __name__ == "__main__":
    main()

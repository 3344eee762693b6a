"""The learner -> engine transport of a sync payload (common.moe.transport): header out of band, tensors broadcast
as raw bytes over a Gloo group between two real processes; every byte arrives, every dtype, empty tensors too."""

from __future__ import annotations

import multiprocessing as mp
import socket

import pytest
import torch

from common.moe import transport
from common.moe.wire import PROTOCOL, SyncPayloadError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _payload(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (4, 64, 64), generator=g, dtype=torch.uint8)
    codes[0] = 0xFF  # every bit set, and zeros, survive
    codes[1] = 0
    dense = (torch.randn(2, 32, 64, generator=g) * 1e4).to(torch.bfloat16)
    dense[0, 0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0])  # bit patterns, not values
    return {"protocol": PROTOCOL, "sync_id": "s1", "profile": "flashinfer", "entries": [
        {"name": "model.layers.0.mlp.experts.w13_weight", "kind": "packed", "codes": codes,
         "scales": torch.randint(0, 255, (4, 64, 4), generator=g, dtype=torch.uint8), "hashes": {"full": "x"}},
        {"name": "model.layers.0.mlp.experts.w2_weight", "kind": "delta",
         "index": torch.randint(0, 4, (7, 3), generator=g, dtype=torch.int32),
         "codes": torch.zeros(0, 16, dtype=torch.uint8), "scales": torch.zeros(0, dtype=torch.uint8),
         "hashes": {"full": "y"}, "base_hashes": {"full": "z"}},
        {"name": "model.layers.1.mlp.experts.w13_weight", "kind": "dense", "weight": dense, "hashes": {}},
    ]}


def _receiver(port: int, header: dict, q, read) -> None:
    ch = transport.open_channel("gloo", "127.0.0.1", port, rank=1, world_size=2, timeout_s=60)
    try:
        got = ch.receive_tensors(header)
        q.put({e["name"]: {k: v.view(torch.uint8).clone() if isinstance(v, torch.Tensor) and v.numel() else v
                           for k, v in e.items()} for e in got["entries"]})
        read.wait(120)
    finally:
        ch.close()


def _send_to_a_receiver(receiver, header: dict, payloads: list[dict]) -> tuple[list[int], dict]:
    """Run `receiver(port, header, queue, read)` in a spawned process as rank 1, send `payloads` from here as rank
    0; (bytes sent per payload, what the receiver reported). The receiver stays alive until `read` is set: the
    tensors it puts on the queue are shared through its file descriptors, which vanish with it (a receiver that
    exited first failed a CI run with "No such file or directory" in multiprocessing's resource sharer)."""
    port, ctx = _free_port(), mp.get_context("spawn")
    q, read = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=receiver, args=(port, header, q, read))
    proc.start()
    ch = transport.open_channel("gloo", "127.0.0.1", port, rank=0, world_size=2, timeout_s=60)
    try:
        sent = [ch.send_tensors(p) for p in payloads]
        got = q.get(timeout=120)
    finally:
        read.set()
        ch.close()
        proc.join(timeout=60)
    assert proc.exitcode == 0
    return sent, got


def test_payload_crosses_a_gloo_group_byte_for_byte():
    payload = _payload(seed=torch.seed() % 2**31)
    header = transport.header_of(payload)
    assert all(not isinstance(v, torch.Tensor) for e in header["entries"] for v in e.values())
    assert header["entries"][2]["fields"] == {"weight": ["bfloat16", [2, 32, 64]]}
    (sent,), got = _send_to_a_receiver(_receiver, header, [payload])
    assert sent == sum(v.numel() * v.element_size() for e in payload["entries"] for v in e.values()
                       if isinstance(v, torch.Tensor))
    for e in payload["entries"]:
        for k, v in e.items():
            if isinstance(v, torch.Tensor):
                want = v.contiguous().view(torch.uint8) if v.numel() else None
                assert (got[e["name"]][k].numel() == 0) if want is None else torch.equal(got[e["name"]][k], want)
            else:
                assert got[e["name"]][k] == v, (e["name"], k)


def test_bad_transfer_headers_are_refused_before_anything_is_received():
    ch = transport.Channel("gloo", 1, 2, group=None, device=torch.device("cpu"))  # never reaches the group
    with pytest.raises(SyncPayloadError, match=r"entry 0 \('w'\): no 'fields' describing its tensors"):
        ch.receive_tensors({"entries": [{"name": "w", "kind": "packed"}]})
    with pytest.raises(SyncPayloadError, match=r"entry 0 \('w'\): unknown dtype 'float4' in the transfer header"):
        ch.receive_tensors({"entries": [{"name": "w", "kind": "packed", "fields": {"codes": ["float4", [2]]}}]})
    with pytest.raises(RuntimeError, match="only rank 0 \\(the learner\\) sends; this is rank 1"):
        ch.send_tensors({"entries": []})
    with pytest.raises(ValueError, match=r"unknown weight-transfer transport 'tcp'; expected one of \('gloo', 'nccl', 'ipc'\)"):
        transport.open_channel("tcp", "127.0.0.1", 1, 0, 2)


def _receiver_twice(port: int, header: dict, q, read) -> None:
    ch = transport.open_channel("gloo", "127.0.0.1", port, rank=1, world_size=2, timeout_s=60)
    try:
        first = ch.receive_tensors(header, reuse=True)
        ptrs = {e["name"]: e["codes"].data_ptr() for e in first["entries"] if "codes" in e and e["codes"].numel()}
        snapshot = {e["name"]: e["codes"].clone() for e in first["entries"] if "codes" in e}
        second = ch.receive_tensors(header, reuse=True)
        q.put({"same_buffers": all(e["codes"].data_ptr() == ptrs[e["name"]] for e in second["entries"]
                                   if e["name"] in ptrs),
               "first": snapshot, "second": {e["name"]: e["codes"].clone() for e in second["entries"] if "codes" in e}})
        read.wait(120)
    finally:
        ch.close()


def test_reused_receive_buffers_take_the_next_transfer_in_place():
    a, b = _payload(seed=1), _payload(seed=2)
    header = transport.header_of(a)
    assert transport.header_of(b) == header  # same names, dtypes and shapes
    _, got = _send_to_a_receiver(_receiver_twice, header, [a, b])
    assert got["same_buffers"]
    for want, seen in ((a, got["first"]), (b, got["second"])):
        for e in want["entries"]:
            if "codes" in e:
                assert torch.equal(seen[e["name"]], e["codes"]), e["name"]

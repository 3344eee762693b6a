"""The CUDA IPC transport (common.moe.transport, transport "ipc"): a colocated learner shares one device buffer per
payload through its CUDA IPC handle, carried in the header as plain values; a worker in another process maps it and
copies every field out, a worker in the learner's own process (in-process engine core) reads the buffer directly.
GPU only; the CPU checks are the refusals."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from common.moe import transport
from common.moe.wire import PROTOCOL, SyncPayloadError

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _payload(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"protocol": PROTOCOL, "sync_id": "ipc", "profile": "flashinfer", "entries": [
        {"name": "l.w13_weight", "kind": "packed", "codes": torch.randint(0, 256, (4, 64, 33), generator=g,
                                                                             dtype=torch.uint8),
         "scales": torch.randint(100, 130, (4, 64, 3), generator=g, dtype=torch.uint8), "hashes": {}},
        {"name": "l.w13_lora", "kind": "lora", "a": torch.randn(4, 3, 66, generator=g),
         "b": torch.randn(4, 64, 3, generator=g), "hashes": {}},
        {"name": "model.norm.weight", "kind": "param", "tensor": torch.randn(7, generator=g).bfloat16(),
         "hashes": {}}]}


def _same(a: dict, b: dict) -> bool:
    for ea, eb in zip(a["entries"], b["entries"]):
        for k, v in ea.items():
            if isinstance(v, torch.Tensor):
                w = eb[k]
                if w.dtype != v.dtype or not torch.equal(w.cpu().view(torch.uint8), v.cpu().view(torch.uint8)):
                    return False
    return True


def test_ipc_needs_cuda_and_a_shared_buffer():
    if torch.cuda.is_available():
        ch = transport.open_channel("ipc", "127.0.0.1", 0, 1, 2)
        with pytest.raises(SyncPayloadError, match="carries no shared buffer"):
            ch.receive_tensors({"entries": []})
    else:
        with pytest.raises(ValueError, match="transport 'ipc' needs CUDA"):
            transport.open_channel("ipc", "127.0.0.1", 0, 0, 2)


@gpu
def test_ipc_in_the_learners_process_reads_the_buffer():
    learner = transport.open_channel("ipc", "127.0.0.1", 0, 0, 2)
    worker = transport.open_channel("ipc", "127.0.0.1", 0, 1, 2)
    for seed in (0, 1):  # the second payload reuses the learner's buffer and the worker's receive buffers
        p = _payload(seed)
        got = worker.receive_tensors(learner.header(p), reuse=True)
        assert _same(p, got)
    learner.close()


def _worker(header: dict, q, done) -> None:
    ch = transport.open_channel("ipc", "127.0.0.1", 0, 1, 2)
    got = ch.receive_tensors(header)
    torch.cuda.synchronize()
    q.put({e["name"]: {k: v.cpu() for k, v in e.items() if isinstance(v, torch.Tensor)} for e in got["entries"]})
    # stay alive until the learner has read the result: on the H100 run a worker that exited right after put() (its
    # IPC mapping torn down while the queue's feeder thread was still flushing) reached the learner as a reset pipe
    done.wait(120)
    ch.close()


@gpu
def test_ipc_to_another_process_copies_every_byte():
    learner = transport.open_channel("ipc", "127.0.0.1", 0, 0, 2)
    p = _payload(2)
    header = learner.header(p)
    ctx = mp.get_context("spawn")
    q, done = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_worker, args=(header, q, done))
    proc.start()
    got = q.get(timeout=120)
    done.set()
    proc.join(60)
    assert proc.exitcode == 0
    assert _same(p, {"entries": [got[e["name"]] for e in p["entries"]]})
    learner.close()

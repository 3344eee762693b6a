"""Moving a sync payload (common.moe.wire) from the learner to the engine workers over torch.distributed, no pickle.

The learner is rank 0 of a small process group of its own (learner + every engine worker), created without
touching the default group of either side: a TCPStore rendezvous and a Gloo (CPU) or NCCL (GPU) process group
built on it, the way vLLM's own weight-transfer engines join a trainer. A payload travels in two parts:
- its header (`header_of`): the payload with every tensor replaced by its dtype and shape, small and JSON-able,
  carried by the control plane (vLLM's `update_weights` update_info: an RPC or an HTTP body);
- its tensors, broadcast from rank 0 in header order as raw bytes (`send_tensors` / `receive_tensors`), so any
  dtype (uint8 codes and scales, bf16 dense weights, int32 delta indices) crosses every transport the same way.
A receiver allocates exactly what the header announces, on its own device; the bytes are then validated by the
engine's staging (dtype, shape, hashes) like any other payload.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

import torch
import torch.distributed as dist

from .wire import SyncPayloadError

TRANSPORTS = ("gloo", "nccl")
_FIELDS = "fields"  # header key of an entry: {field name: [dtype name, shape]} in send order


def header_of(payload: dict) -> dict:
    """The payload without its tensors: each entry's tensor fields become `fields` {name: [dtype, shape]}."""
    entries = []
    for e in payload["entries"]:
        plain = {k: v for k, v in e.items() if not isinstance(v, torch.Tensor)}
        plain[_FIELDS] = {k: [str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in e.items()
                          if isinstance(v, torch.Tensor)}
        entries.append(plain)
    return {**payload, "entries": entries}


def _dtype(name: str, where: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise SyncPayloadError(f"{where}: unknown dtype {name!r} in the transfer header")
    return dtype


@dataclasses.dataclass
class Channel:
    """One rank's end of the learner -> engine group. rank 0 sends, every other rank receives."""

    transport: str
    rank: int
    world_size: int
    group: Any  # a torch ProcessGroup (Gloo or NCCL)
    device: torch.device
    # receive buffers kept between transfers when asked (reuse=True): a weight's buffer is written in place by the
    # next transfer of the same shape instead of being allocated (and first-touched) again
    _pool: dict = dataclasses.field(default_factory=dict, repr=False)

    def _broadcast(self, t: torch.Tensor) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.group.broadcast([t], opts).wait()

    def send_tensors(self, payload: dict) -> int:
        """Rank 0: broadcast every tensor of the payload in header order; returns the bytes sent."""
        if self.rank != 0:
            raise RuntimeError(f"only rank 0 (the learner) sends; this is rank {self.rank}")
        sent = 0
        for e in payload["entries"]:
            for v in e.values():
                if isinstance(v, torch.Tensor):
                    t = v.detach().to(self.device).contiguous()
                    if t.numel():
                        self._broadcast(t.view(-1).view(torch.uint8))
                    sent += t.numel() * t.element_size()
        return sent

    def receive_tensors(self, header: dict, reuse: bool = False) -> dict:
        """Every other rank: allocate what `header` announces on this rank's device and receive it in order;
        returns the full payload (the header's fields replaced by tensors). reuse=True receives into the buffers of
        the previous call where name, field, dtype and shape match: the caller must be done with that payload."""
        entries = []
        for i, e in enumerate(header.get("entries", [])):
            where = f"transfer header entry {i} ({e.get('name')!r})"
            fields = e.get(_FIELDS)
            if not isinstance(fields, dict):
                raise SyncPayloadError(f"{where}: no '{_FIELDS}' describing its tensors")
            entry = {k: v for k, v in e.items() if k != _FIELDS}
            for name, spec in fields.items():
                dtype, shape = _dtype(spec[0], where), [int(s) for s in spec[1]]
                key = (e.get("name"), name, dtype, tuple(shape))
                t = self._pool.get(key) if reuse else None
                if t is None:
                    t = torch.empty(shape, dtype=dtype, device=self.device)
                    if reuse:
                        self._pool[key] = t
                if t.numel():
                    self._broadcast(t.view(-1).view(torch.uint8))
                entry[name] = t
            entries.append(entry)
        return {**header, "entries": entries}

    def close(self) -> None:
        self._pool.clear()
        group, self.group = self.group, None
        if group is not None and hasattr(group, "shutdown"):
            group.shutdown()


def open_channel(transport: str, master_address: str, master_port: int, rank: int, world_size: int, *,
                 timeout_s: float = 300.0, device: torch.device | str | None = None) -> Channel:
    """Join the learner -> engine group as `rank` (0 = the learner, which also hosts the rendezvous store).
    Every rank must call this within `timeout_s`. Gloo moves CPU tensors (CI, CPU engines); NCCL GPU tensors."""
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown weight-transfer transport {transport!r}; expected one of {TRANSPORTS}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside the transfer group of size {world_size}")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_address, int(master_port), world_size, rank == 0, timeout=timeout)
    if transport == "gloo":
        group = dist.ProcessGroupGloo(store, rank, world_size, timeout)
        dev = torch.device("cpu")
    else:
        dev = torch.device(device if device is not None else f"cuda:{torch.cuda.current_device()}")
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        group = dist.ProcessGroupNCCL(store, rank, world_size, opts)
    return Channel(transport, rank, world_size, group, dev)

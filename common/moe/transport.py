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

Transport "ipc" (a learner colocated with the engine on one GPU, the verl / checkpoint-engine pattern) moves no
bytes through a group: the learner packs a payload's tensors into one device buffer and the header carries its CUDA
IPC handle (plain ints and base64 strings, never a pickle); each engine worker maps that buffer and copies its fields
device to device. The learner keeps the buffer until the worker's update_weights returned.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from .wire import SyncPayloadError

TRANSPORTS = ("gloo", "nccl", "ipc")
_IPC = "ipc"  # header key of a payload sent through CUDA IPC: the shared buffer's handle and each field's offset
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


def _fields_in_order(header: dict):
    """(entry index, entry, field name, dtype name, shape) in send order, checked."""
    for i, e in enumerate(header.get("entries", [])):
        where = f"transfer header entry {i} ({e.get('name')!r})"
        fields = e.get(_FIELDS)
        if not isinstance(fields, dict):
            raise SyncPayloadError(f"{where}: no '{_FIELDS}' describing its tensors")
        for name, spec in fields.items():
            yield i, e, where, name, _dtype(spec[0], where), [int(s) for s in spec[1]]


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

    def header(self, payload: dict) -> dict:
        """What the control plane carries for this payload (send_tensors then moves the tensors)."""
        return header_of(payload)

    def _buffer(self, e: dict, name: str, dtype: torch.dtype, shape: list[int], reuse: bool) -> torch.Tensor:
        key = (e.get("name"), name, dtype, tuple(shape))
        t = self._pool.get(key) if reuse else None
        if t is None:
            t = torch.empty(shape, dtype=dtype, device=self.device)
            if reuse:
                self._pool[key] = t
        return t

    def receive_tensors(self, header: dict, reuse: bool = False) -> dict:
        """Every other rank: allocate what `header` announces on this rank's device and receive it in order;
        returns the full payload (the header's fields replaced by tensors). reuse=True receives into the buffers of
        the previous call where name, field, dtype and shape match: the caller must be done with that payload."""
        entries = [{k: v for k, v in e.items() if k != _FIELDS} for e in header.get("entries", [])]
        for i, e, _, name, dtype, shape in _fields_in_order(header):
            t = self._buffer(e, name, dtype, shape, reuse)
            if t.numel():
                self._broadcast(t.view(-1).view(torch.uint8))
            entries[i][name] = t
        return {**header, "entries": entries}

    def close(self) -> None:
        self._pool.clear()
        group, self.group = self.group, None
        if group is not None and hasattr(group, "shutdown"):
            group.shutdown()


def _gpu_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def _share(buf: torch.Tensor) -> dict:
    """The CUDA IPC handle of a flat uint8 buffer as JSON-able values (torch's reduce_tensor, minus the classes
    and dtype that a receiver knows anyway: no pickle crosses the control plane)."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(buf)
    (_, size, stride, offset, _, _, _, handle, nbytes, storage_offset, _, ref_handle, ref_offset, event,
     event_sync) = args

    def b64(x) -> str | None:
        return None if x is None else base64.b64encode(bytes(x)).decode()

    return {"uuid": _gpu_uuid(buf.device), "numel": int(buf.numel()), "size": list(size), "stride": list(stride),
            "offset": int(offset), "handle": b64(handle), "nbytes": int(nbytes), "storage_offset": int(storage_offset),
            "ref_handle": b64(ref_handle), "ref_offset": int(ref_offset), "event": b64(event),
            "event_sync": bool(event_sync)}


def _open(shared: dict, device: torch.device) -> torch.Tensor:
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    def raw(x):
        return None if x is None else base64.b64decode(x)

    # the handle names memory of the learner's GPU: map it on the device of that UUID in this process
    index = next((i for i in range(torch.cuda.device_count()) if _gpu_uuid(torch.device("cuda", i)) == shared["uuid"]),
                 None)
    if index is None:
        raise SyncPayloadError(f"CUDA IPC transfer: the learner's buffer lives on GPU {shared['uuid']}, which this "
                               f"engine worker cannot see; use transport 'nccl' for a learner on other GPUs")
    return rebuild_cuda_tensor(torch.Tensor, torch.Size(shared["size"]), tuple(shared["stride"]), shared["offset"],
                               torch.UntypedStorage, torch.uint8, index, raw(shared["handle"]), shared["nbytes"],
                               shared["storage_offset"], False, raw(shared["ref_handle"]), shared["ref_offset"],
                               raw(shared["event"]), shared["event_sync"])


_ALIGN = 256  # every field starts on a 256-byte boundary of the shared buffer (any dtype's alignment)
# CUDA cannot open an IPC handle in the process that exported it: an engine whose workers run in the learner's
# process (in-process engine core, VLLM_ENABLE_V1_MULTIPROCESSING=0) finds the learner's buffer here instead
_LOCAL_BUFFERS: dict[int, torch.Tensor] = {}


class IPCChannel(Channel):
    """Learner and engine workers on one machine, the learner's tensors on a GPU the workers can map (colocated)."""

    def __init__(self, rank: int, device: torch.device) -> None:
        super().__init__("ipc", rank, 0, None, device)
        self._send_buffer: torch.Tensor | None = None
        self._keep: torch.Tensor | None = None

    def header(self, payload: dict) -> dict:
        """Pack the payload's tensors into the learner's shared buffer; the header carries its handle."""
        fields, total = [], 0
        for e in payload["entries"]:
            for k, v in e.items():
                if isinstance(v, torch.Tensor):
                    nbytes = v.numel() * v.element_size()
                    fields.append((v, total, nbytes))
                    total += -(-nbytes // _ALIGN) * _ALIGN
        buf = self._send_buffer
        if buf is None or buf.numel() < total:  # grown once to the largest payload, then reused
            buf = self._send_buffer = torch.empty(max(total, _ALIGN), dtype=torch.uint8, device=self.device)
        for v, start, nbytes in fields:
            if nbytes:
                buf[start:start + nbytes].copy_(v.detach().contiguous().view(-1).view(torch.uint8), non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()  # the worker reads on its own stream
        self._keep = buf
        _LOCAL_BUFFERS[id(self)] = buf
        shared = {**_share(buf), "pid": os.getpid(), "local": id(self)}
        return {**header_of(payload), _IPC: {"buffer": shared, "offsets": [s for _, s, _ in fields]}}

    def send_tensors(self, payload: dict) -> int:
        # the bytes went with the header (shared memory); the buffer stays alive (self._keep) until the next header
        return sum(v.numel() * v.element_size() for e in payload["entries"] for v in e.values()
                   if isinstance(v, torch.Tensor))

    def receive_tensors(self, header: dict, reuse: bool = False) -> dict:
        shared = header.get(_IPC)
        if not isinstance(shared, dict) or "buffer" not in shared:
            raise SyncPayloadError("CUDA IPC transfer: the header carries no shared buffer ('ipc')")
        if shared["buffer"].get("pid") == os.getpid() and shared["buffer"].get("local") in _LOCAL_BUFFERS:
            src = _LOCAL_BUFFERS[shared["buffer"]["local"]]
        else:
            src = _open(shared["buffer"], self.device)
        try:
            entries = [{k: v for k, v in e.items() if k != _FIELDS} for e in header.get("entries", [])]
            offsets = list(shared["offsets"])
            for j, (i, e, where, name, dtype, shape) in enumerate(_fields_in_order(header)):
                t = self._buffer(e, name, dtype, shape, reuse)
                nbytes = t.numel() * t.element_size()
                if j >= len(offsets) or offsets[j] + nbytes > src.numel():
                    raise SyncPayloadError(f"{where}: field '{name}' lies outside the shared buffer")
                if nbytes:
                    t.view(-1).view(torch.uint8).copy_(src[offsets[j]:offsets[j] + nbytes])
                entries[i][name] = t
            torch.cuda.current_stream(self.device).synchronize()  # done reading the learner's memory
        finally:
            del src
        return {**{k: v for k, v in header.items() if k != _IPC}, "entries": entries}

    def close(self) -> None:
        self._pool.clear()
        _LOCAL_BUFFERS.pop(id(self), None)
        self._send_buffer = self._keep = None


def open_channel(transport: str, master_address: str, master_port: int, rank: int, world_size: int, *,
                 timeout_s: float = 300.0, device: torch.device | str | None = None) -> Channel:
    """Join the learner -> engine group as `rank` (0 = the learner, which also hosts the rendezvous store).
    Every rank must call this within `timeout_s`. Gloo moves CPU tensors (CI, CPU engines); NCCL GPU tensors."""
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown weight-transfer transport {transport!r}; expected one of {TRANSPORTS}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside the transfer group of size {world_size}")
    if transport == "ipc":  # no group: the handle travels with each header
        if not torch.cuda.is_available():
            raise ValueError("weight-transfer transport 'ipc' needs CUDA (colocated learner and engine on a GPU); "
                             "use 'gloo' on CPU")
        return IPCChannel(rank, torch.device(device if device is not None else f"cuda:{torch.cuda.current_device()}"))
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

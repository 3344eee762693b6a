"""The weight-sync wire format as the engine reads it (protocol `mxfp4_rl.sync/1`, docs/sync.md).

The learner (mxfp4_train.sync) and the engine do not import each other (DESIGN "Rooms"), so the format is a plain,
versioned dict that both sides document and test against each other:

    {"protocol": "mxfp4_rl.sync/1", "sync_id": str, "profile": str, "entries": [entry, ...]}

One entry per packed weight (codes + scales of one MoE layer's w13 or w2), named like the engine's parameter
("model.layers.0.mlp.experts.w13_weight"), with the FULL (all ranks) logical shape [E, N, K]:
- kind "packed": codes uint8 [E, N, K/2], scales uint8 [E, N, K/32] (canonical layout, w13 rows = [w1; w3]);
- kind "delta":  index int32 [M, 3] of (expert, row, block) triples in the full tensor, codes uint8 [M, 16],
                 scales uint8 [M]; applied onto the bytes whose hash is `base_hash`;
- kind "dense":  weight float [E, N, K] (bf16 / fp32) that the engine quantizes with ITS profile.
Each entry carries `hashes`: {shard key: audit hash} of what the rank holding that shard must end up serving (the
key is `shard_key(descriptor)`, "full" for an unsharded engine), and delta entries `base_hashes` likewise.
Tensors arrive as torch tensors (in-process engines, or VLLM_ALLOW_INSECURE_SERIALIZATION=1), numpy arrays, or
{"dtype", "shape", "data": bytes} blobs that msgpack carries without pickle.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from common.errors import MXFP4Error

PROTOCOL = "mxfp4_rl.sync/1"
KINDS = ("packed", "delta", "dense")
FULL_KEY = "full"
_DENSE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class SyncError(MXFP4Error):
    """A weight sync was refused; the engine keeps serving the previous version."""


class SyncPayloadError(SyncError):
    """A payload entry is malformed or corrupted (wrong dtype/shape, hash mismatch)."""


class SyncProfileError(SyncError):
    """The learner quantized with another codec profile than the engine serves."""


class SyncStateError(SyncError):
    """The sync does not apply to what the engine holds (unknown sync id, stale base, concurrent commit)."""


def shard_key(descriptor: dict | None) -> str:
    """Stable key of a shard descriptor ("full" when the rank holds the whole tensor)."""
    if descriptor is None:
        return FULL_KEY
    return json.dumps(descriptor, sort_keys=True, separators=(",", ":"))


def as_tensor(value, where: str, field: str) -> torch.Tensor:
    """A payload field as a CPU/GPU torch tensor (no copy when it already is one)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, dict) and {"dtype", "shape", "data"} <= set(value):
        dtype = getattr(torch, str(value["dtype"]).removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise SyncPayloadError(f"{where}: field '{field}' has unknown dtype {value['dtype']!r}")
        data = value["data"]
        shape = tuple(int(s) for s in value["shape"])
        n = int(np.prod(shape)) if shape else 1
        itemsize = torch.empty((), dtype=dtype).element_size()
        if len(data) != n * itemsize:
            raise SyncPayloadError(f"{where}: field '{field}' blob holds {len(data)} bytes, expected {n * itemsize} "
                                   f"for {value['dtype']} {list(shape)} (truncated or corrupted payload)")
        if n == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)
    raise SyncPayloadError(f"{where}: field '{field}' must be a tensor, ndarray or blob dict, got "
                           f"{type(value).__name__}")


def field(entry: dict, name: str, where: str, dtype: torch.dtype | tuple, shape: tuple | None) -> torch.Tensor:
    """entry[name] as a tensor of the expected dtype(s) and shape, or a SyncPayloadError naming the parameter."""
    if name not in entry:
        raise SyncPayloadError(f"{where}: entry of kind {entry.get('kind')!r} lacks field '{name}'")
    t = as_tensor(entry[name], where, name)
    allowed = dtype if isinstance(dtype, tuple) else (dtype,)
    if t.dtype not in allowed:
        raise SyncPayloadError(f"{where}: field '{name}' must have dtype {' or '.join(map(str, allowed))}, "
                               f"got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise SyncPayloadError(f"{where}: field '{name}' must have shape {list(shape)}, got {list(t.shape)}")
    return t


def check_header(payload: dict, engine_profile: str) -> None:
    """Protocol version and profile: refuse before touching any tensor."""
    if not isinstance(payload, dict):
        raise SyncPayloadError(f"sync payload must be a dict, got {type(payload).__name__}")
    proto = payload.get("protocol")
    if proto != PROTOCOL:
        raise SyncPayloadError(f"sync payload protocol {proto!r} is not supported; this engine speaks {PROTOCOL!r}")
    if not payload.get("sync_id"):
        raise SyncPayloadError("sync payload has no 'sync_id'")
    profile = payload.get("profile")
    if profile != engine_profile:
        raise SyncProfileError(
            f"sync refused: the learner quantized with MXFP4 profile {profile!r} but this engine serves profile "
            f"{engine_profile!r} (from its checkpoint's quantization_config); bytes of another profile would not "
            f"be what the engine quantizes to. Convert the learner with profile={engine_profile!r}")
    entries = payload.get("entries")
    if not isinstance(entries, list):
        raise SyncPayloadError("sync payload 'entries' must be a list")
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or e.get("kind") not in KINDS or not isinstance(e.get("name"), str):
            raise SyncPayloadError(f"sync payload entry {i}: needs 'name' (str) and 'kind' in {KINDS}, got "
                                   f"{ {k: e.get(k) for k in ('name', 'kind')} if isinstance(e, dict) else e!r}")


def dense_dtypes() -> tuple[torch.dtype, ...]:
    return _DENSE_DTYPES

"""The weight-sync wire format (protocol `mxfp4_rl.sync/1`), its encodings and its errors: one definition that the
learner writes (mxfp4_train.sync) and the engine reads (mxfp4_serve.sync). docs/sync.md describes it.

    {"protocol": "mxfp4_rl.sync/1", "sync_id": str, "profile": str, "entries": [entry, ...]}

One entry per packed weight (codes + scales of one MoE layer's w13 or w2), named like the engine's parameter
("model.layers.0.mlp.experts.w13_weight"), with the FULL (all ranks) logical shape [E, N, K]:
- kind "packed": codes uint8 [E, N, K/2], scales uint8 [E, N, K/32] (canonical layout, w13 rows = [w1; w3]);
- kind "delta":  index int32 [M, 3] of (expert, row, block) triples in the full tensor, codes uint8 [M, 16],
                 scales uint8 [M]; applied onto the bytes whose hash is `base_hash`;
- kind "dense":  weight float [E, N, K] (bf16 / fp32) that the engine quantizes with ITS profile;
- kind "bias":   "<layer>.w13_bias" / "<layer>.w2_bias": tensor [E, N] in the engine's bias dtype (gpt-oss), rows
                 canonical (w13 = [gate; up]);
- kind "lora":   "<layer>.w13_lora" / "<layer>.w2_lora": the packed weight's adapter, served unmerged: a fp32 [E, r, K], b fp32
                 [E, N, r] (w13 rows canonical), for an engine whose quantization_config has "expert_lora";
- kind "param":  a non-expert parameter under its checkpoint name ("model.layers.0.self_attn.q_proj.weight"),
                 tensor in the engine's dtype, loaded through the engine model's own load_weights.
Each entry carries `hashes`: {shard key: audit hash} of what the rank holding that shard must end up serving (the
key is `shard_key(descriptor)`, "full" for an unsharded engine; a descriptor is {"experts": [global ids], "rows":
[[a, b], ...], "blocks": [b0, b1]}), and delta entries `base_hashes` likewise.
Tensors travel as torch tensors (in-process engines, or VLLM_ALLOW_INSECURE_SERIALIZATION=1), numpy arrays, or
{"dtype", "shape", "data": bytes} blobs that msgpack carries without pickle; over HTTP, as one safetensors file per
stage call (tensors '<entry index>/<field>', the rest as JSON under FILE_METADATA_KEY).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..constants import BLOCK_SIZE
from ..errors import MXFP4Error
from ..tensor import MXFP4Tensor

PROTOCOL = "mxfp4_rl.sync/1"
PACKED_KINDS = ("packed", "delta", "dense")  # the codes + scales of a packed expert weight
KINDS = (*PACKED_KINDS, "bias", "lora", "param")
FULL_KEY = "full"
FILE_METADATA_KEY = "mxfp4_rl.sync"  # safetensors header entry holding the payload without its tensors
DENSE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class SyncError(MXFP4Error):
    """A weight sync was refused; the engine keeps serving the previous version."""


class SyncPayloadError(SyncError):
    """A payload entry is malformed or corrupted (wrong dtype/shape, hash mismatch)."""


class SyncProfileError(SyncError):
    """Learner and engine use different codec profiles."""


class SyncStateError(SyncError):
    """The sync does not apply to what the engine holds (unknown sync id, stale base, concurrent commit)."""


class SyncMismatchError(SyncError, RuntimeError):
    """The engine serves other bytes than the learner holds after a sync."""


def shard_key(descriptor: dict | None) -> str:
    """Stable key of a shard descriptor ("full" when the rank holds the whole tensor); both sides compute it."""
    if descriptor is None:
        return FULL_KEY
    return json.dumps(descriptor, sort_keys=True, separators=(",", ":"))


def shard_of(q: MXFP4Tensor, descriptor: dict | None) -> MXFP4Tensor:
    """The part of a full [E, N, K] packed weight that the engine rank with this descriptor holds."""
    if descriptor is None:
        return q
    experts = torch.tensor(descriptor["experts"], dtype=torch.long, device=q.codes.device)
    rows = torch.cat([torch.arange(a, b) for a, b in descriptor["rows"]]).to(q.codes.device)
    b0, b1 = descriptor["blocks"]

    def pick(t: torch.Tensor, per_block: int) -> torch.Tensor:
        return t.index_select(0, experts).index_select(1, rows)[..., b0 * per_block:b1 * per_block].contiguous()

    return MXFP4Tensor(pick(q.codes, BLOCK_SIZE // 2), pick(q.scales, 1), q.profile)


LORA_SUFFIX = "_lora"  # "<layer>.w13_lora" is the adapter of "<layer>.w13_weight"


def lora_entry_name(weight_name: str) -> str:
    """'<layer>.w13_weight' -> '<layer>.w13_lora'."""
    return weight_name.removesuffix("_weight") + LORA_SUFFIX


def _select(t: torch.Tensor, dim: int, index: list[int] | torch.Tensor) -> torch.Tensor:
    return t.index_select(dim, torch.as_tensor(index, dtype=torch.long).to(t.device))


def _rows(descriptor: dict) -> torch.Tensor:
    return torch.cat([torch.arange(a, b) for a, b in descriptor["rows"]])


def bias_shard(bias: torch.Tensor, descriptor: dict | None, weight: str) -> torch.Tensor:
    """The part of a full expert bias [E, N] that the engine rank whose packed `weight` ('w13_weight' /
    'w2_weight') has this descriptor holds: w13 its rows; w2 all of it on the rank holding K's first block and
    zeros elsewhere (row-parallel partial sums are all-reduced, so only one rank adds the bias)."""
    if descriptor is None:
        return bias
    out = _select(bias, 0, descriptor["experts"])
    if weight.startswith("w13"):
        return _select(out, 1, _rows(descriptor)).contiguous()
    return out.contiguous() if descriptor["blocks"][0] == 0 else torch.zeros_like(out)


def lora_shard(a: torch.Tensor, b: torch.Tensor, descriptor: dict | None,
               weight: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The part of full expert LoRA factors a [E, r, K], b [E, N, r] that the engine rank whose packed `weight` has
    this descriptor holds: w13 (column parallel) its rows of b and all of a; w2 (row parallel) its K columns of a and
    all of b (each rank adds (x_k a_k^T) b^T, a partial sum of x a^T b^T like its packed partial)."""
    if descriptor is None:
        return a, b
    a, b = _select(a, 0, descriptor["experts"]), _select(b, 0, descriptor["experts"])
    if weight.startswith("w13"):
        return a.contiguous(), _select(b, 1, _rows(descriptor)).contiguous()
    b0, b1 = descriptor["blocks"]
    return a[..., b0 * BLOCK_SIZE:b1 * BLOCK_SIZE].contiguous(), b.contiguous()


# ---- tensor encodings ---------------------------------------------------------------------------------------------
def blob(t: torch.Tensor) -> dict:
    """A tensor as {"dtype", "shape", "data": bytes}: msgpack carries it to a multiprocess engine without pickle."""
    t = t.detach().contiguous().cpu()
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "data": t.view(torch.uint8).numpy().tobytes() if t.numel() else b""}


def as_tensor(value, where: str = "sync payload", field: str = "tensor") -> torch.Tensor:
    """A payload field as a torch tensor (no copy when it already is one): tensor, ndarray or blob, checked."""
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
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)
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


def tensor_fields(entry: dict) -> list[str]:
    return [k for k, v in entry.items() if isinstance(v, torch.Tensor)]


def encode(payload: dict, as_blobs: bool) -> dict:
    """The payload ready for collective_rpc: tensors kept (in-process engine) or turned into blobs."""
    if not as_blobs:
        return payload
    entries = [{k: blob(v) if isinstance(v, torch.Tensor) else v for k, v in e.items()} for e in payload["entries"]]
    return {**payload, "entries": entries}


def payload_bytes(entry: dict) -> int:
    return sum(t.numel() * t.element_size() for t in (entry[k] for k in tensor_fields(entry)))


def write_payload_file(payload: dict, path: str | Path) -> Path:
    """One safetensors file per stage call, for engines reached through the HTTP dev endpoint (string args only)."""
    from safetensors.torch import save_file

    tensors, header = {}, {**payload, "entries": []}
    for i, e in enumerate(payload["entries"]):
        header["entries"].append({k: v for k, v in e.items() if not isinstance(v, torch.Tensor)})
        for k in tensor_fields(e):
            tensors[f"{i}/{k}"] = e[k].detach().contiguous().cpu()
    path = Path(path)
    save_file(tensors, str(path), metadata={FILE_METADATA_KEY: json.dumps(header)})
    return path


def read_payload_file(path: str | Path) -> dict:
    """Inverse of write_payload_file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = (f.metadata() or {}).get(FILE_METADATA_KEY)
        if meta is None:
            raise SyncPayloadError(f"'{path}' is not an mxfp4_rl sync payload (no '{FILE_METADATA_KEY}' metadata)")
        payload = json.loads(meta)
        for key in f.keys():
            i, _, name = key.partition("/")
            payload["entries"][int(i)][name] = f.get_tensor(key)
    return payload


# ---- the header ---------------------------------------------------------------------------------------------------
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

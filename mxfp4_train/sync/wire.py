"""The weight-sync wire format as the learner writes it (protocol `mxfp4_rl.sync/1`; the engine side reads it in
mxfp4_serve/sync/wire.py, docs/sync.md describes it; the two packages never import each other).

Entries carry the FULL weight (all engine ranks); every engine rank keeps its own shard, described by the
`descriptor` its `mxfp4_sync_info` reports ({"experts": [global ids], "rows": [[a, b], ...], "blocks": [b0, b1]},
or None for the whole tensor). The learner therefore states the expected audit hash per shard key.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from common.audit import tensor_hash
from common.constants import BLOCK_SIZE
from common.tensor import MXFP4Tensor

PROTOCOL = "mxfp4_rl.sync/1"
FULL_KEY = "full"
FILE_METADATA_KEY = "mxfp4_rl.sync"


def shard_key(descriptor: dict | None) -> str:
    """Same key as the engine computes for the descriptor it reports."""
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


def expected_hashes(q: MXFP4Tensor, descriptors: list[dict | None]) -> dict[str, str]:
    """{shard key: audit hash} of what each engine rank must serve after the sync."""
    out = {}
    for d in descriptors:
        key = shard_key(d)
        if key not in out:
            out[key] = tensor_hash(shard_of(q, d))
    return out


def blob(t: torch.Tensor) -> dict:
    """A tensor as {"dtype", "shape", "data": bytes}: msgpack carries it to a multiprocess engine without pickle."""
    t = t.detach().contiguous().cpu()
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "data": t.view(torch.uint8).numpy().tobytes() if t.numel() else b""}


def tensor_from_blob(b) -> torch.Tensor:
    """Inverse of blob (a tensor passes through unchanged)."""
    if isinstance(b, torch.Tensor):
        return b
    dtype = getattr(torch, b["dtype"])
    if not b["data"]:
        return torch.empty(b["shape"], dtype=dtype)
    return torch.frombuffer(bytearray(b["data"]), dtype=torch.uint8).view(dtype).reshape(b["shape"])


def tensor_fields(entry: dict) -> list[str]:
    return [k for k, v in entry.items() if isinstance(v, torch.Tensor)]


def encode(payload: dict, as_blobs: bool) -> dict:
    """The payload ready for collective_rpc: tensors kept (in-process engine) or turned into blobs."""
    if not as_blobs:
        return payload
    entries = [{k: blob(v) if isinstance(v, torch.Tensor) else v for k, v in e.items()} for e in payload["entries"]]
    return {**payload, "entries": entries}


def write_payload_file(payload: dict, path: str | Path) -> Path:
    """One safetensors file per stage call, for engines reached through the HTTP dev endpoint (string args only):
    tensors as '<entry index>/<field>', everything else as JSON in the header metadata."""
    from safetensors.torch import save_file

    tensors, header = {}, {**payload, "entries": []}
    for i, e in enumerate(payload["entries"]):
        header["entries"].append({k: v for k, v in e.items() if not isinstance(v, torch.Tensor)})
        for k in tensor_fields(e):
            tensors[f"{i}/{k}"] = e[k].detach().contiguous().cpu()
    path = Path(path)
    save_file(tensors, str(path), metadata={FILE_METADATA_KEY: json.dumps(header)})
    return path


def payload_bytes(entry: dict) -> int:
    return sum(t.numel() * t.element_size() for t in (entry[k] for k in tensor_fields(entry)))

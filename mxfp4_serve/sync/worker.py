"""`MXFP4SyncExtension`: the vLLM worker extension that receives weight syncs from a learner.

Start the engine with `vllm.LLM(..., worker_extension_cls="mxfp4_serve.sync.worker.MXFP4SyncExtension")` (or
`vllm serve ... --worker-extension-cls mxfp4_serve.sync.worker.MXFP4SyncExtension`), then call its methods through
`llm.collective_rpc("mxfp4_sync_stage", args=(payload,))`, or through the OpenAI server's dev endpoint
`POST /collective_rpc` (VLLM_SERVER_DEV_MODE=1), which passes only strings: use `mxfp4_sync_stage_file(path)` there.
Every method returns plain dicts/lists/str/bytes, which msgpack carries without pickle.

Protocol (mxfp4_train.sync drives it): info -> stage (one or more calls) -> pause the scheduler -> commit (one RPC,
so it runs between two engine steps) -> resume. See staging.py for the atomicity argument and docs/sync.md.
"""

from __future__ import annotations

import json

import torch

from .staging import EngineSync

FILE_METADATA_KEY = "mxfp4_rl.sync"  # safetensors header entry holding the payload without its tensors


def _blob(t: torch.Tensor) -> dict:
    t = t.detach().contiguous().cpu()
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "data": t.view(torch.uint8).numpy().tobytes() if t.numel() else b""}


def read_payload_file(path: str) -> dict:
    """A payload written by mxfp4_train.sync.wire.write_payload_file: header in the metadata, tensors '<i>/<field>'."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = (f.metadata() or {}).get(FILE_METADATA_KEY)
        if meta is None:
            raise ValueError(f"'{path}' is not an mxfp4_rl sync payload (no '{FILE_METADATA_KEY}' metadata)")
        payload = json.loads(meta)
        for key in f.keys():
            i, _, name = key.partition("/")
            payload["entries"][int(i)][name] = f.get_tensor(key)
    return payload


class MXFP4SyncExtension:
    """Mixed into vLLM's Worker class by `worker_extension_cls`; every name starts with `mxfp4_sync` so that it
    cannot collide with the worker's own attributes (vLLM checks)."""

    def _mxfp4_sync_state(self) -> EngineSync:
        state = getattr(self, "_mxfp4_sync", None)
        if state is None:
            state = EngineSync(self.get_model())
            self._mxfp4_sync = state
        return state

    def mxfp4_sync_info(self) -> dict:
        return self._mxfp4_sync_state().info()

    def mxfp4_sync_hashes(self) -> dict:
        return self._mxfp4_sync_state().hashes()

    def mxfp4_sync_stage(self, payload: dict) -> dict:
        return self._mxfp4_sync_state().stage(payload)

    def mxfp4_sync_stage_file(self, path: str) -> dict:
        return self._mxfp4_sync_state().stage(read_payload_file(path))

    def mxfp4_sync_commit(self, sync_id: str, names: list) -> dict:
        return self._mxfp4_sync_state().commit(sync_id, list(names))

    def mxfp4_sync_abort(self, sync_id: str) -> dict:
        return self._mxfp4_sync_state().abort(sync_id)

    def mxfp4_sync_read(self, name: str) -> dict:
        out = self._mxfp4_sync_state().read(name)
        return {**out, "codes": _blob(out["codes"]), "scales": _blob(out["scales"])}

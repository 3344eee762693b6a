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

from common.moe.wire import blob, read_payload_file

from .staging import EngineSync, engine_sync_of


class MXFP4SyncExtension:
    """Mixed into vLLM's Worker class by `worker_extension_cls`; every name starts with `mxfp4_sync` so that it
    cannot collide with the worker's own attributes (vLLM checks)."""

    def _mxfp4_sync_state(self) -> EngineSync:
        return engine_sync_of(self.get_model())

    def mxfp4_sync_info(self) -> dict:
        return self._mxfp4_sync_state().info()

    def mxfp4_sync_hashes(self) -> dict:
        return self._mxfp4_sync_state().hashes(fresh=True)  # the audit: every weight read again

    def mxfp4_sync_committed(self) -> dict:
        return self._mxfp4_sync_state().committed()

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
        return {**out, "codes": blob(out["codes"]), "scales": blob(out["scales"])}

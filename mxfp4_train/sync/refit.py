"""`connect(engine)`: the learner's sync through vLLM's own RL weight-update protocol (the `mxfp4_rl` transfer engine).

    llm = vllm.LLM(model=ckpt, weight_transfer_config={"backend": "mxfp4_rl"},
                   worker_extension_cls="mxfp4_serve.sync.worker.MXFP4SyncExtension", ...)
    refit = mxfp4_train.sync.connect(llm, transport="gloo")      # "nccl" / "ipc" (colocated) on GPUs
    report = refit.sync(model)                                   # raises unless the engine serves the learner's bytes

What goes where:
- control plane: vLLM's `init_weight_transfer_engine` / `start_weight_update` / `update_weights` /
  `finish_weight_update` (each payload's header rides in update_info), plus the worker extension's read-only
  `mxfp4_sync_info` (profile, shards, hashes, version) through collective_rpc;
- data plane: the payload tensors broadcast as raw bytes from this process (rank 0) to every engine worker over a
  process group of their own (common.moe.transport), never pickled;
- the commit is `finish_weight_update`, one RPC between two engine steps, made while the engine is drained of
  in-flight requests (EngineHandle.paused), so no request mixes versions.
The payload itself (packed, block deltas, dense masters; expected hashes per shard) is the WeightSync's, so the
two paths send the same bytes and check the same hashes.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

from common.moe import transport

from .client import WeightSync
from .engine import EngineHandle

BACKEND = "mxfp4_rl"  # the engine's weight_transfer_config backend (mxfp4_serve.sync.transfer_engine)


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


class _Background:
    """Run one blocking engine call in a thread while this thread does its half of a collective."""

    def __init__(self, fn: Callable[[], object], what: str) -> None:
        self.what, self.error = what, None
        self.thread = threading.Thread(target=self._run, args=(fn,), name=f"mxfp4-rl {what}", daemon=True)
        self.thread.start()

    def _run(self, fn) -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread by join()
            self.error = exc

    def join(self, timeout_s: float) -> None:
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            raise TimeoutError(f"vLLM {self.what} did not return within {timeout_s:.0f} s")
        if self.error is not None:
            raise self.error


class TransferSync(WeightSync):
    """WeightSync whose stage and commit go through vLLM's weight-update protocol and our transfer engine."""

    def __init__(self, engine, *, transport_name: str = "gloo", master_address: str = "127.0.0.1",
                 master_port: int | None = None, timeout_s: float = 300.0) -> None:
        super().__init__(engine)
        self.llm = self.engine.engine
        for method in ("init_weight_transfer_engine", "start_weight_update", "update_weights",
                       "finish_weight_update"):
            if not hasattr(self.llm, method):
                raise TypeError(f"connect: the engine has no {method}(); vLLM >= 0.25 with "
                                f"weight_transfer_config={{'backend': '{BACKEND}'}} is needed")
        self.timeout_s = timeout_s
        try:
            workers = len(self.engine.rpc("mxfp4_sync_info"))
        except Exception as exc:  # noqa: BLE001 - vLLM reports a missing worker method in many shapes
            raise TypeError(f"connect: the engine does not answer mxfp4_sync_info ({exc}); start it with "
                            f"worker_extension_cls='mxfp4_serve.sync.worker.MXFP4SyncExtension' (and, for vllm serve, "
                            f"VLLM_SERVER_DEV_MODE=1)") from exc
        port = master_port or _free_port(master_address)
        init_info = {"master_address": master_address, "master_port": port, "world_size": workers + 1,
                     "rank_offset": 1, "transport": transport_name, "timeout_s": timeout_s}
        joining = _Background(lambda: self.llm.init_weight_transfer_engine({"init_info": init_info}),
                              "init_weight_transfer_engine")
        try:
            self.channel = transport.open_channel(transport_name, master_address, port, 0, workers + 1,
                                                  timeout_s=timeout_s)
        finally:
            joining.join(timeout_s)
        self._started = False

    def _start(self) -> None:
        try:
            self.llm.start_weight_update()
        except Exception as exc:  # vLLM re-raises a worker's RuntimeError as a plain Exception through its core
            if "already active" not in str(exc):
                raise
            # an update a previous learner (or this one, interrupted) never finished: finishing it makes the engine
            # drop it (its header announced weights that never came), then this update starts cleanly
            self.llm.finish_weight_update()
            self.llm.start_weight_update()
        self._started = True

    def _stage(self, sync_id: str, profile: str, entries: list[dict]) -> float:
        self._expect = [e["name"] for e in entries]
        return super()._stage(sync_id, profile, entries)

    def _send(self, payload: dict) -> None:
        if not self._started:
            self._start()
        # every chunk names all weights of the sync: an update that stops early is dropped at finish, never served
        header = {**self.channel.header(payload), "expect": getattr(self, "_expect", None)}
        receiving = _Background(lambda: self.llm.update_weights({"update_info": {"header": header}}),
                                "update_weights")
        try:
            self.channel.send_tensors(payload)
        finally:
            receiving.join(self.timeout_s)

    def _commit(self, sync_id: str, names: list[str], phases) -> list[dict]:
        if not self._started:
            self._start()
        self._started = False
        with self.engine.paused(phases):
            try:  # the sync id becomes the engine's weight version (vLLM 0.32: GET /weight_info)
                self.llm.finish_weight_update(weight_version=sync_id)
            except TypeError:  # vLLM 0.25's LLM.finish_weight_update takes no version
                self.llm.finish_weight_update()
        # the hashes each rank read back when its commit wrote (an update dropped at finish left the previous
        # commit's, which then differ from the learner's): no second read of every weight
        results = self.engine.rpc("mxfp4_sync_committed")
        phases.mark("read committed hashes")
        return results

    def _abort(self, sync_id: str) -> None:
        # the engine drops an unfinished update at the next start_weight_update; nothing of it was served
        self._started = False

    def close(self) -> None:
        """Release the transfer group on both sides (the engine keeps serving)."""
        shutdown = getattr(self.llm, "shutdown_weight_transfer_engine", None)
        if shutdown is not None:
            shutdown()
        self.channel.close()


def connect(engine, *, transport: str = "gloo", master_address: str = "127.0.0.1", master_port: int | None = None,
            timeout_s: float = 300.0) -> TransferSync:
    """Join `engine` (a vllm.LLM started with weight_transfer_config={"backend": "mxfp4_rl"} and the
    MXFP4SyncExtension worker extension) for syncs through vLLM's weight-update protocol. `transport`: "gloo"
    (CPU tensors, any machine), "nccl" (learner and engine workers on GPUs) or "ipc" (learner colocated with the
    engine on one GPU: the payload is shared through a CUDA IPC handle, no copy through a group)."""
    return TransferSync(EngineHandle.of(engine), transport_name=transport, master_address=master_address,
                        master_port=master_port, timeout_s=timeout_s)

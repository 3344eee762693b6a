"""How the learner reaches the engine's sync extension: vLLM's public API only (collective_rpc, sleep/wake_up).

`EngineHandle.of(llm)` wraps a `vllm.LLM` (or anything with `collective_rpc(method, args=...)`). `paused()` makes
the commit request-atomic, not only step-atomic:
- multiprocess engine core: `llm.sleep(level=0, mode="wait")` stops scheduling new requests and returns once the
  in-flight ones finished (on the old weights); requests arriving meanwhile queue and run after `wake_up(["scheduling"])`
  on the new weights. So no request ever mixes versions;
- in-process engine core (VLLM_ENABLE_V1_MULTIPROCESSING=0): vLLM refuses mode "wait" there, and the engine only
  steps inside the caller's own generate(), so a sync in between needs no pause; requests left unfinished (added with
  `llm.enqueue`, not yet run) would straddle the update, so the sync is refused until they are finished or aborted.
Afterwards the prefix cache is reset: its KV blocks were computed by the old weights and would leak them into new
requests sharing a prefix.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator


class Phases:
    """Wall seconds per named phase of one sync, each phase ending at its mark (a report's `phases`)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._t
        self._t = now


class EngineBusyError(RuntimeError):
    """An in-process engine holds unfinished requests; a sync now would let them straddle two versions."""


class EngineHandle:
    def __init__(self, engine) -> None:
        if not hasattr(engine, "collective_rpc"):
            raise TypeError(f"sync: engine must expose collective_rpc (vllm.LLM does), got {type(engine).__name__}")
        self.engine = engine
        core = getattr(getattr(engine, "llm_engine", None), "engine_core", None)
        self.in_process = core is None or type(core).__name__ == "InprocClient"
        # tensors cross a process boundary only through pickle (opt-in) or as bytes blobs
        self.as_blobs = not self.in_process and os.environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION") != "1"

    @classmethod
    def of(cls, engine) -> "EngineHandle":
        """A vllm.LLM, an EngineHandle, or a `vllm serve` base URL (str: reached through mxfp4_train.sync.http)."""
        if isinstance(engine, str):
            from .http import HTTPEngine

            engine = HTTPEngine(engine)
        return engine if isinstance(engine, cls) else cls(engine)

    def rpc(self, method: str, *args) -> list:
        """One result per worker (TP/PP/EP rank)."""
        return list(self.engine.collective_rpc(method, args=args))

    @contextlib.contextmanager
    def paused(self, phases: Phases | None = None) -> Iterator[None]:
        """Drain and hold the engine around the body (see the module doc); `phases` gets "pause", the body's own
        marks, and "resume"."""
        phases = phases or Phases()
        own = getattr(self.engine, "paused", None)
        if own is not None:  # an engine that pauses itself (mxfp4_train.sync.http.HTTPEngine: /pause, /resume)
            with own():
                phases.mark("pause")
                yield
                phases.mark("commit")
            phases.mark("resume")
            return
        llm_engine = getattr(self.engine, "llm_engine", None)
        if llm_engine is None:  # a bare collective_rpc endpoint: the commit RPC alone is step-atomic
            yield
            phases.mark("commit")
            return
        if self.in_process:
            if llm_engine.has_unfinished_requests():
                raise EngineBusyError("sync refused: the in-process vLLM engine has unfinished requests, which would "
                                      "run partly on the old and partly on the new weights; finish or abort them first "
                                      "(or run the engine core in its own process, where the sync drains them)")
            phases.mark("pause")
            yield
            phases.mark("commit")
        else:
            self.engine.sleep(level=0, mode="wait")
            phases.mark("pause")
            try:
                yield
                phases.mark("commit")
            finally:
                self.engine.wake_up(tags=["scheduling"])
        self.engine.reset_prefix_cache()
        phases.mark("resume")

"""The `mxfp4_rl` weight-transfer engine: our sync payload through vLLM's own RL weight-update protocol.

vLLM (0.25 and 0.32) drives a registered weight-transfer engine on every worker: `init_weight_transfer_engine`,
then per update `start_weight_update` / `update_weights` (one call per chunk) / `finish_weight_update`, reachable
as `vllm.LLM` methods and, with VLLM_SERVER_DEV_MODE=1, as the OpenAI server's HTTP endpoints of the same names. The
stock engines load checkpoint-format tensors through the model's loader; ours carries the learner's MXFP4 payload
(common.moe.wire: packed codes + scales, block deltas, or dense masters the engine quantizes), so:
- init: join the learner's transfer group (common.moe.transport; Gloo on CPU, NCCL on GPUs) as rank_offset + this
  worker's rank;
- update_weights(update_info={"header": ...}): receive the tensors the header announces, then validate and stage
  them (mxfp4_serve.sync.staging: dtype, shape, NaN scale, profile, expected audit hash per shard). Nothing served
  changes;
- finish_weight_update: commit everything staged since start, in place, in the backend's layout, re-hashed after
  the write and rolled back on any failure (one RPC, so between two engine steps); an update that lacks some of
  the weights its header announced ("expect": the learner died mid-update) is dropped instead, never served.
Start the engine with `weight_transfer_config={"backend": "mxfp4_rl"}` (`--weight-transfer-config '{"backend":
"mxfp4_rl"}'`); the learner side is mxfp4_train.sync.connect.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from common.moe import transport
from common.moe.wire import SyncStateError

from .staging import engine_sync_of

BACKEND = "mxfp4_rl"
logger = logging.getLogger(__name__)


@dataclasses.dataclass
class MXFP4TransferInitInfo(WeightTransferInitInfo):
    """The learner's transfer group: rendezvous address, size (learner + every engine worker), this engine's first
    rank, the transport (gloo | nccl) and how long to wait for the others."""

    master_address: str
    master_port: int
    world_size: int
    rank_offset: int = 1
    transport: str = "gloo"
    timeout_s: float = 300.0


@dataclasses.dataclass
class MXFP4TransferUpdateInfo(WeightTransferUpdateInfo):
    """One chunk: the sync payload's header (common.moe.transport.header_of); its tensors follow in the group."""

    header: dict


def worker_rank(parallel_config) -> int:
    """This worker's rank among all engine workers (data-parallel replicas included), as vLLM's engines count."""
    dp = int(getattr(parallel_config, "data_parallel_index", getattr(parallel_config, "data_parallel_rank", 0)) or 0)
    return dp * int(parallel_config.world_size) + int(parallel_config.rank)


class MXFP4WeightTransferEngine(WeightTransferEngine[MXFP4TransferInitInfo, MXFP4TransferUpdateInfo]):
    init_info_cls = MXFP4TransferInitInfo
    update_info_cls = MXFP4TransferUpdateInfo
    supports_draft_weight_update = False  # vLLM 0.32: only the served model's experts are ours

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.channel: transport.Channel | None = None
        self._session: dict | None = None
        self.last_commit: dict | None = None

    # ---- lifecycle --------------------------------------------------------------------------------------------
    def init_transfer_engine(self, init_info: MXFP4TransferInitInfo) -> None:
        if self.channel is not None:
            raise SyncStateError("mxfp4_rl weight transfer: this engine is already connected to a learner; a second "
                                 "learner cannot join (shut the first connection down first)")
        rank = init_info.rank_offset + worker_rank(self.parallel_config)
        self.channel = transport.open_channel(init_info.transport, init_info.master_address, init_info.master_port,
                                              rank, init_info.world_size, timeout_s=init_info.timeout_s,
                                              device=self.device)

    def start_weight_update(self) -> None:
        # an update the learner abandoned (killed mid-transfer) is dropped here: nothing of it was ever served
        if self._session is not None and self._session["sync_id"] is not None:
            engine_sync_of(self.model).abort(self._session["sync_id"])
        self._session = {"sync_id": None, "names": [], "expect": []}

    def receive_weights(self, update_info: MXFP4TransferUpdateInfo) -> None:
        if self.channel is None:
            raise SyncStateError("mxfp4_rl weight transfer: update_weights before init_weight_transfer_engine")
        if self._session is None:
            raise SyncStateError("mxfp4_rl weight transfer: update_weights outside start/finish_weight_update")
        header = update_info.header
        payload = self.channel.receive_tensors(header, reuse=True)
        sync_id = str(header.get("sync_id"))
        if self._session["sync_id"] not in (None, sync_id):
            raise SyncStateError(f"mxfp4_rl weight transfer: chunk of sync {sync_id!r} inside the update of sync "
                                 f"{self._session['sync_id']!r}")
        names = [e["name"] for e in payload["entries"]]
        repeated = sorted(set(names) & set(self._session["names"]))
        if repeated:
            raise SyncStateError(f"mxfp4_rl weight transfer: {repeated[:4]} sent twice in one update")
        self._session["sync_id"] = sync_id
        self._session["expect"] = list(header.get("expect") or names)
        engine_sync_of(self.model).stage(payload)
        self._session["names"] += names

    def finish_weight_update(self) -> None:
        session, self._session = self._session, None
        if session is None or session["sync_id"] is None:
            return  # an empty update: nothing staged, nothing to commit
        sync = engine_sync_of(self.model)
        missing = sorted(set(session["expect"]) - set(session["names"]))
        if missing:
            # an update whose learner stopped sending (killed, or a new learner closing it): dropped, never served.
            # Not an error here: vLLM would keep the update open, and the learner's audit after finish sees it.
            sync.abort(session["sync_id"])
            logger.warning("mxfp4_rl weight transfer: update %s finished without %d of its weights (%s...); dropped, "
                           "the engine keeps serving version %d", session["sync_id"], len(missing), missing[0],
                           sync.version)
            self.last_commit = {"sync_id": session["sync_id"], "dropped": missing, "version": sync.version}
            return
        self.last_commit = sync.commit(session["sync_id"], session["names"])

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # the base class synchronizes the accelerator afterwards: receive_tensors already waited for every tensor
        self.receive_weights(self.parse_update_info(update_info))

    def shutdown(self) -> None:
        channel, self.channel = self.channel, None
        if channel is not None:
            channel.close()

    @staticmethod
    def trainer_send_weights(iterator: Iterator[Any], trainer_args: dict[str, Any] | Any) -> None:
        """vLLM 0.25's trainer-side hook: send payloads (dicts with tensors) through trainer_args["channel"] (the
        learner's common.moe.transport.Channel). mxfp4_train.sync.connect does this for you."""
        channel = trainer_args["channel"]
        for payload in iterator:
            channel.send_tensors(payload)


def register() -> None:
    """Add the engine to vLLM's weight-transfer registry (once per process; the plugin's register calls it)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, __name__, "MXFP4WeightTransferEngine")

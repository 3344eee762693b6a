"""Learner side of the learner -> engine weight sync (protocol mxfp4_rl.sync/1): `sync(engine, model)`, block
deltas, and the LoRA merge that decides what a LoRA-mode learner serves. Talks to vLLM through its public API only
(collective_rpc, sleep/wake_up); never imports mxfp4_serve."""

from common.moe.wire import SyncProfileError

from .client import SyncMismatchError, SyncProfileMismatch, SyncReport, WeightSync, sync
from .delta import BlockDelta, block_delta
from .engine import EngineBusyError, EngineHandle
from .lora_merge import MergeReport, merge_lora
from .refit import TransferSync, connect

__all__ = [
    "BlockDelta",
    "EngineBusyError",
    "EngineHandle",
    "MergeReport",
    "SyncMismatchError",
    "SyncProfileError",
    "SyncProfileMismatch",
    "SyncReport",
    "TransferSync",
    "WeightSync",
    "block_delta",
    "connect",
    "merge_lora",
    "sync",
]

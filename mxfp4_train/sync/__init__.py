"""Learner side of the learner -> engine weight sync (protocol mxfp4_rl.sync/1): `connect(engine).sync(model)` and
`sync(engine, model)`, block deltas, the non-expert parameters and adapters of the policy, and the explicit LoRA
merge (opt-in: engines serve expert adapters unmerged, enable_expert_lora). Talks to vLLM through its public API only
(collective_rpc, sleep/wake_up); never imports mxfp4_serve."""

from common.moe.wire import SyncProfileError

from .client import SyncMismatchError, SyncProfileMismatch, SyncReport, WeightSync, sync
from .delta import BlockDelta, block_delta
from .engine import EngineBusyError, EngineHandle
from .lora_merge import MergeReport, merge_lora
from .refit import TransferSync, connect
from .serve_lora import enable_expert_lora

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
    "enable_expert_lora",
    "merge_lora",
    "sync",
]

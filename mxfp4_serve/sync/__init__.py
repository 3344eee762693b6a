"""Engine side of the learner -> engine weight sync (protocol mxfp4_rl.sync/1): the vLLM worker extension and the
in-place, atomic, hash-verified writer behind it. Importing this package does not import vLLM."""

from common.moe.wire import PROTOCOL, SyncError, SyncPayloadError, SyncProfileError, SyncStateError

from .staging import EngineSync
from .worker import MXFP4SyncExtension

__all__ = [
    "PROTOCOL",
    "EngineSync",
    "MXFP4SyncExtension",
    "SyncError",
    "SyncPayloadError",
    "SyncProfileError",
    "SyncStateError",
]

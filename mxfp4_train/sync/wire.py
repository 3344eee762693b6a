"""What the learner adds to the sync wire format (common.moe.wire, protocol `mxfp4_rl.sync/1`): the audit hashes
each engine rank must report for its shard after a sync.

Entries carry the FULL weight (all engine ranks); every engine rank keeps its own shard, described by the
`descriptor` its `mxfp4_sync_info` reports (None for the whole tensor).
"""

from __future__ import annotations

from common.audit import tensor_hash
from common.moe.wire import shard_key, shard_of
from common.tensor import MXFP4Tensor


def expected_hashes(q: MXFP4Tensor, descriptors: list[dict | None],
                    known: dict[str, str] | None = None) -> dict[str, str]:
    """{shard key: audit hash} of what each engine rank must serve after the sync; `known`: hashes already computed
    for these bytes (the export's whole-tensor hash), not computed again."""
    out = {}
    known = known or {}
    for d in descriptors:
        key = shard_key(d)
        if key not in out:
            out[key] = known[key] if key in known else tensor_hash(shard_of(q, d))
    return out

"""Block deltas between the last-synced bytes and the new ones.

The unit is one MXFP4 block: 32 elements = 16 code bytes + 1 scale byte. A block whose codes or scale changed is
sent whole as (expert, row, block) + 16 code bytes + 1 scale byte (12 + 17 = 29 bytes with int32 indices), so a
delta beats a full send (17 bytes per block) while fewer than 17/29 = 59% of the blocks changed; `choose_kind`
picks the smaller. Code-flip statistics come from common.audit.diff (the same numbers the audit reports).
"""

from __future__ import annotations

import dataclasses

import torch

from common.audit import diff
from common.constants import BLOCK_SIZE
from common.tensor import MXFP4Tensor

INDEX_BYTES = 3 * 4  # int32 (expert, row, block)
BLOCK_BYTES = BLOCK_SIZE // 2 + 1  # 16 code bytes + 1 scale byte


@dataclasses.dataclass(frozen=True)
class BlockDelta:
    index: torch.Tensor  # int32 [M, 3] (expert, row, block)
    codes: torch.Tensor  # uint8 [M, 16]
    scales: torch.Tensor  # uint8 [M]
    blocks_total: int
    codes_flipped: int
    codes_total: int
    scales_changed: int

    @property
    def blocks_changed(self) -> int:
        return int(self.index.shape[0])

    @property
    def nbytes(self) -> int:
        return self.blocks_changed * (INDEX_BYTES + BLOCK_BYTES)

    @property
    def code_flip_rate(self) -> float:
        return self.codes_flipped / self.codes_total if self.codes_total else 0.0


def block_delta(old: MXFP4Tensor, new: MXFP4Tensor) -> BlockDelta:
    """The blocks of `new` [E, N, K] that differ from `old` (same shape and profile)."""
    if old.profile != new.profile:
        raise ValueError(f"block delta between profiles {old.profile!r} and {new.profile!r}: a profile change needs "
                         f"a full sync")
    d = diff(old, new)  # raises ShapeError naming both shapes when they differ
    oc = old.codes.to(new.codes.device)
    nb = new.codes.reshape(*new.codes.shape[:-1], -1, BLOCK_SIZE // 2)
    ob = oc.reshape(nb.shape)
    changed = (nb != ob).any(-1) | (new.scales != old.scales.to(new.scales.device))
    index = changed.nonzero().to(torch.int32)
    return BlockDelta(index=index, codes=nb[changed].contiguous(), scales=new.scales[changed].contiguous(),
                      blocks_total=changed.numel(), codes_flipped=d.codes_flipped, codes_total=d.codes_total,
                      scales_changed=d.scales_changed)


def choose_kind(delta: BlockDelta, full_bytes: int) -> str:
    """'delta' when it is smaller on the wire than the full packed weight, else 'packed'."""
    return "delta" if delta.nbytes < full_bytes else "packed"

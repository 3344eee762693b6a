"""Block deltas between the last-synced bytes and the new ones.

The unit is one MXFP4 block: 32 elements = 16 code bytes + 1 scale byte. A block whose codes or scale changed is
sent whole as (expert, row, block) + 16 code bytes + 1 scale byte (12 + 17 = 29 bytes with int32 indices), so a
delta beats a full send (17 bytes per block) while fewer than 17/29 = 59% of the blocks changed; `choose_kind`
picks the smaller. Code-flip statistics count the same nibbles common.audit.diff does, over the changed blocks only
(an unchanged block flips none), so a small delta costs one compare pass over the weight, not a full diff.
"""

from __future__ import annotations

import dataclasses

import torch

from common.audit import mxfp4_lanes_after, nibble_flips
from common.constants import BLOCK_SIZE
from common.errors import ShapeError
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
    _checked(old, new)
    nb = new.codes.reshape(*new.codes.shape[:-1], -1, BLOCK_SIZE // 2)
    ob = old.codes.to(new.codes.device).reshape(nb.shape)
    # a block's 16 code bytes compared as two 64-bit words: one pass, 8x fewer elements than bytes; the block is
    # the same where both words are, i.e. where its two bools read as one int16 are 0x0101 (an elementwise compare:
    # 3.4 ms for 32 MB of codes on 2 CPU cores, against 6.0 for all(-1) and 24 for a sum of the bools)
    same_codes = (nb.contiguous().view(torch.int64) == ob.contiguous().view(torch.int64)).view(torch.int16) == 0x0101
    same_codes = same_codes.squeeze(-1)
    old_scales = old.scales.to(new.scales.device)
    scale_changed = new.scales != old_scales
    changed = ~same_codes | scale_changed
    # one host read for the index (its length), one for the statistics: a GPU learner's delta of a 43-layer shard
    # would otherwise stall on a sync per boolean mask and per count (four per weight)
    flat = changed.reshape(-1).nonzero().squeeze(1)
    blocks = nb.reshape(-1, BLOCK_SIZE // 2)
    codes = blocks.index_select(0, flat)
    index = torch.stack(torch.unravel_index(flat, changed.shape), 1)
    flipped = nibble_flips(codes ^ ob.reshape(-1, BLOCK_SIZE // 2).index_select(0, flat)).sum()
    flipped, scales_changed = torch.stack((flipped, scale_changed.sum())).tolist()
    return BlockDelta(index=index.to(torch.int32), codes=codes,
                      scales=new.scales.reshape(-1).index_select(0, flat), blocks_total=changed.numel(),
                      codes_flipped=int(flipped), codes_total=new.shape.numel(), scales_changed=int(scales_changed))


def _checked(old: MXFP4Tensor, new: MXFP4Tensor) -> None:
    if old.profile != new.profile:
        raise ValueError(f"block delta between profiles {old.profile!r} and {new.profile!r}: a profile change needs "
                         f"a full sync")
    if old.shape != new.shape:
        raise ShapeError(f"block delta: shapes differ, {list(old.shape)} vs {list(new.shape)}")


def block_delta_and_lanes(old: MXFP4Tensor, new: MXFP4Tensor, old_lanes: tuple[list[int], list[int]]
                          ) -> tuple[BlockDelta, tuple[list[int], list[int]]]:
    """(block_delta(old, new), the fingerprint lanes of new) given old's lanes (common.audit.mxfp4_lanes): what a
    learner's delta sync computes per weight. On a GPU (both weights on it, contiguous) in two launches and one host
    read (common.kernels.block_diff); elsewhere block_delta and common.audit.mxfp4_lanes_after. The same results."""
    from common.kernels import block_diff as K

    _checked(old, new)
    old_codes, old_scales = old.codes.to(new.codes.device), old.scales.to(new.scales.device)
    if not (new.codes.is_cuda and K.usable(new.codes, old_codes) and old_scales.is_contiguous()
            and new.scales.is_contiguous()):
        d = block_delta(old, new)
        return d, mxfp4_lanes_after(old_lanes, old, new, d.index)
    return _kernel_delta(old_codes, old_scales, new, old_lanes)


def _kernel_delta(old_codes: torch.Tensor, old_scales: torch.Tensor, new: MXFP4Tensor,
                  old_lanes: tuple[list[int], list[int]], blocks_per_program: int | None = None
                  ) -> tuple[BlockDelta, tuple[list[int], list[int]]]:
    from common.fingerprint import moved_lanes
    from common.kernels.block_diff import block_diff

    index, codes, scales, (count, flipped, scales_changed, c0, c1, s0, s1) = block_diff(
        new.codes, new.scales, old_codes, old_scales, blocks_per_program=blocks_per_program)
    d = BlockDelta(index=index, codes=codes, scales=scales, blocks_total=new.scales.numel(), codes_flipped=flipped,
                   codes_total=new.shape.numel(), scales_changed=scales_changed)
    return d, (moved_lanes(old_lanes[0], [c0, c1]), moved_lanes(old_lanes[1], [s0, s1]))


def choose_kind(delta: BlockDelta, full_bytes: int) -> str:
    """'delta' when it is smaller on the wire than the full packed weight, else 'packed'."""
    return "delta" if delta.nbytes < full_bytes else "packed"

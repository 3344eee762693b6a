"""A block delta between two canonical MXFP4 weights in two launches (CUDA, or CPU under TRITON_INTERPRET=1): which
32-blocks changed, their code-nibble flips and scale changes, how far the new bytes move each audit lane
(common.fingerprint), and the changed blocks gathered in ascending order.

The torch composition (mxfp4_train.sync.delta.block_delta, then common.audit.mxfp4_lanes_after) takes about twenty
small launches and two host reads per weight, and a GPU delta sync is bound by its launch count, not its bytes
(bench/RESULTS.md, seventh round). Here:
1. `_diff_kernel`, one pass over both weights: per block a changed flag; per program the count of changed blocks,
   the nibble flips, the changed scale bytes and the lane moves of its code words and scale words. A word's lane
   terms are computed whether it changed or not: an unchanged word moves a lane by exactly 0 (mod 2^64);
2. one host read of the summed statistics (the delta's size is needed to allocate it);
3. `_gather_kernel`: each program ranks its changed blocks (a prefix sum of its flags after the programs before it)
   and writes their (expert, row, block) index, 16 code bytes and scale byte.
The results equal the torch composition's bit for bit (tests/train/test_block_diff_kernel.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..constants import BLOCK_SIZE
from ..fingerprint import LANES, words_of
from .fingerprint import _mix
from .launch import interpreting

BLOCKS = 1024  # 32-blocks per program on a GPU: 16 KB of each weight's codes
STATS = 7  # per program: changed blocks, nibble flips, changed scales, code lanes 0 / 1, scale lanes 0 / 1


@triton.jit
def _nibbles_differing(x):
    """How many of the 16 nibbles of the int64 x are nonzero (x = new ^ old: code flips of 16 elements)."""
    u = x.to(tl.uint64, bitcast=True)
    y = (u | (u >> 1) | (u >> 2) | (u >> 3)) & 0x1111111111111111
    # one bit per nibble; each 32-bit half holds at most 8, which the multiply gathers into its top nibble
    lo = y & 0x11111111
    hi = y >> 32
    return (((lo * 0x11111111) >> 28) & 0xF) + (((hi * 0x11111111) >> 28) & 0xF)


@triton.jit
def _word_moves(new, old, idx, A: tl.constexpr, B: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr):
    return _mix(new, idx, A, B, M1, M2) - _mix(old, idx, A, B, M1, M2)


@triton.jit
def _diff_kernel(new_ptr, old_ptr, new_s_ptr, old_s_ptr, new_sw_ptr, old_sw_ptr, flag_ptr, stat_ptr, n_blocks,
                 n_scale_words, A0: tl.constexpr, B0: tl.constexpr, M10: tl.constexpr, M20: tl.constexpr,
                 A1: tl.constexpr, B1: tl.constexpr, M11: tl.constexpr, M21: tl.constexpr, BLOCKS: tl.constexpr):
    """new/old: the codes as int64 words (two per block); *_s: the scale bytes; *_sw: the scale bytes as int64
    words (zero padded, common.fingerprint.words_of); flag [n_blocks] int8; stat [programs, 7] int64."""
    pid = tl.program_id(0)
    b = pid.to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS).to(tl.int64)
    ok = b < n_blocks
    w0 = tl.load(new_ptr + 2 * b, mask=ok, other=0)
    w1 = tl.load(new_ptr + 2 * b + 1, mask=ok, other=0)
    o0 = tl.load(old_ptr + 2 * b, mask=ok, other=0)
    o1 = tl.load(old_ptr + 2 * b + 1, mask=ok, other=0)
    sn = tl.load(new_s_ptr + b, mask=ok, other=0)
    so = tl.load(old_s_ptr + b, mask=ok, other=0)
    scale_changed = sn != so
    changed = (w0 != o0) | (w1 != o1) | scale_changed
    tl.store(flag_ptr + b, changed.to(tl.int8), mask=ok)
    flips = _nibbles_differing(w0 ^ o0) + _nibbles_differing(w1 ^ o1)
    code0 = _word_moves(w0, o0, 2 * b, A0, B0, M10, M20) + _word_moves(w1, o1, 2 * b + 1, A0, B0, M10, M20)
    code1 = _word_moves(w0, o0, 2 * b, A1, B1, M11, M21) + _word_moves(w1, o1, 2 * b + 1, A1, B1, M11, M21)
    # this program's scale bytes are scale words pid * BLOCKS / 8 ...: BLOCKS is a multiple of 8
    sw = pid.to(tl.int64) * (BLOCKS // 8) + tl.arange(0, BLOCKS // 8).to(tl.int64)
    sw_ok = sw < n_scale_words
    wn = tl.load(new_sw_ptr + sw, mask=sw_ok, other=0)
    wo = tl.load(old_sw_ptr + sw, mask=sw_ok, other=0)
    stats = stat_ptr + pid.to(tl.int64) * 7
    tl.store(stats, tl.sum(changed.to(tl.int64), axis=0))
    tl.store(stats + 1, tl.sum(tl.where(ok, flips.to(tl.int64, bitcast=True), 0), axis=0))
    tl.store(stats + 2, tl.sum(scale_changed.to(tl.int64), axis=0))
    tl.store(stats + 3, tl.sum(tl.where(ok, code0, 0), axis=0))
    tl.store(stats + 4, tl.sum(tl.where(ok, code1, 0), axis=0))
    tl.store(stats + 5, tl.sum(tl.where(sw_ok, _word_moves(wn, wo, sw, A0, B0, M10, M20), 0), axis=0))
    tl.store(stats + 6, tl.sum(tl.where(sw_ok, _word_moves(wn, wo, sw, A1, B1, M11, M21), 0), axis=0))


@triton.jit
def _gather_kernel(flag_ptr, first_ptr, new_ptr, new_s_ptr, index_ptr, codes_ptr, scales_ptr, n_blocks, rows,
                   kblocks, BLOCKS: tl.constexpr):
    """The changed blocks of program pid's range at rows first[pid] + (their rank among its changed blocks):
    index [M, 3] int32 (expert, row, block), codes [M, 2] int64 words, scales [M] uint8."""
    pid = tl.program_id(0)
    b = pid.to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS).to(tl.int64)
    ok = b < n_blocks
    changed = tl.load(flag_ptr + b, mask=ok, other=0).to(tl.int32)
    at = tl.load(first_ptr + pid) + tl.cumsum(changed, axis=0) - changed
    keep = ok & (changed != 0)
    at = at.to(tl.int64)
    tl.store(codes_ptr + 2 * at, tl.load(new_ptr + 2 * b, mask=keep, other=0), mask=keep)
    tl.store(codes_ptr + 2 * at + 1, tl.load(new_ptr + 2 * b + 1, mask=keep, other=0), mask=keep)
    tl.store(scales_ptr + at, tl.load(new_s_ptr + b, mask=keep, other=0), mask=keep)
    per_expert = rows * kblocks
    tl.store(index_ptr + 3 * at, (b // per_expert).to(tl.int32), mask=keep)
    tl.store(index_ptr + 3 * at + 1, ((b // kblocks) % rows).to(tl.int32), mask=keep)
    tl.store(index_ptr + 3 * at + 2, (b % kblocks).to(tl.int32), mask=keep)


def usable(new_codes: torch.Tensor, old_codes: torch.Tensor) -> bool:
    """Whether the kernels can read these codes in place: on one CUDA device (or the interpreter), contiguous,
    8-byte aligned (their 16-byte blocks read as two int64 words)."""
    same = new_codes.device == old_codes.device and (new_codes.is_cuda or interpreting())
    return bool(same and new_codes.is_contiguous() and old_codes.is_contiguous()
                and new_codes.data_ptr() % 8 == 0 and old_codes.data_ptr() % 8 == 0)


def block_diff(new_codes: torch.Tensor, new_scales: torch.Tensor, old_codes: torch.Tensor, old_scales: torch.Tensor,
               *, blocks_per_program: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """(index int32 [M, 3], codes uint8 [M, 16], scales uint8 [M], stats) of the blocks of the canonical weight
    (new_codes [E, N, K/2], new_scales [E, N, K/32]) whose codes or scale differ from old's, in ascending block order;
    stats = [changed blocks, code nibbles flipped, scale bytes changed, code lane moves 0, 1, scale lane moves 0, 1]
    (the moves as signed int64 values, mod 2^64). One host read. Callers check usable() first."""
    e, n, kb = new_scales.shape
    n_blocks = e * n * kb
    device = new_codes.device
    per = blocks_per_program or (64 if interpreting() else BLOCKS)
    if per % 8 or per & (per - 1):
        raise ValueError(f"block_diff: blocks_per_program must be a power of two >= 8, got {per}")
    programs = triton.cdiv(max(n_blocks, 1), per)
    flags = torch.empty(n_blocks, dtype=torch.int8, device=device)
    stats = torch.empty(programs, STATS, dtype=torch.int64, device=device)
    new_w, old_w = new_codes.view(torch.int64), old_codes.view(torch.int64)
    new_sw, old_sw = words_of(new_scales), words_of(old_scales)
    (a0, b0, m10, m20), (a1, b1, m11, m21) = LANES
    _diff_kernel[(programs,)](new_w, old_w, new_scales, old_scales, new_sw, old_sw, flags, stats, n_blocks,
                              new_sw.numel(), a0, b0, m10, m20, a1, b1, m11, m21, BLOCKS=per)
    counts = stats[:, 0]
    first = (torch.cumsum(counts, 0) - counts).to(torch.int32)
    totals = stats.sum(0).tolist()  # the one host read
    m = int(totals[0])
    index = torch.empty(m, 3, dtype=torch.int32, device=device)
    codes = torch.empty(m, BLOCK_SIZE // 2, dtype=torch.uint8, device=device)
    scales = torch.empty(m, dtype=torch.uint8, device=device)
    if m:
        _gather_kernel[(programs,)](flags, first, new_w, new_scales, index, codes.view(torch.int64), scales,
                                    n_blocks, n, kb, BLOCKS=per)
    return index, codes, scales, [int(v) for v in totals]

"""An engine's stage of a block delta in one pass over the delta (CUDA, or CPU under TRITON_INTERPRET=1): the checks
that refuse it, the old bytes of its blocks read from the layout the layer serves, and how far the new bytes move
the weight's audit lanes (common.fingerprint), with one host read for all of it.

The torch composition (mxfp4_serve.sync.staging, CPU engines) takes some forty small launches and four host reads
per weight, and a GPU delta sync is bound by its launch count, not its bytes (bench/RESULTS.md, sixth and seventh
rounds). Here, per weight:
1. `_stage_kernel`, one pass over the delta's M blocks: per block its index checked against the weight's blocks,
   marked in a bitmap of the weight's blocks (an atomic OR: the block named twice finds its bit set), its scale byte
   checked (E8M0 NaN, a byte the profile reserves), its old 16 code bytes read where the layout keeps them and turned
   back into canonical bytes in registers (kb-major: block_write's, i.e. _layout_kernel's, two permutations), the
   lane moves of its two code words summed per program, its new scale byte written into a copy of the scales and its
   expert marked touched;
2. the scales' lanes from that copy in one dense pass (a scale word holds 8 blocks' bytes, several of which a delta
   may change: hashing the copy's 1/16 of the weight's bytes is cheaper on a GPU than finding each word's changes);
3. one host read of the flags, the lane moves, the scale lanes and the count of touched experts.
The results equal the torch composition's (tests/serve/test_delta_stage_kernel.py).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ..constants import E8M0_NAN
from ..fingerprint import LANES
from ..grouped_gemm._layout_kernel import _groups_table
from ..grouped_gemm.layout import SLOT_BITS
from .block_diff import _word_moves
from .block_write import _block_at, _load4, _load_index, _through_layout
from .fingerprint import _BLOCK as _LANE_BLOCK
from .fingerprint import _lanes_kernel
from .launch import interpreting

BLOCKS = 512  # delta blocks per program on a GPU
STATS = 6  # per program: outside, twice, NaN scale, reserved scale, code lane moves 0 / 1


@dataclasses.dataclass
class StageChecks:
    """What one host read of the stage gives: refusal counts, the new lanes' parts and the touched experts."""

    outside: int  # blocks whose index lies outside the weight's blocks
    twice: int  # blocks named again after their first mention
    nan: int  # E8M0 NaN scale bytes
    reserved: int  # scale bytes the profile reserves (NaN included)
    code_moves: list[int]  # how far the delta moves each code lane (signed int64, mod 2^64)
    scale_lanes: list[int]  # the lanes of the scales with the delta's bytes put in
    experts: int  # local experts the delta touches


@triton.jit
def _canonical_words(live_ptr, at, ok, groups_ptr, KB_MAJOR: tl.constexpr, NG: tl.constexpr):
    """The block's two canonical int64 code words from its four stored int32 words at `at`."""
    w0, w1, w2, w3 = _load4(live_ptr, at, ok)
    c0, c1, c2, c3 = _through_layout(w0, w1, w2, w3, groups_ptr, KB_MAJOR, False, NG)
    lo = c0.to(tl.uint64) | (c1.to(tl.uint64) << 32)
    hi = c2.to(tl.uint64) | (c3.to(tl.uint64) << 32)
    return lo.to(tl.int64, bitcast=True), hi.to(tl.int64, bitcast=True)


@triton.jit
def _stage_kernel(index_ptr, codes_ptr, scales_ptr, live_ptr, seen_ptr, copy_ptr, touched_ptr, stat_ptr, groups_ptr,
                  M, E, N, KB, LOW, A0: tl.constexpr, B0: tl.constexpr, M10: tl.constexpr, M20: tl.constexpr,
                  A1: tl.constexpr, B1: tl.constexpr, M11: tl.constexpr, M21: tl.constexpr, NAN: tl.constexpr,
                  KB_MAJOR: tl.constexpr, NG: tl.constexpr, BLOCKS: tl.constexpr):
    """index [M, 3] (expert, row, block); codes [M, 2] int64 words; scales [M] uint8; live: the layer's codes as
    int32 words; seen: a zeroed int32 bitmap of the E * N * KB blocks; copy: the live scales (uint8, written at
    each delta block); touched [E] int32 zeroed; stat [programs, 6] int64."""
    pid = tl.program_id(0)
    i = pid.to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS).to(tl.int64)
    ok = i < M
    e, r, b = _load_index(index_ptr, i, ok)
    inside = (e >= 0) & (e < E) & (r >= 0) & (r < N) & (b >= 0) & (b < KB)
    v = ok & inside
    # a block outside the weight addresses block 0 (every access below is masked by v besides)
    at, lin = _block_at(tl.where(v, e, 0), tl.where(v, r, 0), tl.where(v, b, 0), N, KB, KB_MAJOR)
    bit = tl.full([BLOCKS], 1, tl.int32) << (lin % 32).to(tl.int32)
    before = tl.atomic_or(seen_ptr + lin // 32, bit, mask=v)
    twice = v & ((before & bit) != 0)
    sb = tl.load(scales_ptr + i, mask=ok, other=0).to(tl.int32)
    o0, o1 = _canonical_words(live_ptr, at, v, groups_ptr, KB_MAJOR, NG)
    n0 = tl.load(codes_ptr + 2 * i, mask=v, other=0)
    n1 = tl.load(codes_ptr + 2 * i + 1, mask=v, other=0)
    code0 = _word_moves(n0, o0, 2 * lin, A0, B0, M10, M20) + _word_moves(n1, o1, 2 * lin + 1, A0, B0, M10, M20)
    code1 = _word_moves(n0, o0, 2 * lin, A1, B1, M11, M21) + _word_moves(n1, o1, 2 * lin + 1, A1, B1, M11, M21)
    tl.store(copy_ptr + lin, sb.to(tl.uint8), mask=v)
    tl.store(touched_ptr + e, tl.full([BLOCKS], 1, tl.int32), mask=v)
    stats = stat_ptr + pid.to(tl.int64) * 6
    tl.store(stats, tl.sum((ok & ~inside).to(tl.int64), axis=0))
    tl.store(stats + 1, tl.sum(twice.to(tl.int64), axis=0))
    tl.store(stats + 2, tl.sum((ok & (sb == NAN)).to(tl.int64), axis=0))
    tl.store(stats + 3, tl.sum((ok & (sb >= LOW)).to(tl.int64), axis=0))
    tl.store(stats + 4, tl.sum(tl.where(v, code0, 0), axis=0))
    tl.store(stats + 5, tl.sum(tl.where(v, code1, 0), axis=0))


def stage_blocks(index: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, live_codes: torch.Tensor,
                 live_scales: torch.Tensor, *, kb_major: bool, reserved_low: int,
                 blocks_per_program: int | None = None) -> StageChecks:
    """The checks and lane parts of staging the delta blocks `index` [M, 3] (int32 or int64: local expert, row,
    block), new canonical `codes` [M, 16] and `scales` [M] (uint8) against the layer's live parameters (codes
    [E, N, K/2] holding canonical or kb-major bytes, scales [E, N, K/32] uint8), all on one device. Nothing live is
    written. One host read. Callers check common.kernels.block_write.usable() first."""
    e, n, kb = live_scales.shape
    device = live_codes.device
    m = index.shape[0]
    per = blocks_per_program or (64 if interpreting() else BLOCKS)
    n_blocks = e * n * kb
    seen = torch.zeros(triton.cdiv(max(n_blocks, 1), 32), dtype=torch.int32, device=device)
    touched = torch.zeros(max(e, 1), dtype=torch.int32, device=device)
    # the scales with the delta's bytes put in, zero padded to whole words (as common.fingerprint.words_of pads)
    copy = torch.zeros(triton.cdiv(n_blocks, 8) * 8, dtype=torch.uint8, device=device)
    copy[:n_blocks].copy_(live_scales.reshape(-1))
    programs = triton.cdiv(max(m, 1), per)
    stats = torch.zeros(programs, STATS, dtype=torch.int64, device=device)
    (a0, b0, m10, m20), (a1, b1, m11, m21) = LANES
    groups = _groups_table(SLOT_BITS, False, str(device))
    if m:
        _stage_kernel[(programs,)](index.contiguous(), codes.contiguous().view(torch.int64), scales.contiguous(),
                                   live_codes.view(torch.int32), seen, copy, touched, stats, groups, m, e, n, kb,
                                   reserved_low, a0, b0, m10, m20, a1, b1, m11, m21, NAN=E8M0_NAN, KB_MAJOR=kb_major,
                                   NG=groups.numel() // 3, BLOCKS=per)
    words = copy.view(torch.int64)
    lane_programs = triton.cdiv(max(words.numel(), 1), _LANE_BLOCK)
    partial = torch.zeros(lane_programs, 2, dtype=torch.int64, device=device)
    if words.numel():
        _lanes_kernel[(lane_programs,)](words, partial, words.numel(), a0, b0, m10, m20, a1, b1, m11, m21,
                                        BLOCK=_LANE_BLOCK)
    got = torch.cat((stats.sum(0), partial.sum(0), touched.sum().reshape(1).to(torch.int64))).tolist()  # the read
    outside, twice, nan, reserved, c0, c1, s0, s1, experts = (int(v) for v in got)
    return StageChecks(outside, twice, nan, reserved, [c0, c1], [s0, s1], experts)

"""Single 32-blocks written into, and checked in, the layout an engine layer serves (CUDA, or CPU under
TRITON_INTERPRET=1): a block delta's commit in two launches per weight instead of some twenty-five small torch
operations and four host reads (bench/RESULTS.md, ninth round: 1.3 ms per weight on an H100, inside the engine's
pause).

- `swap_blocks`: per block, its old 16 code bytes read where the layout keeps them and turned into canonical bytes
  (kept for the undo), its new canonical bytes turned into the layout's and stored, its scale byte swapped likewise
  (scales are stored canonical). kb-major is common.grouped_gemm._layout_kernel's two permutations, either way.
- `blocks_equal`: the blocks read back through the layout (the other direction of the conversion) and compared
  with the canonical bytes they should hold; one host read of the mismatch count.
Each block at most once per call (the stage refuses a delta naming one twice), so no two programs write one place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..grouped_gemm._layout_kernel import _groups_table, block_from_kb_major, block_to_kb_major
from ..grouped_gemm.layout import SLOT_BITS
from .launch import interpreting

BLOCKS = 256  # blocks per program on a GPU


# The helpers below assign in both branches of their constexpr `if` and return once: the shape the layout kernel
# (and the delta-stage kernel, natively compiled on an H100) uses, rather than an early return in a static branch.
@triton.jit
def _load_index(index_ptr, i, ok):
    """(expert, row, block) of delta rows i of an index [M, 3], as int64."""
    return (tl.load(index_ptr + 3 * i, mask=ok, other=0).to(tl.int64),
            tl.load(index_ptr + 3 * i + 1, mask=ok, other=0).to(tl.int64),
            tl.load(index_ptr + 3 * i + 2, mask=ok, other=0).to(tl.int64))


@triton.jit
def _block_at(e, r, b, N, KB, KB_MAJOR: tl.constexpr):
    """(first int32 word of block (e, r, b)'s 16 code bytes in the live codes, its flat index: its scale byte's)."""
    lin = (e * N + r) * KB + b
    if KB_MAJOR:  # block (e, r, b) sits at (e, b, r) of [E, KB, N]
        at = ((e * KB + b) * N + r) * 4
    else:
        at = lin * 4
    return at, lin


@triton.jit
def _through_layout(w0, w1, w2, w3, groups_ptr, KB_MAJOR: tl.constexpr, TO_STORED: tl.constexpr, NG: tl.constexpr):
    """A block's four int32 words (as uint32) from canonical to stored (TO_STORED) or back; canonical codes are
    stored as they are. groups_ptr: the bit table of that direction (_layout_kernel._groups_table)."""
    if KB_MAJOR:
        if TO_STORED:
            o0, o1, o2, o3 = block_to_kb_major(w0, w1, w2, w3, groups_ptr, NG)
        else:
            o0, o1, o2, o3 = block_from_kb_major(w0, w1, w2, w3, groups_ptr, NG)
    else:
        o0, o1, o2, o3 = w0, w1, w2, w3
    return o0, o1, o2, o3


@triton.jit
def _load4(ptr, at, ok):
    return (tl.load(ptr + at, mask=ok, other=0).to(tl.uint32, bitcast=True),
            tl.load(ptr + at + 1, mask=ok, other=0).to(tl.uint32, bitcast=True),
            tl.load(ptr + at + 2, mask=ok, other=0).to(tl.uint32, bitcast=True),
            tl.load(ptr + at + 3, mask=ok, other=0).to(tl.uint32, bitcast=True))


@triton.jit
def _store4(ptr, at, w0, w1, w2, w3, ok):
    tl.store(ptr + at, w0.to(tl.int32, bitcast=True), mask=ok)
    tl.store(ptr + at + 1, w1.to(tl.int32, bitcast=True), mask=ok)
    tl.store(ptr + at + 2, w2.to(tl.int32, bitcast=True), mask=ok)
    tl.store(ptr + at + 3, w3.to(tl.int32, bitcast=True), mask=ok)


@triton.jit
def _swap_kernel(index_ptr, codes_ptr, scales_ptr, live_ptr, live_s_ptr, old_ptr, old_s_ptr, from_ptr, to_ptr, M, N,
                 KB, KB_MAJOR: tl.constexpr, NG_FROM: tl.constexpr, NG_TO: tl.constexpr, BLOCKS: tl.constexpr):
    """codes / old: [M, 4] int32 words of canonical bytes; live: the layer's codes as int32 words."""
    i = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS).to(tl.int64)
    ok = i < M
    e, r, b = _load_index(index_ptr, i, ok)
    at, lin = _block_at(e, r, b, N, KB, KB_MAJOR)
    s0, s1, s2, s3 = _load4(live_ptr, at, ok)
    o0, o1, o2, o3 = _through_layout(s0, s1, s2, s3, from_ptr, KB_MAJOR, False, NG_FROM)
    _store4(old_ptr, 4 * i, o0, o1, o2, o3, ok)
    tl.store(old_s_ptr + i, tl.load(live_s_ptr + lin, mask=ok, other=0), mask=ok)
    c0, c1, c2, c3 = _load4(codes_ptr, 4 * i, ok)
    n0, n1, n2, n3 = _through_layout(c0, c1, c2, c3, to_ptr, KB_MAJOR, True, NG_TO)
    _store4(live_ptr, at, n0, n1, n2, n3, ok)
    tl.store(live_s_ptr + lin, tl.load(scales_ptr + i, mask=ok, other=0), mask=ok)


@triton.jit
def _check_kernel(index_ptr, codes_ptr, scales_ptr, live_ptr, live_s_ptr, from_ptr, out_ptr, M, N, KB,
                  KB_MAJOR: tl.constexpr, NG_FROM: tl.constexpr, BLOCKS: tl.constexpr):
    pid = tl.program_id(0)
    i = pid.to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS).to(tl.int64)
    ok = i < M
    e, r, b = _load_index(index_ptr, i, ok)
    at, lin = _block_at(e, r, b, N, KB, KB_MAJOR)
    s0, s1, s2, s3 = _load4(live_ptr, at, ok)
    o0, o1, o2, o3 = _through_layout(s0, s1, s2, s3, from_ptr, KB_MAJOR, False, NG_FROM)
    c0, c1, c2, c3 = _load4(codes_ptr, 4 * i, ok)
    differ = (o0 != c0) | (o1 != c1) | (o2 != c2) | (o3 != c3)
    differ = differ | (tl.load(live_s_ptr + lin, mask=ok, other=0) != tl.load(scales_ptr + i, mask=ok, other=0))
    tl.store(out_ptr + pid, tl.sum((ok & differ).to(tl.int64), axis=0))


def usable(live_codes: torch.Tensor, live_scales: torch.Tensor) -> bool:
    """Whether the kernels can address the layer's parameters in place: CUDA (or the interpreter), contiguous, the
    codes 4-byte aligned."""
    on = live_codes.is_cuda or interpreting()
    return bool(on and live_codes.is_contiguous() and live_scales.is_contiguous() and live_codes.data_ptr() % 4 == 0)


def _words(codes: torch.Tensor) -> torch.Tensor:
    return codes.contiguous().view(torch.int32)


def _launch(m: int, blocks_per_program: int | None) -> tuple[int, int]:
    per = blocks_per_program or (64 if interpreting() else BLOCKS)
    return triton.cdiv(max(m, 1), per), per


def swap_blocks(index: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, live_codes: torch.Tensor,
                live_scales: torch.Tensor, *, kb_major: bool, blocks_per_program: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Write the canonical `codes` [M, 16] and `scales` [M] (uint8) of the local blocks `index` [M, 3] (expert, row,
    block; each once) into the live parameters (codes [E, N, K/2] holding canonical or kb-major bytes, scales
    [E, N, K/32]) in place; returns the blocks' previous canonical (codes, scales). No host read."""
    e, n, kb = live_scales.shape
    m = index.shape[0]
    old = torch.empty(m, 16, dtype=torch.uint8, device=live_codes.device)
    old_s = torch.empty(m, dtype=torch.uint8, device=live_codes.device)
    if m:
        programs, per = _launch(m, blocks_per_program)
        dev = str(live_codes.device)
        back, forth = _groups_table(SLOT_BITS, False, dev), _groups_table(SLOT_BITS, True, dev)
        _swap_kernel[(programs,)](index.contiguous(), _words(codes), scales.contiguous(), live_codes.view(torch.int32),
                                  live_scales, old.view(torch.int32), old_s, back, forth, m, n, kb,
                                  KB_MAJOR=kb_major, NG_FROM=back.numel() // 3, NG_TO=forth.numel() // 3,
                                  BLOCKS=per)
    return old, old_s


def blocks_equal(index: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, live_codes: torch.Tensor,
                 live_scales: torch.Tensor, *, kb_major: bool, blocks_per_program: int | None = None) -> bool:
    """Whether the live blocks `index` [M, 3], read back through the layout, hold exactly the canonical `codes`
    [M, 16] and `scales` [M]. One host read."""
    e, n, kb = live_scales.shape
    m = index.shape[0]
    if not m:
        return True
    programs, per = _launch(m, blocks_per_program)
    back = _groups_table(SLOT_BITS, False, str(live_codes.device))
    out = torch.empty(programs, dtype=torch.int64, device=live_codes.device)
    _check_kernel[(programs,)](index.contiguous(), _words(codes), scales.contiguous(), live_codes.view(torch.int32),
                               live_scales, back, out, m, n, kb, KB_MAJOR=kb_major, NG_FROM=back.numel() // 3,
                               BLOCKS=per)
    return int(out.sum()) == 0

"""@triton.jit kernels behind common.grouped_gemm.routing.route: a stable counting sort of the flat expert ids.

The P = T*k flat entries are cut into blocks of BLOCK entries, one program each; a program holds the [BLOCK, E_POW2]
one-hot of (entry == expert) in registers, so each program is a single step, without loops:
- `_count_kernel`: counts[block, e] = entries of expert e in the block.
- `_scan_kernel`: turns the counts into per-block exclusive prefixes down each expert column, plus a totals row.
- `_scatter_kernel`: base[e] = (rows of all smaller experts) + (rows of expert e in earlier blocks); an entry's
  sorted row is base[e] + its rank among the earlier entries of expert e in the block (cumsum of the one-hot down
  the block), which is exactly the stable order. It writes source, token and inverse, and program 0 the offsets.
A single block (decode batches) counts its own entries in the scatter kernel: one launch; more take three. (Letting
every scatter program sum the raw counts table itself saves the scan launch but reads the table once a block; on
an H100 that never won by more than ~2 us and lost up to 4x on large batches.)
Counting (no atomics, no comparison sort) makes the result a pure function of the ids, and the host never reads a
device value, so the launches can be captured in a CUDA graph.
Ids outside [0, E) count for no expert and their rows are left unwritten (garbage, never out of bounds): route()
validates the ids on CPU; on CUDA that check would need a host sync and is the caller's job.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..kernels import interpreting, pdl
from ..kernels.pdl import pdl_enter

# Above this many experts the blocks get too thin (< 8 entries) to pay off; route() then uses the torch sort.
MAX_EXPERTS = 2048
# Elements of a program's [block, E_POW2] one-hot tile. On a GPU it must stay in registers (128 int32 a thread at
# 4 warps; on an H100 4 warps and 16k beat 8 warps and 8k, and blocks past 256 entries lose for few experts). The
# interpreter runs numpy on whole tiles and pays per program instead, so it takes big tiles.
_GPU_TILE, _INTERPRETER_TILE = 16384, 65536
_GPU_MAX_BLOCK = 256
# Elements of a scan tile (rows x columns of the counts table). The interpreter's is small so that tests reach a
# scan of several steps with a few hundred blocks.
_GPU_TABLE, _INTERPRETER_TABLE = 16384, 256
# Columns (experts) per scan program: more programs walk the blocks in parallel, each down a narrower strip
# (4 beat 8 and 16 on an H100).
_SCAN_COLS = 4
_NUM_WARPS = 4


@triton.jit
def _one_hot(ids_ptr, pid, P, E, BLOCK: tl.constexpr, E_POW2: tl.constexpr):
    """The program's entries: flat index, valid flag, and the [BLOCK, E_POW2] one-hot of (id == expert)."""
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    ok = idx < P
    e = tl.load(ids_ptr + idx, mask=ok, other=-1)
    ok = ok & (e >= 0) & (e < E)
    e = tl.where(ok, e, -1).to(tl.int32)  # narrow only once huge int64 ids are ruled out
    hot = e[:, None] == tl.arange(0, E_POW2)[None, :]
    return idx, ok, hot


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, P, E, BLOCK: tl.constexpr, E_POW2: tl.constexpr, PDL: tl.constexpr):
    """counts[block, e] = entries of expert e in the block (lanes >= E stay 0)."""
    pdl_enter(PDL)
    pid = tl.program_id(0)
    _, _, hot = _one_hot(ids_ptr, pid, P, E, BLOCK, E_POW2)
    tl.store(counts_ptr + pid * E_POW2 + tl.arange(0, E_POW2), tl.sum(hot.to(tl.int32), axis=0))


@triton.jit
def _scan_kernel(counts_ptr, num_blocks, E_POW2: tl.constexpr, COLS: tl.constexpr, ROWS: tl.constexpr,
                 PDL: tl.constexpr):
    """In place over counts [num_blocks + 1, E_POW2]: each block's row becomes the expert's entries in earlier
    blocks (an exclusive prefix down the column), and row num_blocks the totals. One strip of COLS experts each."""
    pdl_enter(PDL)
    cols = tl.program_id(0) * COLS + tl.arange(0, COLS)
    carry = tl.zeros([COLS], dtype=tl.int32)
    for r0 in range(0, num_blocks, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        ptrs = counts_ptr + rows[:, None] * E_POW2 + cols[None, :]
        ok = (rows < num_blocks)[:, None]
        tile = tl.load(ptrs, mask=ok, other=0)
        tl.store(ptrs, carry[None, :] + tl.cumsum(tile, axis=0) - tile, mask=ok)
        carry += tl.sum(tile, axis=0)
    tl.store(counts_ptr + num_blocks * E_POW2 + cols, carry)


@triton.jit
def _scatter_kernel(ids_ptr, counts_ptr, source_ptr, token_ptr, inverse_ptr, offsets_ptr, P, E, K, num_blocks,
                    BLOCK: tl.constexpr, E_POW2: tl.constexpr, ONE_BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Sorted row of each entry of the block, from the scanned counts table (ONE_BLOCK: from its own counts)."""
    pdl_enter(PDL)
    pid = tl.program_id(0)
    lanes = tl.arange(0, E_POW2)
    idx, ok, hot = _one_hot(ids_ptr, pid, P, E, BLOCK, E_POW2)
    hot_i = hot.to(tl.int32)
    if ONE_BLOCK:
        total = tl.sum(hot_i, axis=0)
        before = tl.zeros([E_POW2], dtype=tl.int32)
    else:
        total = tl.load(counts_ptr + num_blocks * E_POW2 + lanes)
        before = tl.load(counts_ptr + pid * E_POW2 + lanes)
    ends = tl.cumsum(total, axis=0)
    if pid == 0:
        tl.store(offsets_ptr + lanes, ends - total, mask=lanes < E)
        tl.store(offsets_ptr + E, tl.sum(total, axis=0))
    base = ends - total + before  # sorted row of the block's first entry of each expert
    rank = tl.cumsum(hot_i, axis=0)  # 1 + earlier entries of the same expert in the block
    dest = tl.sum(tl.where(hot, base[None, :] + rank - 1, 0), axis=1)
    ok = ok & (dest < P)
    tl.store(source_ptr + dest, idx.to(tl.int64), mask=ok)
    tl.store(token_ptr + dest, (idx // K).to(tl.int64), mask=ok)
    tl.store(inverse_ptr + idx, dest.to(tl.int64), mask=ok)


def _block(p: int, e_pow2: int, block: int | None) -> int:
    """Entries per program: the largest power of two whose one-hot tile fits, but no more than p needs."""
    if block is None:
        fit = _INTERPRETER_TILE // e_pow2 if interpreting() else min(_GPU_TILE // e_pow2, _GPU_MAX_BLOCK)
        return max(1, min(fit, triton.next_power_of_2(p)))
    if block < 1 or block & (block - 1):
        raise ValueError(f"route: block must be a power of two >= 1, got {block}")
    return block


def _rows(num_blocks: int, cols: int) -> int:
    """Counts-table rows per scan step: a tile of at most _*_TABLE elements, no taller than the table."""
    table = _INTERPRETER_TABLE if interpreting() else _GPU_TABLE
    return max(1, min(table // cols, triton.next_power_of_2(num_blocks)))


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int, *, block: int | None = None) -> tuple[torch.Tensor, ...]:
    """(source, token, inverse, offsets) of the stable sort of topk_ids [T, k] by expert (see routing.Routing).

    block (entries per program, a power of two) overrides the size-based default; tests shrink it to reach the
    several-block path on small inputs.
    """
    t, k = topk_ids.shape
    p = t * k
    if p >= 2**31:
        raise ValueError(f"route: {p} (token, slot) pairs do not fit the kernels' int32 indices")
    dev = topk_ids.device
    source = torch.empty(p, dtype=torch.int64, device=dev)
    token = torch.empty(p, dtype=torch.int64, device=dev)
    inverse = torch.empty(p, dtype=torch.int64, device=dev)
    if p == 0:
        return source, token, inverse, torch.zeros(num_experts + 1, dtype=torch.int32, device=dev)
    offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=dev)
    ids = topk_ids.reshape(-1).contiguous()
    e_pow2 = max(16, triton.next_power_of_2(num_experts))
    block = _block(p, e_pow2, block)
    nb = triton.cdiv(p, block)
    counts = ids  # a placeholder pointer: a single block needs no table
    pdl_kw = pdl.launch_options(pdl.mode(ids), small=True)
    if nb > 1:
        counts = torch.empty(nb + 1, e_pow2, dtype=torch.int32, device=dev)
        _count_kernel[(nb,)](ids, counts, p, num_experts, BLOCK=block, E_POW2=e_pow2, num_warps=_NUM_WARPS, **pdl_kw)
        cols = min(_SCAN_COLS, e_pow2)
        _scan_kernel[(e_pow2 // cols,)](counts, nb, E_POW2=e_pow2, COLS=cols, ROWS=_rows(nb, cols),
                                        num_warps=_NUM_WARPS, **pdl_kw)
    _scatter_kernel[(nb,)](ids, counts, source, token, inverse, offsets, p, num_experts, k, nb, BLOCK=block,
                           E_POW2=e_pow2, ONE_BLOCK=nb == 1, num_warps=_NUM_WARPS, **pdl_kw)
    return source, token, inverse, offsets

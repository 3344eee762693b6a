"""@triton.jit kernels of the per-expert LoRA terms (rank R, a few dozen at most) of the grouped MLP.

Both are skinny GEMMs bound by reading the wide operand once; cuBLAS's grouped GEMM spent 17-34 us on each of
them at decode-size batches on an H100 (a fixed cost per call, bench/RESULTS.md eighth round), several times the
bytes they move. Both take bf16 operands (the launchers round wider ones), accumulate in fp32 and round once into
the output dtype (the scaling is applied in fp32).
"""

import triton
import triton.language as tl

from ..kernels.pdl import pdl_enter
from ._tiles import _expert_at_b, _mma, _tile_rows


@triton.jit
def _lora_project_kernel(x_ptr, w_ptr, offsets_ptr, src_ptr, out_ptr, part_ptr, count_ptr, K, E, R, scaling,
                         stride_xm, stride_we, stride_wr, stride_wk, stride_om,
                         GATHER: tl.constexpr, E_POW2: tl.constexpr, F32_DOT: tl.constexpr, SPLIT_K: tl.constexpr,
                         PDL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """out [M, R] = scaling * x_e [rows_e, K] @ W_e^T for each expert's sorted rows; W_e [R, K] at any strides
    (an A factor [E, R, K] as stored, or a B factor [E, K, R] read transposed). Row tiles map to experts as in
    the MXFP4 GEMMs (_tile_rows); grid axis 1 tiles R. GATHER reads sorted row r from x[src[r]] (the MoE
    permutation fused into the loads, as the gated GEMM's GATHER: the engine's layer then never copies its
    tokens into expert order).
    SPLIT_K > 1 (grid axis 2): each program sums one K chunk (a whole number of BLOCK_K steps) into fp32 partials
    (part [tiles, SPLIT_K, BLOCK_M, BLOCK_R]) and counts itself in (count [tiles], zero between launches); the
    tile's last program adds the partials in chunk order, scales, rounds once and puts the count back to zero:
    one launch, the same bits whichever program comes last."""
    pdl_enter(PDL)
    expert, row0, row_end = _tile_rows(offsets_ptr, tl.program_id(0), E, E_POW2, BLOCK_M)
    if expert >= E:
        return
    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < row_end
    if GATHER:
        src = tl.load(src_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        src = rows
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < R
    kk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + src[:, None] * stride_xm + kk[None, :]
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + r[None, :] * stride_wr + kk[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_lo = 0
    k_hi = K
    if SPLIT_K > 1:
        chunk = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_lo = tl.program_id(2) * chunk
        k_hi = tl.minimum(k_lo + chunk, K)
        x_ptrs += k_lo
        w_ptrs += k_lo * stride_wk
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_ok = (k0 + kk) < k_hi
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = _mma(x, w, acc, F32_DOT)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    if SPLIT_K > 1:
        tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        cell = tl.arange(0, BLOCK_M)[:, None] * BLOCK_R + tl.arange(0, BLOCK_R)[None, :]
        parts = part_ptr + tile.to(tl.int64) * (SPLIT_K * BLOCK_M * BLOCK_R) + cell
        tl.store(parts + tl.program_id(2) * (BLOCK_M * BLOCK_R), acc)
        # every thread's partial is written before one of them counts the program in (release); the last one's
        # reads of the others' partials come after its count (acquire) and bypass L1 (.cg)
        tl.debug_barrier()
        if tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu") != SPLIT_K - 1:
            return
        acc = tl.load(parts, cache_modifier=".cg")
        for j in tl.static_range(1, SPLIT_K):
            acc += tl.load(parts + j * (BLOCK_M * BLOCK_R), cache_modifier=".cg")
        tl.atomic_xchg(count_ptr + tile, 0, sem="relaxed", scope="gpu")
    out = acc * scaling
    tl.store(out_ptr + rows[:, None] * stride_om + r[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def _lora_wgrad_kernel(a_ptr, b_ptr, offsets_ptr, out_ptr, P, Q, stride_am, stride_bm, stride_oe, stride_op,
                       stride_oq, F32_DOT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
                       BLOCK_ROWS: tl.constexpr):
    """out[e] [P, Q] = a_e^T [P, rows_e] @ b_e [rows_e, Q] per expert (zero for an expert without rows), written
    at any output strides so that the launcher can put the wide operand on the MMA's M side either way round.
    Each program owns one output tile of one expert and walks that expert's rows: no atomics, deterministic."""
    e = tl.program_id(0)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    q = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_ok = p < P
    q_ok = q < Q
    acc, _ = _expert_at_b(a_ptr, b_ptr, tl.load(offsets_ptr + e), tl.load(offsets_ptr + e + 1), p, q, p_ok, q_ok,
                          stride_am, stride_bm, False, F32_DOT, BLOCK_P, BLOCK_Q, BLOCK_ROWS)
    out = out_ptr + e.to(tl.int64) * stride_oe + p[:, None] * stride_op + q[None, :] * stride_oq
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & q_ok[None, :])

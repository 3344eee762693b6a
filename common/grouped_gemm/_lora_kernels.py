"""@triton.jit kernels of the per-expert LoRA terms (rank R, a few dozen at most) of the grouped MLP.

Both are skinny GEMMs bound by reading the wide operand once; cuBLAS's grouped GEMM spent 17-34 us on each of
them at decode-size batches on an H100 (a fixed cost per call, bench/RESULTS.md eighth round), several times the
bytes they move. Both take bf16 operands (the launchers round wider ones), accumulate in fp32 and round once into
the output dtype (the scaling is applied in fp32).
"""

import triton
import triton.language as tl

from ._tiles import _expert_at_b, _mma, _tile_rows


@triton.jit
def _lora_project_kernel(x_ptr, w_ptr, offsets_ptr, src_ptr, out_ptr, K, E, R, scaling,
                         stride_xm, stride_we, stride_wr, stride_wk, stride_om,
                         GATHER: tl.constexpr, E_POW2: tl.constexpr, F32_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """out [M, R] = scaling * x_e [rows_e, K] @ W_e^T for each expert's sorted rows; W_e [R, K] at any strides
    (an A factor [E, R, K] as stored, or a B factor [E, K, R] read transposed). Row tiles map to experts as in
    the MXFP4 GEMMs (_tile_rows); grid axis 1 tiles R. GATHER reads sorted row r from x[src[r]] (the MoE
    permutation fused into the loads, as the gated GEMM's GATHER: the engine's layer then never copies its
    tokens into expert order)."""
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
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + kk) < K
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = _mma(x, w, acc, F32_DOT)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
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

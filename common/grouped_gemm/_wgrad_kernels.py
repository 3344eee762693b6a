"""@triton.jit kernel of the full-width per-expert weight gradient dW_e = dy_e^T x_e (fake-QAT's straight-through
weight gradient, common/grouped_gemm/wgrad.py), with the bias gradient db_e = sum of dy_e's rows in the same pass.

Unlike _lora_kernels._lora_wgrad_kernel (one side the LoRA rank; the same row walk, _tiles._expert_at_b) both
output sides are wide (an expert's 2I x H or H x I), so the output tiles of one expert run on consecutive programs:
they all read the same expert's rows, which then stay in L2 while that expert's tiles are computed.
"""

import triton
import triton.language as tl

from ._tiles import _expert_at_b


@triton.jit
def _expert_wgrad_kernel(a_ptr, b_ptr, offsets_ptr, out_ptr, bias_ptr, P, Q, stride_am, stride_bm, stride_oe,
                         stride_op, stride_be, ROWS_BUCKET, HAS_BIAS: tl.constexpr, F32_DOT: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """out[e] [P, Q] = a_e^T [P, rows_e] @ b_e [rows_e, Q] for expert e's sorted rows offsets[e]:offsets[e+1],
    zero for an expert without rows; with HAS_BIAS also bias[e] [P] = the column sums of a_e.

    a [M, P] and b [M, Q] are bf16 with unit column stride; out is [E, P, Q] with unit last stride, in any float
    dtype. The fp32 accumulator walks the expert's rows in ascending order (_tiles._expert_at_b, shared with the
    LoRA kernel), and is rounded once into out's dtype: each program owns its output tile, so the
    result is deterministic (no atomics, no split over rows). Grid: one axis over E * P-tiles * Q-tiles, the
    Q-tile fastest, then the P-tile, then the expert. ROWS_BUCKET (unused in the body) keys the autotuner."""
    pid = tl.program_id(0)
    tiles_q = tl.cdiv(Q, BLOCK_Q)
    tiles_p = tl.cdiv(P, BLOCK_P)
    e = pid // (tiles_p * tiles_q)
    tile = pid % (tiles_p * tiles_q)
    pt = tile // tiles_q
    qt = tile % tiles_q
    p = pt * BLOCK_P + tl.arange(0, BLOCK_P)
    q = qt * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_ok = p < P
    q_ok = q < Q
    acc, colsum = _expert_at_b(a_ptr, b_ptr, tl.load(offsets_ptr + e), tl.load(offsets_ptr + e + 1), p, q, p_ok,
                               q_ok, stride_am, stride_bm, HAS_BIAS, F32_DOT, BLOCK_P, BLOCK_Q, BLOCK_ROWS)
    out = out_ptr + e.to(tl.int64) * stride_oe + p[:, None].to(tl.int64) * stride_op + q[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & q_ok[None, :])
    if HAS_BIAS:
        if qt == 0:  # one program per (expert, P-tile) writes the bias gradient: the one at the first Q tile
            tl.store(bias_ptr + e.to(tl.int64) * stride_be + p, colsum.to(bias_ptr.dtype.element_ty), mask=p_ok)

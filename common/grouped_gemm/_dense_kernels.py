"""@triton.jit kernels of the dense prefill path (dense.py): packed experts -> bf16, and the gated activation on the
pre-activation rows a bf16 grouped GEMM wrote.

The weight decode is the grouped GEMMs' own (_tiles: the word loads and the elementwise bit-placement decode), so
the bf16 weights the dense path multiplies are the values the fused kernels multiply, bit for bit, in either code
layout. The activation is _tiles._act_fwd, the fused epilogue's formula, in fp32.
"""

import triton
import triton.language as tl

from ._tiles import DECODE_BITS, _act_fwd, _dequant_words, _load_code_words, _load_scales, _reorder_cols, _word_factors


@triton.jit
def _dequant_experts_kernel(codes_ptr, scales_ptr, out_ptr, N, K,
                            stride_ce, stride_cn, stride_se, stride_sn, stride_oe, stride_on,
                            KB_MAJOR: tl.constexpr, EVEN_K: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # grid (N tiles, K tiles, experts); codes_ptr holds int32 words: [E, N, K/8] canonical, [E, K/32, N, 4] kb-major
    # (stride_cn then the stride of a scale block), as ops._fwd passes them to the forward GEMM
    e = tl.program_id(2).to(tl.int64)
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    k0 = tl.program_id(1) * BLOCK_K
    s = _load_scales(scales_ptr + e * stride_se, rows, row_ok, k0, K, stride_sn, BLOCK_K, EVEN_K)
    fa, fb = _word_factors(s, BLOCK_N, BLOCK_K, DECODE_BITS, False)
    words = _load_code_words(codes_ptr + e * stride_ce, rows, row_ok, k0, K, stride_cn, BLOCK_K, EVEN_K, KB_MAJOR)
    w = _dequant_words(words, fa, fb, BLOCK_N, BLOCK_K, DECODE_BITS, False, KB_MAJOR)
    if not KB_MAJOR:
        # canonical words decode into the interleaved column order of every 32-block; kb-major words store each
        # block pre-shuffled, so their decode is already in the natural order (ops._x_order)
        w = _reorder_cols(w, 2, BLOCK_N, BLOCK_K)
    cols = k0 + tl.arange(0, BLOCK_K)
    mask = row_ok[:, None] & (cols < K)[None, :]
    tl.store(out_ptr + e * stride_oe + rows[:, None] * stride_on + cols[None, :], w, mask=mask)


@triton.jit
def _gated_rows_kernel(pre_ptr, bias_ptr, rexp_ptr, out_ptr, M, HALF,
                       stride_pm, stride_be, stride_om,
                       ACT: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr):
    # out[r, c] = act(pre[r, c] (+ b[e_r, c]), pre[r, HALF + c] (+ b[e_r, HALF + c])) in fp32, rounded once to bf16
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows < M)[:, None] & (cols < HALF)[None, :]
    p = pre_ptr + rows[:, None] * stride_pm + cols[None, :]
    gate = tl.load(p, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(p + HALF, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        ex = tl.load(rexp_ptr + rows, mask=rows < M, other=0).to(tl.int64)
        b = bias_ptr + ex[:, None] * stride_be + cols[None, :]
        gate += tl.load(b, mask=mask, other=0.0).to(tl.float32)
        up += tl.load(b + HALF, mask=mask, other=0.0).to(tl.float32)
    out = _act_fwd(gate, up, ACT, ALPHA, LIMIT)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)

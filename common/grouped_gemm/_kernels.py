"""@triton.jit grouped GEMMs over expert-sorted rows with MXFP4 weights dequantized tile by tile in the K loop.

Both kernels read the canonical packed layout directly (codes [E, N, K/2], scales [E, N, K/32]); no bf16 copy of a
weight ever reaches global memory, and the backward reads the same bytes as the forward (no transpose copy):
- `_grouped_fwd_kernel`: y = x_e @ W_e^T (+ bias_e) (+ lh @ B_e^T); with ACT the weight has 2N rows, [gate; up]
  or (GATE_UP_PAIRS, gpt-oss) gate/up interleaved, and the epilogue writes act(gate, up) (and, with SAVE_PRE, the
  pre-activation for the backward). GATHER reads row r of the sorted batch from x[src[r]] (the token permutation
  fused into the loads) and SCATTER writes it to y[dst[r]] times rw[dst[r]] (the un-permutation and router weight
  fused into the epilogue), so the engine's MoE layer never copies the activations into expert order and back.
- `_grouped_dx_kernel`: dx = dy_e @ W_e (+ lh @ A_e); with ACT the epilogue turns that into (d gate, d up) using
  the saved pre-activation, so the backward of the activation costs no extra pass over memory.
Grid: axis 0 = row tiles (cdiv(M, BLOCK_M) + E, an upper bound of the ragged tile count), axis 1 = output tiles.
Row tiles vary fastest, so programs that share a weight tile run together and hit L2.
"""

import triton
import triton.language as tl

from ..kernels.pdl import pdl_after_loop, pdl_enter
from ._tiles import (
    ACT_NONE,
    DECODE_BITS,
    _act_bwd,
    _act_fwd,
    _dot_xw,
    _dot_xwt,
    _dequant_words,
    _word_factors,
    _deinterleaved_col,
    _interleaved_col,
    _reorder_cols,
    _dequant_tile,
    _load_code_words,
    _load_packed_codes,
    _load_scales,
    _lora_h,
    _lora_term,
    _lora_tile,
    _lora_w,
    _mma,
    _tile_rows,
)


@triton.jit
def _grouped_fwd_kernel(
        x_ptr, codes_ptr, scales_ptr, offsets_ptr, bias_ptr, lh_ptr, lw_ptr, y_ptr, pre_ptr, src_ptr, dst_ptr, rw_ptr,
        M, N, K, E, ROWS_BUCKET,
        stride_xm, stride_ce, stride_cn, stride_se, stride_sn, stride_be,
        stride_lhm, stride_lwe, stride_lwn, stride_ym, stride_pm,
        nf_ptr, np_ptr, nc_ptr, nh_ptr, n_scaling, stride_nfe, stride_nfr, stride_nhm,
        ACT: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr, HAS_BIAS: tl.constexpr,
        LORA_R: tl.constexpr, SAVE_PRE: tl.constexpr, GATHER: tl.constexpr, SCATTER: tl.constexpr,
        E_POW2: tl.constexpr, F32_DOT: tl.constexpr, DECODE: tl.constexpr, SWAP_AB: tl.constexpr,
        WORDS: tl.constexpr, ONE_MUL: tl.constexpr,
        OUT_ORDER: tl.constexpr, WORD_PAIRS: tl.constexpr, EVEN_K: tl.constexpr, GATE_UP_PAIRS: tl.constexpr,
        KB_MAJOR: tl.constexpr, PDL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, NEXT_R: tl.constexpr, NEXT_N: tl.constexpr):
    # KB_MAJOR: codes [E, K/32, N, 16] (layout.py), stride_cn the stride of a scale block.
    # NEXT_R > 0: the next GEMM's LoRA down-projection of this output, fused (_project_output): nf = its factor
    # [E, NEXT_R, N] with columns in the output's column order, np / nc its fp32 partials and row-tile counters,
    # nh = n_scaling * y_e @ nf_e^T [M, NEXT_R]; NEXT_N: N rounded up to a power of two.
    # kb-major words scatter each element's bits (layout.py): the word decode reads them, the byte decode cannot
    tl.static_assert(not KB_MAJOR or WORDS)
    tl.static_assert(NEXT_R == 0 or not SCATTER)
    pdl_enter(PDL)
    expert, row0, row_end = _tile_rows(offsets_ptr, tl.program_id(0), E, E_POW2, BLOCK_M)
    if expert >= E:
        return
    e64 = expert.to(tl.int64)
    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < row_end
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    # the weight rows of output column c: c alone, or with ACT gate c and up N + c ([gate; up] halves) or gate 2c
    # and up 2c + 1 (gpt-oss's interleaved pairs, which the learner keeps); pre is written in the same order
    if ACT != ACT_NONE and GATE_UP_PAIRS:
        g_rows = 2 * cols
        u_rows = g_rows + 1
    else:
        g_rows = cols
        u_rows = cols + N
    c_ptr = codes_ptr + e64 * stride_ce
    s_ptr = scales_ptr + e64 * stride_se
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros_like(acc)
    kk = tl.arange(0, BLOCK_K)
    if GATHER:
        src = tl.load(src_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        src = rows
    a_ptrs = x_ptr + src[:, None] * stride_xm + kk[None, :]
    if LORA_R > 0:
        # the LoRA operands are loaded before the K loop and used after it: their global latency then overlaps
        # the mainloop instead of adding to each tile's epilogue (the term and its place in the sum unchanged)
        # lw = B [E, Nw, R]: element (r, n) sits at n * stride_lwn + r
        lw_e = lw_ptr + e64 * stride_lwe
        lora_h = _lora_h(lh_ptr, stride_lhm, rows, row_ok, LORA_R)
        lora_g = _lora_w(lw_e, 1, stride_lwn, g_rows, col_ok, LORA_R)
        if ACT != ACT_NONE:
            lora_u = _lora_w(lw_e, 1, stride_lwn, u_rows, col_ok, LORA_R)
    # where each output column is written (y feeds a GEMM that reduces in another K order, ops.reduction_order)
    if OUT_ORDER != 0 and BLOCK_N % 32 == 0:  # the tile's columns are whole 32-blocks: reordered in registers
        out_cols = cols
    elif OUT_ORDER == 1:
        out_cols = _interleaved_col(cols)
    elif OUT_ORDER == 2:
        out_cols = _deinterleaved_col(cols)
    else:
        out_cols = cols
    if NEXT_R > 0:
        # the fused projection's factor columns, loaded before the K loop as the LoRA operands above: [BLOCK_N, R]
        next_f = tl.load(nf_ptr + e64 * stride_nfe + out_cols[:, None] + tl.arange(0, NEXT_R)[None, :] * stride_nfr,
                         mask=col_ok[:, None], other=0.0)
    # the decode's bf16x2 PTX pairs a word's nibbles i and i + 4 in one register, the MMA's pair only where the
    # tile is wgmma's register operand (TileConfig.word_pairs); elsewhere the elementwise fp32 decode
    WDEC: tl.constexpr = DECODE if WORD_PAIRS else DECODE_BITS
    OM: tl.constexpr = ONE_MUL and WORD_PAIRS
    # A scale byte covers 32 weights: a row's scales are too narrow for the pipeliner's async copies, so the
    # kernel prefetches the next step's bytes itself and their global latency overlaps this step's work.
    s_nxt = _load_scales(s_ptr, g_rows, col_ok, 0, K, stride_sn, BLOCK_K, EVEN_K)
    if ACT != ACT_NONE:
        s_up_nxt = _load_scales(s_ptr, u_rows, col_ok, 0, K, stride_sn, BLOCK_K, EVEN_K)
    else:
        s_up_nxt = s_nxt
    if WORDS:
        # The word decode's factors move each scale byte to the threads of its words (a shared-memory
        # shuffle): they are built a step ahead from bytes loaded two steps ahead, so neither the global load
        # nor the shuffle stalls the decode.
        fa_nxt, fb_nxt = _word_factors(s_nxt, BLOCK_N, BLOCK_K, WDEC, OM)
        fa_up_nxt, fb_up_nxt = fa_nxt, fb_nxt
        s_nxt = _load_scales(s_ptr, g_rows, col_ok, BLOCK_K, K, stride_sn, BLOCK_K, EVEN_K)
        if ACT != ACT_NONE:
            fa_up_nxt, fb_up_nxt = _word_factors(s_up_nxt, BLOCK_N, BLOCK_K, WDEC, OM)
            s_up_nxt = _load_scales(s_ptr, u_rows, col_ok, BLOCK_K, K, stride_sn, BLOCK_K, EVEN_K)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=row_ok[:, None] & ((k0 + kk) < K)[None, :], other=0.0)
        if WORDS:
            fa, fb, fa_up, fb_up = fa_nxt, fb_nxt, fa_up_nxt, fb_up_nxt
            fa_nxt, fb_nxt = _word_factors(s_nxt, BLOCK_N, BLOCK_K, WDEC, OM)
            s_nxt = _load_scales(s_ptr, g_rows, col_ok, k0 + 2 * BLOCK_K, K, stride_sn, BLOCK_K, EVEN_K)
            if ACT != ACT_NONE:
                fa_up_nxt, fb_up_nxt = _word_factors(s_up_nxt, BLOCK_N, BLOCK_K, WDEC, OM)
                s_up_nxt = _load_scales(s_ptr, u_rows, col_ok, k0 + 2 * BLOCK_K, K, stride_sn, BLOCK_K, EVEN_K)
            # x is in the column order the decoded tile reduces in (ops.reduction_order)
            wd = _load_code_words(c_ptr, g_rows, col_ok, k0, K, stride_cn, BLOCK_K, EVEN_K, KB_MAJOR)
            w = _dequant_words(wd, fa, fb, BLOCK_N, BLOCK_K, WDEC, OM, KB_MAJOR)
            acc = _dot_xwt(a, w, acc, SWAP_AB, F32_DOT)
            if ACT != ACT_NONE:
                wd = _load_code_words(c_ptr, u_rows, col_ok, k0, K, stride_cn, BLOCK_K, EVEN_K, KB_MAJOR)
                w = _dequant_words(wd, fa_up, fb_up, BLOCK_N, BLOCK_K, WDEC, OM, KB_MAJOR)
                acc_up = _dot_xwt(a, w, acc_up, SWAP_AB, F32_DOT)
        else:
            s_cur = s_nxt
            s_up_cur = s_up_nxt
            s_nxt = _load_scales(s_ptr, g_rows, col_ok, k0 + BLOCK_K, K, stride_sn, BLOCK_K, EVEN_K)
            if ACT != ACT_NONE:
                s_up_nxt = _load_scales(s_ptr, u_rows, col_ok, k0 + BLOCK_K, K, stride_sn, BLOCK_K, EVEN_K)
            wp = _load_packed_codes(c_ptr, g_rows, col_ok, k0, K, stride_cn, BLOCK_K, EVEN_K)
            acc = _dot_xwt(a, _dequant_tile(wp, s_cur, BLOCK_N, BLOCK_K, DECODE), acc, SWAP_AB, F32_DOT)
            if ACT != ACT_NONE:
                wp = _load_packed_codes(c_ptr, u_rows, col_ok, k0, K, stride_cn, BLOCK_K, EVEN_K)
                acc_up = _dot_xwt(a, _dequant_tile(wp, s_up_cur, BLOCK_N, BLOCK_K, DECODE), acc_up, SWAP_AB,
                                  F32_DOT)
        a_ptrs += BLOCK_K
    pdl_after_loop(PDL)
    if SWAP_AB:
        acc = tl.trans(acc)
        acc_up = tl.trans(acc_up)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + e64 * stride_be + g_rows, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if ACT != ACT_NONE:
            acc_up += tl.load(bias_ptr + e64 * stride_be + u_rows, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if LORA_R > 0:
        acc += _lora_term(lora_h, lora_g, F32_DOT)
        if ACT != ACT_NONE:
            acc_up += _lora_term(lora_h, lora_u, F32_DOT)
    mask = row_ok[:, None] & col_ok[None, :]
    if ACT != ACT_NONE:
        if SAVE_PRE:
            pre_row = pre_ptr + rows[:, None] * stride_pm
            if GATE_UP_PAIRS:
                # gate c and up c side by side at columns 2c, 2c + 1: one contiguous tile (vector stores, where two
                # stride-2 stores would write element by element)
                pc = 2 * tl.program_id(1) * BLOCK_N + tl.arange(0, 2 * BLOCK_N)
                both = tl.reshape(tl.join(acc, acc_up), (BLOCK_M, 2 * BLOCK_N))
                tl.store(pre_row + pc[None, :], both.to(pre_ptr.dtype.element_ty),
                         mask=row_ok[:, None] & (pc < 2 * N)[None, :])
            else:
                tl.store(pre_row + cols[None, :], acc.to(pre_ptr.dtype.element_ty), mask=mask)
                tl.store(pre_row + N + cols[None, :], acc_up.to(pre_ptr.dtype.element_ty), mask=mask)
        out = _act_fwd(acc, acc_up, ACT, ALPHA, LIMIT)
    else:
        out = acc
    if SCATTER:
        dst = tl.load(dst_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        out = out * tl.load(rw_ptr + dst, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    else:
        dst = rows
    if OUT_ORDER != 0 and BLOCK_N % 32 == 0:
        out = _reorder_cols(out, OUT_ORDER, BLOCK_M, BLOCK_N)
    out = out.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + dst[:, None] * stride_ym + out_cols[None, :], out, mask=mask)
    if NEXT_R > 0:
        _project_output(out, next_f, np_ptr, nc_ptr, nh_ptr, n_scaling, stride_nhm, rows, row_ok, NEXT_R, NEXT_N,
                        F32_DOT, BLOCK_M, BLOCK_N)


@triton.jit
def _project_output(out, f, part_ptr, count_ptr, h_ptr, scaling, stride_hm, rows, row_ok, R: tl.constexpr,
                    NEXT_N: tl.constexpr, F32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The next GEMM's LoRA down-projection h = scaling * y_e @ F_e^T [M, R] of the output y this kernel writes,
    from the tiles in registers: each output tile's fp32 partial out [BLOCK_M, BLOCK_N] (as stored) @ f
    [BLOCK_N, R] is written to part [row tiles, output tiles, BLOCK_M, R] and counted in on its row tile's counter
    (zero between launches); the row tile's last program adds the partials in output-tile order, scales, rounds
    once and puts the count back. The projection's launch and its second read of y are saved; the bits are the
    same whichever program comes last (the split-K fix-up of _lora_kernels.py, one chunk per output tile)."""
    partial = _mma(out, f, tl.zeros((BLOCK_M, R), dtype=tl.float32), F32_DOT)
    tiles = tl.num_programs(1)
    cell = tl.arange(0, BLOCK_M)[:, None] * R + tl.arange(0, R)[None, :]
    row_parts = part_ptr + tl.program_id(0).to(tl.int64) * tiles * (BLOCK_M * R)
    tl.store(row_parts + tl.program_id(1) * (BLOCK_M * R) + cell, partial)
    # every thread's partial is written before one of them counts the program in (release); the last one's reads
    # of the others' partials come after its count (acquire) and bypass L1 (.cg)
    tl.debug_barrier()
    if tl.atomic_add(count_ptr + tl.program_id(0), 1, sem="acq_rel", scope="gpu") != tiles - 1:
        return
    # the partials CHUNK output tiles at a time (their loads issued together, not one latency per tile; 4096 fp32
    # per chunk: 32 registers a thread at 4 warps), summed in a fixed order; tiles past N / BLOCK_N are masked
    TILES: tl.constexpr = NEXT_N // BLOCK_N if NEXT_N > BLOCK_N else 1
    PER: tl.constexpr = 4096 // (BLOCK_M * R) if BLOCK_M * R < 4096 else 1
    CHUNK: tl.constexpr = PER if PER < TILES else TILES
    h = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for c0 in tl.static_range(0, TILES, CHUNK):
        t = c0 + tl.arange(0, CHUNK)
        got = tl.load(row_parts + t[:, None, None] * (BLOCK_M * R) + cell[None, :, :],
                      mask=(t < tiles)[:, None, None], other=0.0, cache_modifier=".cg")
        h += tl.sum(got, axis=0)
    tl.atomic_xchg(count_ptr + tl.program_id(0), 0, sem="relaxed", scope="gpu")
    tl.store(h_ptr + rows[:, None] * stride_hm + tl.arange(0, R)[None, :], (h * scaling).to(h_ptr.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit
def _grouped_dx_kernel(
        dy_ptr, codes_ptr, scales_ptr, offsets_ptr, lh_ptr, lw_ptr, pre_ptr, dx_ptr,
        M, N, K, E, ROWS_BUCKET,
        stride_dym, stride_ce, stride_cn, stride_se, stride_sn,
        stride_lhm, stride_lwe, stride_lwr, stride_pm, stride_dxm,
        ACT: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr, LORA_R: tl.constexpr,
        E_POW2: tl.constexpr, F32_DOT: tl.constexpr, DECODE: tl.constexpr, SWAP_AB: tl.constexpr,
        WORD_PAIRS: tl.constexpr, EVEN_K: tl.constexpr, GATE_UP_PAIRS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # WORD_PAIRS (TileConfig.meta) concerns the forward's word decode only
    # dx [M, K] = dy [M, N] @ W [N, K]: BLOCK_N is the reduction step over W's rows, BLOCK_K the output tile
    # over W's packed K axis, so each weight tile is read in its stored orientation.
    expert, row0, row_end = _tile_rows(offsets_ptr, tl.program_id(0), E, E_POW2, BLOCK_M)
    if expert >= E:
        return
    e64 = expert.to(tl.int64)
    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < row_end
    k0 = tl.program_id(1) * BLOCK_K
    cols = k0 + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    c_ptr = codes_ptr + e64 * stride_ce
    s_ptr = scales_ptr + e64 * stride_se
    if SWAP_AB:
        acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    nn = tl.arange(0, BLOCK_N)
    a_ptrs = dy_ptr + rows[:, None] * stride_dym + nn[None, :]
    # scales prefetched one step ahead, as in _grouped_fwd_kernel (EVEN_K: K % BLOCK_K == 0, the output tiles)
    s_nxt = _load_scales(s_ptr, nn, nn < N, k0, K, stride_sn, BLOCK_K, EVEN_K)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + nn
        n_ok = n < N
        a = tl.load(a_ptrs, mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        s_cur = s_nxt
        s_nxt = _load_scales(s_ptr, n + BLOCK_N, (n + BLOCK_N) < N, k0, K, stride_sn, BLOCK_K, EVEN_K)
        wp = _load_packed_codes(c_ptr, n, n_ok, k0, K, stride_cn, BLOCK_K, EVEN_K)
        acc = _dot_xw(a, _dequant_tile(wp, s_cur, BLOCK_N, BLOCK_K, DECODE), acc, SWAP_AB, F32_DOT)
        a_ptrs += BLOCK_N
    if SWAP_AB:
        acc = tl.trans(acc)
    if LORA_R > 0:
        # lw = A [E, R, K]: element (r, k) sits at r * stride_lwr + k
        acc += _lora_tile(lh_ptr, stride_lhm, rows, row_ok, lw_ptr + e64 * stride_lwe, stride_lwr, 1, cols, col_ok,
                          LORA_R, F32_DOT)
    mask = row_ok[:, None] & col_ok[None, :]
    if ACT != ACT_NONE:
        # pre and d pre columns in w13's row order: [gate; up] halves, or gpt-oss's (gate, up) pairs, read and
        # written as one contiguous tile of both (vector loads and stores)
        pre_row = pre_ptr + rows[:, None] * stride_pm
        dx_row = dx_ptr + rows[:, None] * stride_dxm
        if GATE_UP_PAIRS:
            pc = 2 * k0 + tl.arange(0, 2 * BLOCK_K)
            pmask = row_ok[:, None] & (pc < 2 * K)[None, :]
            both = tl.load(pre_row + pc[None, :], mask=pmask, other=0.0).to(tl.float32)
            gate, up = tl.split(tl.reshape(both, (BLOCK_M, BLOCK_K, 2)))
            d_gate, d_up = _act_bwd(gate, up, acc, ACT, ALPHA, LIMIT)
            d_both = tl.reshape(tl.join(d_gate, d_up), (BLOCK_M, 2 * BLOCK_K))
            tl.store(dx_row + pc[None, :], d_both.to(dx_ptr.dtype.element_ty), mask=pmask)
        else:
            gate = tl.load(pre_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            up = tl.load(pre_row + K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            d_gate, d_up = _act_bwd(gate, up, acc, ACT, ALPHA, LIMIT)
            tl.store(dx_row + cols[None, :], d_gate.to(dx_ptr.dtype.element_ty), mask=mask)
            tl.store(dx_row + K + cols[None, :], d_up.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :], acc.to(dx_ptr.dtype.element_ty), mask=mask)

"""@triton.jit helpers of the grouped MXFP4 GEMMs: tile -> expert mapping, in-register dequantization of a
weight tile, the two MMA orientations, and the gated activation forward/backward.

The dequantization is exact (as common.reference.dequantize_mxfp4): an E2M1 value has 2 significant bits and a
scale is a power of two, so value * scale (fp32) is a bf16 number and the cast to bf16 does not round.
"""

import triton
import triton.language as tl

from . import layout

ACT_NONE = tl.constexpr(0)
ACT_SILU = tl.constexpr(1)
ACT_SWIGLU_OAI = tl.constexpr(2)
ACT_SILU_CLAMP = tl.constexpr(3)

# E2M1 decodes of a weight tile (ops.decode_mode): bit placement in fp32 (the interpreter, which cannot run inline
# assembly, and GPUs older than sm_90) or in bf16x2 PTX (sm_90+).
DECODE_BITS = tl.constexpr(1)
DECODE_BF16X2 = tl.constexpr(2)


@triton.jit
def _tile_rows(offsets_ptr, pid_m, E, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    """Map the pid_m-th row tile of the ragged batch to (expert, first row, end row of the expert).

    Expert e owns ceil(rows_e / BLOCK_M) tiles; tiles are numbered expert by expert. All experts' tile counts are
    loaded as one vector and scanned, so the mapping costs one load and a cumsum (no serial loop, no host sync).
    The launcher's grid has cdiv(M, BLOCK_M) + E tiles, an upper bound; programs past the last tile get
    expert == E and exit.
    """
    e_idx = tl.arange(0, E_POW2)
    e_ok = e_idx < E
    lo = tl.load(offsets_ptr + e_idx, mask=e_ok, other=0)
    hi = tl.load(offsets_ptr + e_idx + 1, mask=e_ok, other=0)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    cum = tl.cumsum(tiles, 0)
    expert = tl.sum((cum <= pid_m).to(tl.int32), 0)
    mine = e_idx == expert
    first_tile = tl.sum(tl.where(mine, cum - tiles, 0), 0)
    row0 = tl.sum(tl.where(mine, lo, 0), 0) + (pid_m - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(mine, hi, 0), 0)
    return expert, row0, row_end


@triton.jit
def _e2m1_f32_scaled_down(packed):
    """(even, odd) fp32 values * 2^-126 of the two E2M1 nibbles of each code byte (int32 0..255).

    Placing a nibble's magnitude bits eem at fp32 bits 24..22 gives exponent field ee and top mantissa bit m: for
    ee >= 1 that is 2^(ee-127) * (1 + m/2), for ee = 0 the subnormal m * 2^-127, i.e. always the E2M1 value
    times 2^-126. Five integer ops per element instead of a compare-and-select decode.
    """
    lo = ((packed & 0x7) << 22) | ((packed & 0x8) << 28)
    hi = ((packed & 0x70) << 18) | ((packed & 0x80) << 24)
    return lo.to(tl.float32, bitcast=True), hi.to(tl.float32, bitcast=True)


def _bf16x2_decode_asm() -> str:
    """PTX of _e2m1_bf16x2_times for one pack of 4 code bytes ($4) and their 4 bf16 factors ($5: bytes 0-1, $6:
    bytes 2-3). t and u hold bytes (0, 1) and (2, 3) in the low bytes of their bf16 halves; per output register,
    the low nibbles (shifts 6 and 12 put magnitude and sign at bf16 bits 8..6 and 15) or the high nibbles (shifts
    2 and 8)."""
    lines = ["{", ".reg .b32 z, c, t, u, x, y;", "mov.b32 z, 0;", "mov.b32 c, 0x7E807E80;",  # c = bf16x2 2^126
             "prmt.b32 t, $4, z, 0x4140;", "prmt.b32 u, $4, z, 0x4342;"]
    for out, src, mag, sign, factor in (("$0", "t", 6, 12, "$5"), ("$1", "u", 6, 12, "$6"),
                                        ("$2", "t", 2, 8, "$5"), ("$3", "u", 2, 8, "$6")):
        lines += [f"shl.b32 x, {src}, {mag};", "and.b32 x, x, 0x01C001C0;", f"shl.b32 y, {src}, {sign};",
                  "and.b32 y, y, 0x80008000;", "or.b32 x, x, y;", "mul.rn.bf16x2 x, x, c;",
                  f"mul.rn.bf16x2 {out}, x, {factor};"]
    return "\n".join(lines + ["}"])


_BF16X2_DECODE_ASM = tl.constexpr(_bf16x2_decode_asm())


@triton.jit
def _e2m1_bf16x2_times(packed, factor):
    """(even, odd) bf16 E2M1 values of each code byte (uint8) times factor (bf16, one per byte), two elements per
    32-bit op (sm_90 PTX). prmt spreads two code bytes into the two bf16 halves of a register; each nibble's
    magnitude bits eem land at bf16 bits 8..6 and its sign at bit 15, which reads as the E2M1 value times 2^-126
    (ee = 0 gives the subnormal m * 2^-127, as in _e2m1_f32_scaled_down); mul.rn.bf16x2 by 2^126 restores it
    exactly (a normal bf16 of 2 significant bits) and a second one applies the factor, exactly unless the product
    overflows (inf, as the fp32 decode) or is a subnormal (kept: bf16 arithmetic does not flush)."""
    return tl.inline_asm_elementwise(asm=_BF16X2_DECODE_ASM, constraints="=r,=r,=r,=r,r,r,r", args=[packed, factor],
                                     dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)


@triton.jit
def _e8m0_bf16(s):
    """bf16 2^(s - 127) of scale bytes (int32): byte 0 is the subnormal 2^-127 (bits 0x0040), byte 255 NaN."""
    bits = tl.where(s >= 1, s << 7, 0x0040)
    return tl.where(s == 255, 0x7FC0, bits).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _e8m0_times_2_126_bf16(s):
    """bf16 2^(s - 1) = 2^126 * 2^(s - 127) of scale bytes (int32) s <= 128 (the one-multiply word decode)."""
    return ((s + 126) << 7).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _e8m0_factors(s):
    """fp32 (f1, f2) with f1 * f2 = 2^126 * 2^(s - 127) = 2^(s - 1), each a finite power of two: f1 = 2^(min(s,
    128) - 1), f2 = 2^(max(s, 128) - 128). Byte 255 (NaN) gives f2 = NaN. Exact: every partial product of an E2M1
    value has 2 significant bits and stays >= 2^-128, inside fp32's subnormal range."""
    f1 = (tl.minimum(s, 128) + 126) << 23
    f2 = tl.where(s == 255, 0x7FC00000, (tl.maximum(s, 128) - 1) << 23)
    return f1.to(tl.float32, bitcast=True), f2.to(tl.float32, bitcast=True)


@triton.jit
def _load_scales(scales_ptr, rows, row_ok, col0, K, stride_sr, C: tl.constexpr, EVEN_K: tl.constexpr):
    """E8M0 bytes [R, C/32] of W[rows, col0:col0+C]; masked blocks read as 127 (1.0). col0 may be K or past it
    (the kernels prefetch the next tile's scales one step ahead): such a tile reads nothing.
    EVEN_K (K % C == 0): a tile lies wholly inside K or wholly past it, so one scalar test replaces the per-block
    mask, which keeps the mask constant along the row and lets the compiler vectorize the load."""
    sc = col0 // 32 + tl.arange(0, C // 32)
    if EVEN_K:
        mask = row_ok[:, None] & (tl.full([1, 1], col0, tl.int32) < K)
    else:
        mask = row_ok[:, None] & (sc < K // 32)[None, :]
    return tl.load(scales_ptr + rows[:, None] * stride_sr + sc[None, :], mask=mask, other=127)


@triton.jit
def _load_kb_major(codes_ptr, rows, row_ok, col0, K, stride_kb, C: tl.constexpr, EVEN_K: tl.constexpr):
    """int32 [R, C/8] code words of W[rows, col0:col0+C] from an expert's kb-major codes [K/32, N, 4] (4 words per
    row and scale block; stride_kb the stride of a scale block). Read as [C/32, R, 4], contiguous rows of 16 bytes,
    so the pipeliner's shared copy has no bank conflicts, and permuted in registers. Masked blocks read as 0 (+0.0);
    EVEN_K as _load_scales."""
    U: tl.constexpr = 4
    kb = col0 // 32 + tl.arange(0, C // 32)
    u = tl.arange(0, U)
    ptrs = codes_ptr + (kb * stride_kb)[:, None, None] + (rows * U)[None, :, None] + u[None, None, :]
    if EVEN_K:
        mask = row_ok[None, :, None]
    else:
        mask = row_ok[None, :, None] & (kb < K // 32)[:, None, None]
    t3 = tl.load(ptrs, mask=mask, other=0)
    return tl.reshape(tl.permute(t3, (1, 0, 2)), (rows.shape[0], C // 32 * U))


@triton.jit
def _load_packed_codes(codes_ptr, rows, row_ok, col0, K, stride_cr, C: tl.constexpr, EVEN_K: tl.constexpr):
    """Code bytes uint8 [R, C/2] of W[rows, col0:col0+C] of one expert (packed codes [N, K/2]); masked bytes
    read as 0 (+0.0). C is a multiple of 32 and col0 of C, and K a multiple of 32, so a scale block is either
    wholly inside K or wholly masked. EVEN_K (K % C == 0): no mask along K (as _load_scales).
    Canonical codes only: kb-major words scatter each element's bits (layout.py), which only the word decode
    reads."""
    pc = col0 // 2 + tl.arange(0, C // 2)
    if EVEN_K:
        mask = row_ok[:, None]
    else:
        mask = row_ok[:, None] & (pc < K // 2)[None, :]
    return tl.load(codes_ptr + rows[:, None] * stride_cr + pc[None, :], mask=mask, other=0)


@triton.jit
def _dequant_tile(packed, s, R: tl.constexpr, C: tl.constexpr, DECODE: tl.constexpr = DECODE_BITS):
    """bf16 [R, C] values of a packed tile (codes [R, C/2], scale bytes [R, C/32]; exact, see the module
    docstring)."""
    s = s.to(tl.int32)
    if DECODE == DECODE_BF16X2:
        f = _e8m0_bf16(s)
        f = tl.reshape(tl.broadcast_to(f[:, :, None], (R, C // 32, 16)), (R, C // 2))
        lo, hi = _e2m1_bf16x2_times(packed, f)
        return tl.reshape(tl.join(lo, hi), (R, C))
    lo, hi = _e2m1_f32_scaled_down(packed.to(tl.int32))
    # byte j holds element 2j (low nibble) and 2j + 1 (high nibble)
    v = tl.reshape(tl.join(lo, hi), (R, C // 32, 32))
    # fp32 multiplies then the cast to bf16: all exact (the products have 2 significant bits); the interpreter
    # has no bf16 arithmetic.
    f1, f2 = _e8m0_factors(s)
    w = (v * f1[:, :, None]) * f2[:, :, None]
    return tl.reshape(w, (R, C)).to(tl.bfloat16)


# The word decode (ops._use_words): a dot product may reduce in any order, so the forward GEMMs reduce over
# K in an order chosen to fit the MMA's register operand instead of the storage order. Within every 32-element block
# (one scale block, 4 code words of 8 nibbles) the kernel's logical column c = 8i + 2t + h holds the stored element
# p = 8t + i + 4h: word t, nibble i + 4h. A thread of the wgmma A operand owns the column pairs (c, c+1) with
# c = 2t + 8i, so it needs exactly word t of each block and decodes it into four bf16x2 registers, each pairing
# nibble i with nibble i + 4 (16 bits apart: one shift serves both halves). The activations are read in the same
# order (interleave_k), so the product is unchanged. See docs/kernels.md.


def _word_decode_asm(one_mul: bool) -> str:
    """PTX of _e2m1_words_bf16x2: $4 (and $5, the same word) a code word, $6 a bf16x2 factor (both halves the same);
    $i (i = 0..3) = bf16x2 (nibble i, nibble i + 4) * 2^126 * factor. Each nibble's magnitude bits land at bf16
    bits 8..6 / 24..22 and its sign at bit 15 / 31, which reads as the E2M1 value times 2^-126. With one_mul the
    factor already holds 2^126 * scale = 2^(s - 1) (only finite for scale bytes s <= 128) and one mul.rn.bf16x2
    applies both; otherwise a first one restores the E2M1 value exactly and a second applies the scale (as
    _e2m1_bf16x2_times). Either way every product is exact (2 significant bits)."""
    lines = ["{", ".reg .b32 c, x, y;", "mov.b32 c, 0x7E807E80;"]
    for i in range(4):
        mag, sign = 6 - 4 * i, 12 - 4 * i  # nibble i's eem bits (4i..4i+2) -> 6..8, its sign bit (4i+3) -> 15
        lines.append(f"shl.b32 x, $4, {mag};" if mag >= 0 else f"shr.u32 x, $4, {-mag};")
        lines.append(f"shl.b32 y, $4, {sign};" if sign > 0 else "mov.b32 y, $4;")
        lines += ["and.b32 x, x, 0x01C001C0;", "and.b32 y, y, 0x80008000;", "or.b32 x, x, y;"]
        lines += ([f"mul.rn.bf16x2 ${i}, x, $6;"] if one_mul
                  else ["mul.rn.bf16x2 x, x, c;", f"mul.rn.bf16x2 ${i}, x, $6;"])
    return "\n".join(lines + ["}"])


_WORD_DECODE_ASM = tl.constexpr(_word_decode_asm(False))
_WORD_DECODE_ASM_ONE_MUL = tl.constexpr(_word_decode_asm(True))


def _kb_word_decode_asm(one_mul: bool) -> str:
    """PTX of _e2m1_words_bf16x2 for kb-major words, whose slots' bits are stored where one step moves them onto
    layout.DECODE_MASK (layout.py): pair 0 in place, pairs 1 and 2 rotated (shf.l.wrap), pair 3 masked and
    multiplied (three non-overlapping shifted copies). Same outputs and scale multiplies as _word_decode_asm."""
    mask = f"{layout.DECODE_MASK:#010x}"
    lines = ["{", ".reg .b32 c, x;", "mov.b32 c, 0x7E807E80;"]
    for i in range(4):
        if i == 0:
            lines.append(f"and.b32 x, $4, {mask};")
        elif i < 3:
            lines += [f"shf.l.wrap.b32 x, $4, $4, {layout.PAIR_ROTATE[i]};", f"and.b32 x, x, {mask};"]
        else:
            lines += [f"and.b32 x, $4, {layout.PAIR3_MASK:#010x};", f"mul.lo.u32 x, x, {layout.PAIR3_MULTIPLIER};",
                      f"and.b32 x, x, {mask};"]
        lines += ([f"mul.rn.bf16x2 ${i}, x, $6;"] if one_mul
                  else ["mul.rn.bf16x2 x, x, c;", f"mul.rn.bf16x2 ${i}, x, $6;"])
    return "\n".join(lines + ["}"])


_KB_WORD_DECODE_ASM = tl.constexpr(_kb_word_decode_asm(False))
_KB_WORD_DECODE_ASM_ONE_MUL = tl.constexpr(_kb_word_decode_asm(True))
_KB_DECODE_MASK = tl.constexpr(layout.DECODE_MASK)
_KB_ROT1 = tl.constexpr(layout.PAIR_ROTATE[1])
_KB_ROT2 = tl.constexpr(layout.PAIR_ROTATE[2])
_KB_PAIR3_MASK = tl.constexpr(layout.PAIR3_MASK)
_KB_PAIR3_MULTIPLIER = tl.constexpr(layout.PAIR3_MULTIPLIER)


@triton.jit
def _words_asm(words, factor, ASM: tl.constexpr):
    return tl.inline_asm_elementwise(asm=ASM, constraints="=r,=r,=r,=r,r,r,r", args=[words, factor],
                                     dtype=(tl.bfloat16,) * 4, is_pure=True, pack=2)


@triton.jit
def _e2m1_words_bf16x2(words, factor, ONE_MUL: tl.constexpr, KB_MAJOR: tl.constexpr):
    """Four bf16 [R, W, 2] tensors o_i[r, w, h] = E2M1 slot i + 4h of words[r, w] (int32 [R, W, 2], the word
    repeated along h; a slot is nibble i + 4h of a canonical word, or the bits layout.SLOT_BITS names in a kb-major
    one) times the scale whose bf16 factor is given ([R, W, 2]; 2^(s - 1) with ONE_MUL, else 2^(s - 127)); sm_90
    PTX (see _word_decode_asm and _kb_word_decode_asm)."""
    if KB_MAJOR and ONE_MUL:
        out = _words_asm(words, factor, _KB_WORD_DECODE_ASM_ONE_MUL)
    elif KB_MAJOR:
        out = _words_asm(words, factor, _KB_WORD_DECODE_ASM)
    elif ONE_MUL:
        out = _words_asm(words, factor, _WORD_DECODE_ASM_ONE_MUL)
    else:
        out = _words_asm(words, factor, _WORD_DECODE_ASM)
    return out


@triton.jit
def _nibble_f32(words, n: tl.constexpr):
    """fp32 E2M1 value * 2^-126 of nibble n of each word (bit placement, as _e2m1_f32_scaled_down)."""
    v = (words >> (4 * n)) & 0xF
    return (((v & 0x7) << 22) | ((v & 0x8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def _kb_pair_bits(words, i: tl.constexpr):
    """uint32 bf16x2 bit patterns of pair i (slots i, i + 4) of kb-major words: the integer steps of
    _kb_word_decode_asm, portable (the interpreter, the elementwise decode)."""
    w = words.to(tl.uint32, bitcast=True)
    if i == 1:
        w = (w << _KB_ROT1) | (w >> (32 - _KB_ROT1))
    elif i == 2:
        w = (w << _KB_ROT2) | (w >> (32 - _KB_ROT2))
    elif i == 3:
        w = (w & _KB_PAIR3_MASK) * _KB_PAIR3_MULTIPLIER
    return w & _KB_DECODE_MASK


@triton.jit
def _slot_pair_f32(words, i: tl.constexpr, h, KB_MAJOR: tl.constexpr):
    """fp32 E2M1 value * 2^-126 of slot i + 4h (h: 0/1 tensor broadcast with words) of each word."""
    if KB_MAJOR:
        x = _kb_pair_bits(words, i)
        bits = tl.where(h == 0, x << 16, x & 0xFFFF0000)
        return bits.to(tl.float32, bitcast=True)
    return tl.where(h == 0, _nibble_f32(words, i), _nibble_f32(words, i + 4))


@triton.jit
def _interleaved_col(n):
    """Position of natural column n in the interleaved order of _dequant_words (stored element p = 8t + i + 4h of
    a 32-block sits at 8i + 2t + h)."""
    p = n % 32
    return n - p + 8 * (p % 4) + 2 * (p // 8) + (p // 4) % 2


@triton.jit
def _reorder_cols(t, ORDER: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    """[R, C] tile (C a multiple of 32) with the columns of every 32-block moved to interleave_k's order (ORDER 1)
    or deinterleave_k's (ORDER 2), in registers: the store that follows stays contiguous (a per-element column
    scatter made the gated GEMM's stores 2-byte transactions: dsv4 layer at 1024 tokens 1.16 -> 1.43 ms)."""
    if ORDER == 1:  # natural column 8t + 4h + i goes to 8i + 2t + h
        v = tl.permute(tl.reshape(t, (R, C // 32, 4, 2, 4)), (0, 1, 4, 2, 3))
    else:  # natural column 8i + 2t + h goes to 8t + 4h + i
        v = tl.permute(tl.reshape(t, (R, C // 32, 4, 4, 2)), (0, 1, 3, 4, 2))
    return tl.reshape(v, (R, C))


@triton.jit
def _deinterleaved_col(n):
    """Position of natural column n in deinterleave_k's order (the inverse of _interleaved_col)."""
    c = n % 32
    return n - c + 8 * ((c % 8) // 2) + c // 8 + 4 * (c % 2)


@triton.jit
def _load_code_words(codes_ptr, rows, row_ok, col0, K, stride_cr, C: tl.constexpr, EVEN_K: tl.constexpr,
                     KB_MAJOR: tl.constexpr):
    """Code words int32 [R, C/8] of W[rows, col0:col0+C] of one expert; codes_ptr is the packed codes viewed as
    int32 (stride_cr in words). Masked words read as 0 (+0.0); EVEN_K and KB_MAJOR as _load_packed_codes (a
    scale block is 4 words). The kb-major read [C/32, R, 4] gives the pipeliner's shared copy 16-byte rows, which
    the decode's 8-row ldmatrix reads without bank conflicts (common/grouped_gemm/layout.py)."""
    if KB_MAJOR:
        return _load_kb_major(codes_ptr, rows, row_ok, col0, K, stride_cr, C, EVEN_K)
    wc = col0 // 8 + tl.arange(0, C // 8)
    # a row holds K/8 words, a multiple of 4 (K % 32 == 0): every row starts 16-byte aligned, which the JIT's
    # divisibility-by-16 specialization of stride_cr cannot see for K = 2880 (gpt-oss: 360 words)
    row_off = tl.multiple_of(rows * stride_cr, 4)
    if EVEN_K:
        mask = row_ok[:, None]
    else:
        mask = row_ok[:, None] & (wc < K // 8)[None, :]
    return tl.load(codes_ptr + row_off[:, None] + wc[None, :], mask=mask, other=0)


@triton.jit
def _word_factors(s, R: tl.constexpr, C: tl.constexpr, DECODE: tl.constexpr, ONE_MUL: tl.constexpr):
    """Per-word scale factors of a tile's scale bytes [R, C/32] for _dequant_words, broadcast to the words' shape
    [R, C/8, 2]: (f, f) bf16 for the bf16x2 decode (2^(s - 1) with ONE_MUL, else 2^(s - 127)), (f1, f2) fp32 for
    the elementwise one. Split from the decode so the kernels can compute them a K step early: the broadcast moves
    each scale byte to the threads that own its words, a shuffle through shared memory whose latency would
    otherwise stall the decode."""
    s = s.to(tl.int32)
    if DECODE == DECODE_BF16X2:
        if ONE_MUL:
            f = _e8m0_times_2_126_bf16(s)
        else:
            f = _e8m0_bf16(s)
        f1 = tl.reshape(tl.broadcast_to(f[:, :, None], (R, C // 32, 8)), (R, C // 8, 2))
        f2 = f1
    else:
        f1, f2 = _e8m0_factors(s)
        f1 = tl.reshape(tl.broadcast_to(f1[:, :, None], (R, C // 32, 8)), (R, C // 8, 2))
        f2 = tl.reshape(tl.broadcast_to(f2[:, :, None], (R, C // 32, 8)), (R, C // 8, 2))
    return f1, f2


@triton.jit
def _dequant_words(words, fa, fb, R: tl.constexpr, C: tl.constexpr, DECODE: tl.constexpr, ONE_MUL: tl.constexpr,
                   KB_MAJOR: tl.constexpr):
    """bf16 [R, C] of a tile from _load_code_words in the interleaved column order (c = 8i + 2t + h <- slot i + 4h
    of word t of every 32-element block); exact, as _dequant_tile. (fa, fb): _word_factors of the tile's scale
    bytes. ONE_MUL (bf16x2 only) needs every scale byte <= 128 (ops checks the caller's bound). KB_MAJOR: the words
    hold their slots' bits as layout.SLOT_BITS places them."""
    wd = tl.broadcast_to(words[:, :, None], (R, C // 8, 2))
    if DECODE == DECODE_BF16X2:
        o0, o1, o2, o3 = _e2m1_words_bf16x2(wd, fa, ONE_MUL, KB_MAJOR)
    else:
        h = tl.arange(0, 2)[None, None, :]
        o0 = _slot_pair_f32(wd, 0, h, KB_MAJOR)
        o1 = _slot_pair_f32(wd, 1, h, KB_MAJOR)
        o2 = _slot_pair_f32(wd, 2, h, KB_MAJOR)
        o3 = _slot_pair_f32(wd, 3, h, KB_MAJOR)
        o0, o1, o2, o3 = ((o0 * fa) * fb, (o1 * fa) * fb, (o2 * fa) * fb, (o3 * fa) * fb)
        o0, o1, o2, o3 = o0.to(tl.bfloat16), o1.to(tl.bfloat16), o2.to(tl.bfloat16), o3.to(tl.bfloat16)
    # o_i[r, 4b + t, h] -> column 32b + 8i + 2t + h, i = x + 2y
    j = tl.join(tl.join(o0, o1), tl.join(o2, o3))  # [R, C/8, 2(h), 2(x), 2(y)]
    j = tl.reshape(j, (R, C // 32, 4, 2, 2, 2))  # [R, b, t, h, x, y]
    return tl.reshape(tl.permute(j, (0, 1, 5, 4, 2, 3)), (R, C))


@triton.jit
def _mma(a, b, acc, F32_DOT: tl.constexpr):
    """acc += a @ b. F32_DOT (set under TRITON_INTERPRET=1, whose bf16 dot is wrong in triton 3.9) multiplies the
    same bf16 values in fp32: products of bf16 numbers are exact in fp32 either way."""
    if F32_DOT:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _expert_at_b(a_ptr, b_ptr, lo, hi, p, q, p_ok, q_ok, stride_am, stride_bm, COLSUM: tl.constexpr,
                 F32_DOT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """(acc [BLOCK_P, BLOCK_Q], colsum [BLOCK_P]) = (a^T @ b, the column sums of a) over the sorted rows [lo, hi)
    of one expert, columns p of a [M, P] and q of b [M, Q] (bf16, unit column stride), in fp32: the rows walked in
    ascending order BLOCK_ROWS at a time, each tile's products summed by the MMA. Both weight-gradient kernels (the
    LoRA factors' and fake-QAT's full-width one) accumulate through this, so they sum in the same order. colsum
    stays zero without COLSUM."""
    rr = tl.arange(0, BLOCK_ROWS)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    colsum = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_ROWS):
        rows = (r0 + rr).to(tl.int64)
        ok = rows < hi
        a = tl.load(a_ptr + rows[:, None] * stride_am + p[None, :], mask=ok[:, None] & p_ok[None, :], other=0.0)
        b = tl.load(b_ptr + rows[:, None] * stride_bm + q[None, :], mask=ok[:, None] & q_ok[None, :], other=0.0)
        acc = _mma(tl.trans(a), b, acc, F32_DOT)
        if COLSUM:
            colsum += tl.sum(a.to(tl.float32), axis=0)
    return acc, colsum


@triton.jit
def _dot_xwt(a, w, acc, SWAP_AB: tl.constexpr, F32_DOT: tl.constexpr):
    """acc += a [BM, BK] @ w [BN, BK]^T. With SWAP_AB the accumulator is [BN, BM] (acc^T += w @ a^T): at a few
    rows per expert the weight rows then fill the MMA's M side (>= 64 on Hopper) and the tokens its small N side."""
    if SWAP_AB:
        acc = _mma(w, tl.trans(a), acc, F32_DOT)
    else:
        acc = _mma(a, tl.trans(w), acc, F32_DOT)
    return acc


@triton.jit
def _dot_xw(a, w, acc, SWAP_AB: tl.constexpr, F32_DOT: tl.constexpr):
    """acc += a [BM, BR] @ w [BR, BK]; with SWAP_AB acc is [BK, BM] (acc^T += w^T @ a^T)."""
    if SWAP_AB:
        acc = _mma(tl.trans(w), tl.trans(a), acc, F32_DOT)
    else:
        acc = _mma(a, w, acc, F32_DOT)
    return acc


@triton.jit
def _lora_h(lh_ptr, stride_lhm, rows, row_ok, LORA_R: tl.constexpr):
    """[BM, R] rows of the projected activations lh (already scaled) of a LoRA term."""
    r = tl.arange(0, LORA_R)
    return tl.load(lh_ptr + rows[:, None] * stride_lhm + r[None, :], mask=row_ok[:, None], other=0.0)


@triton.jit
def _lora_w(lw_ptr, stride_lwr, stride_lwo, cols, col_ok, LORA_R: tl.constexpr):
    """[R, BC] columns of the up factor lw of a LoRA term."""
    r = tl.arange(0, LORA_R)
    return tl.load(lw_ptr + r[:, None] * stride_lwr + cols[None, :] * stride_lwo, mask=col_ok[None, :], other=0.0)


@triton.jit
def _lora_term(h, w, F32_DOT: tl.constexpr):
    """fp32 [BM, BC] = h @ w, the low-rank term of one output tile, from its operands (_lora_h, _lora_w)."""
    return _mma(h, w, tl.zeros((h.shape[0], w.shape[1]), dtype=tl.float32), F32_DOT)


@triton.jit
def _lora_tile(lh_ptr, stride_lhm, rows, row_ok, lw_ptr, stride_lwr, stride_lwo, cols, col_ok,
               LORA_R: tl.constexpr, F32_DOT: tl.constexpr):
    """fp32 [BM, BC] = lh[rows, :R] @ lw[:R, cols]: the low-rank term of one output tile (lh already scaled)."""
    return _lora_term(_lora_h(lh_ptr, stride_lhm, rows, row_ok, LORA_R),
                      _lora_w(lw_ptr, stride_lwr, stride_lwo, cols, col_ok, LORA_R), F32_DOT)


@triton.jit
def _act_fwd(gate, up, ACT: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr):
    """Gated activation in fp32 (twin of common/grouped_gemm/activations.py)."""
    if ACT == ACT_SILU:
        out = gate * tl.sigmoid(gate) * up
    elif ACT == ACT_SILU_CLAMP:
        # DeepSeek-V4: the clamps, then exactly the silu branch above (LIMIT: the model's swiglu_limit)
        g = tl.minimum(gate, LIMIT)
        u = tl.minimum(tl.maximum(up, -LIMIT), LIMIT)
        out = g * tl.sigmoid(g) * u
    else:
        g = tl.minimum(gate, LIMIT)
        u = tl.minimum(tl.maximum(up, -LIMIT), LIMIT)
        out = (u + 1.0) * g * tl.sigmoid(ALPHA * g)
    return out


@triton.jit
def _act_bwd(gate, up, da, ACT: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr):
    """(d gate, d up) of the gated activation given d out, in fp32 (autograd of activations.py)."""
    if ACT == ACT_SILU:
        sg = tl.sigmoid(gate)
        d_gate = da * up * sg * (1.0 + gate * (1.0 - sg))
        d_up = da * gate * sg
    elif ACT == ACT_SILU_CLAMP:
        # the silu branch's expressions at the clamped values, zero where torch.clamp passes no gradient (outside
        # the closed interval)
        g = tl.minimum(gate, LIMIT)
        u = tl.minimum(tl.maximum(up, -LIMIT), LIMIT)
        sg = tl.sigmoid(g)
        d_gate = tl.where(gate <= LIMIT, da * u * sg * (1.0 + g * (1.0 - sg)), 0.0)
        d_up = tl.where((up >= -LIMIT) & (up <= LIMIT), da * g * sg, 0.0)
    else:
        g = tl.minimum(gate, LIMIT)
        u = tl.minimum(tl.maximum(up, -LIMIT), LIMIT)
        sg = tl.sigmoid(ALPHA * g)
        # torch.clamp passes the gradient on the closed interval [min, max]
        d_gate = tl.where(gate <= LIMIT, da * (u + 1.0) * sg * (1.0 + ALPHA * g * (1.0 - sg)), 0.0)
        d_up = tl.where((up >= -LIMIT) & (up <= LIMIT), da * g * sg, 0.0)
    return d_gate, d_up

"""@triton.jit kernels: MXFP4 and MXFP8 quantization of a [n_blocks, 32] tensor (one row per scale block).

Each program owns BLOCKS consecutive blocks: it loads them as fp32 bits, takes the block absmax as an integer
max of the magnitude bits (NaN bits sort above Inf, so a NaN block is seen as NaN as torch.amax does), derives
the scale byte and the multiplier, encodes the elements and stores codes, scales (and MXFP8 elements).
"""

import triton
import triton.language as tl

from ._elements import _e2m1_magnitude, _e4m3_byte, _load_f32_bits
from ._scale import _quant_multiplier, _scale_byte


@triton.jit
def _block_prologue(x_ptr, pid, n_blocks, IN_KIND: tl.constexpr, BLOCKS: tl.constexpr):
    """Load this program's blocks: (fp32 bits [BLOCKS, 32], first block index (int64), row mask [BLOCKS]).

    The int64 product is formed once per program; per-element offsets stay int32 (cheap, and the
    compiler still sees 16-byte-aligned contiguous rows for vector loads)."""
    first = pid.to(tl.int64) * BLOCKS
    rows = tl.arange(0, BLOCKS)
    row_ok = rows < n_blocks - first
    cols = tl.arange(0, 32)
    xbits = _load_f32_bits(x_ptr + first * 32 + (rows[:, None] * 32 + cols[None, :]), row_ok[:, None], IN_KIND)
    return xbits, first, rows, row_ok


@triton.jit
def _quantize_mxfp4_kernel(x_ptr, codes_ptr, scales_ptr, n_blocks,
                           IN_KIND: tl.constexpr, BLOCKS: tl.constexpr,
                           RULE: tl.constexpr, EMAX: tl.constexpr, RCEIL_THRESHOLD: tl.constexpr,
                           EVEN_ROUND: tl.constexpr, AMAX_FLOOR_BITS: tl.constexpr,
                           CQ_NORMAL_MIN_BITS: tl.constexpr, CQ_ZERO_MAX_BITS: tl.constexpr,
                           INF_SCALE: tl.constexpr, NAN_SCALE: tl.constexpr, CODE0_EXP: tl.constexpr,
                           TIE_AWAY: tl.constexpr, NAN_ELEMENT: tl.constexpr):
    pid = tl.program_id(0)
    xbits, first, rows, row_ok = _block_prologue(x_ptr, pid, n_blocks, IN_KIND, BLOCKS)
    mag_bits = xbits & 0x7FFFFFFF
    amax_bits = tl.max(mag_bits, axis=1).to(tl.int32)
    code = _scale_byte(amax_bits, RULE, EMAX, RCEIL_THRESHOLD, EVEN_ROUND, AMAX_FLOOR_BITS,
                       CQ_NORMAL_MIN_BITS, CQ_ZERO_MAX_BITS, INF_SCALE, NAN_SCALE)
    mult = _quant_multiplier(code, amax_bits, CODE0_EXP)
    a = mag_bits.to(tl.float32, bitcast=True) * mult[:, None]
    if NAN_ELEMENT == 7:
        saturate = 7
    else:
        # A per-block bound instead of a per-element NaN test (see _e2m1_magnitude): same cost as the constant.
        saturate = tl.where(mult == 0.0, NAN_ELEMENT, 7).to(tl.uint32)[:, None]
    nib = _e2m1_magnitude(a, TIE_AWAY, saturate) | ((xbits >> 28) & 0x8)
    # byte j = nibble[2j] | nibble[2j + 1] << 4
    lo, hi = tl.split(tl.reshape(nib, (BLOCKS, 16, 2)))
    packed = (lo | (hi << 4)).to(tl.uint8)
    cols = tl.arange(0, 16)
    tl.store(codes_ptr + first * 16 + rows[:, None] * 16 + cols[None, :], packed, mask=row_ok[:, None])
    tl.store(scales_ptr + first + rows, code.to(tl.uint8), mask=row_ok)


@triton.jit
def _quantize_mxfp8_kernel(x_ptr, elem_ptr, scales_ptr, n_blocks,
                           IN_KIND: tl.constexpr, BLOCKS: tl.constexpr,
                           RULE: tl.constexpr, EMAX: tl.constexpr, RCEIL_THRESHOLD: tl.constexpr,
                           EVEN_ROUND: tl.constexpr, AMAX_FLOOR_BITS: tl.constexpr,
                           CQ_NORMAL_MIN_BITS: tl.constexpr, CQ_ZERO_MAX_BITS: tl.constexpr,
                           INF_SCALE: tl.constexpr, NAN_SCALE: tl.constexpr, CODE0_EXP: tl.constexpr):
    pid = tl.program_id(0)
    xbits, first, rows, row_ok = _block_prologue(x_ptr, pid, n_blocks, IN_KIND, BLOCKS)
    mag_bits = xbits & 0x7FFFFFFF
    amax_bits = tl.max(mag_bits, axis=1).to(tl.int32)
    code = _scale_byte(amax_bits, RULE, EMAX, RCEIL_THRESHOLD, EVEN_ROUND, AMAX_FLOOR_BITS,
                       CQ_NORMAL_MIN_BITS, CQ_ZERO_MAX_BITS, INF_SCALE, NAN_SCALE)
    mult = _quant_multiplier(code, amax_bits, CODE0_EXP)
    a = mag_bits.to(tl.float32, bitcast=True) * mult[:, None]
    elems = _e4m3_byte(a, xbits).to(tl.uint8)
    cols = tl.arange(0, 32)
    tl.store(elem_ptr + first * 32 + rows[:, None] * 32 + cols[None, :], elems, mask=row_ok[:, None])
    tl.store(scales_ptr + first + rows, code.to(tl.uint8), mask=row_ok)

"""@triton.jit helpers for E8M0 block scales, on fp32 bit patterns (twin of common/scale.py).

All of it is integer arithmetic: no float log2, no division, no subnormal float constants, so the bytes do
not depend on the GPU's division precision or on flush-to-zero.
"""

import triton
import triton.language as tl

# Scale rules as kernel constants (common.profiles.ScaleRule, mapped in common/kernels/params.py).
RULE_RCEIL = tl.constexpr(0)
RULE_FLOOR = tl.constexpr(1)
RULE_EVEN = tl.constexpr(2)
RULE_CEIL_QUOTIENT = tl.constexpr(3)


@triton.jit
def _scale_byte(amax_bits, RULE: tl.constexpr, EMAX: tl.constexpr, RCEIL_THRESHOLD: tl.constexpr,
                EVEN_ROUND: tl.constexpr, AMAX_FLOOR_BITS: tl.constexpr, CQ_NORMAL_MIN_BITS: tl.constexpr,
                CQ_ZERO_MAX_BITS: tl.constexpr, INF_SCALE: tl.constexpr, NAN_SCALE: tl.constexpr):
    """Scale byte (int32 0..255) per block from the int32 bits of the block absmax (NaN bits > Inf bits)."""
    a = amax_bits
    if AMAX_FLOOR_BITS > 0:
        # Integer max on non-negative fp32 bits is the float max, and keeps NaN (its bits are the largest).
        a = tl.maximum(a, AMAX_FLOOR_BITS)
    exp = (a >> 23) & 0xFF
    if RULE == RULE_FLOOR:
        code = exp - EMAX
    elif RULE == RULE_EVEN:
        code = (((a + EVEN_ROUND) >> 23) & 0xFF) - EMAX
    else:
        code = exp - EMAX + ((a & 0x7FFFFF) > RCEIL_THRESHOLD).to(tl.int32)
        if RULE == RULE_CEIL_QUOTIENT:
            # next_pow2(fl(a / max)) equals RCEIL wherever the quotient is normal: no fp32 value lies in
            # (max * 2^k, max * 2^k * (1 + 2^-24)], the only place where rounding the quotient could move it
            # onto a power of two. A subnormal quotient rounds up to byte 1 unless it rounds to zero, which
            # happens for a <= (max / 2) * 2^-149 (the tie at equality goes to the even zero). Checked against
            # IEEE division on every finite fp32 value (tests/common/test_kernels.py samples it).
            code = tl.where(a < CQ_NORMAL_MIN_BITS, (a > CQ_ZERO_MAX_BITS).to(tl.int32), code)
    code = tl.minimum(tl.maximum(code, 0), 254)
    code = tl.where(amax_bits == 0x7F800000, INF_SCALE, code)
    code = tl.where(amax_bits > 0x7F800000, NAN_SCALE, code)
    return code


@triton.jit
def _pow2(e):
    """2^e as fp32 for int32 e in [-127, 127], built from bits (2^-127 is the subnormal 0x00400000)."""
    bits = tl.where(e >= -126, (e + 127) << 23, 0x00400000)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _quant_multiplier(code, amax_bits, CODE0_EXP: tl.constexpr):
    """fp32 factor 2^(127 - min(code, 254)) per block; code 0 uses 2^CODE0_EXP (CODE0_EXP < 0: factor 0).

    A NaN block (amax NaN) gets 0, so its finite elements become signed zeros and its NaN/Inf elements NaN,
    as in common.reference._block_scales.
    """
    if CODE0_EXP >= 0:
        e = tl.where(code == 0, CODE0_EXP, 127 - tl.minimum(code, 254))
        mult = _pow2(e)
    else:
        mult = tl.where(code == 0, 0.0, _pow2(127 - tl.minimum(code, 254)))
    return tl.where(amax_bits > 0x7F800000, 0.0, mult)


@triton.jit
def _scale_value(code):
    """fp32 value 2^(code - 127) of a scale byte (int32); byte 255 gives NaN."""
    e = tl.minimum(code, 254) - 127
    bits = tl.where(e >= -126, (e + 127) << 23, 0x00400000)
    bits = tl.where(code == 255, 0x7FC00000, bits)
    return bits.to(tl.float32, bitcast=True)

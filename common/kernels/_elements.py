"""@triton.jit helpers for elements: loading fp32 bits, E2M1 / E4M3 encoding (twin of common/e2m1.py and
torch's fp32 -> float8_e4m3fn cast), and E2M1 decoding.

Rounding is done on the fp32 bits with integer adds (round half to even = add 0x..FFF plus the lowest kept
bit), or, below the element format's smallest normal, by adding a power of two whose ulp is the element
spacing (an exact IEEE add, round half to even). Both are exact, so the kernels match the reference's
midpoint comparisons bit for bit.
"""

import triton
import triton.language as tl

IN_FP32 = tl.constexpr(0)
IN_BF16 = tl.constexpr(1)
IN_FP16 = tl.constexpr(2)


@triton.jit
def _load_f32_bits(ptrs, mask, IN_KIND: tl.constexpr):
    """uint32 fp32 bit patterns of the elements. bf16 and fp16 arrive as int16 bits; bf16 is widened by a shift
    (exact, subnormals included, and independent of how the interpreter converts bf16)."""
    if IN_KIND == IN_BF16:
        raw = tl.load(ptrs, mask=mask, other=0)
        bits = raw.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
    elif IN_KIND == IN_FP16:
        raw = tl.load(ptrs, mask=mask, other=0)  # fp16 viewed as int16
        half = raw.to(tl.uint16, bitcast=True).to(tl.uint32)
        widened = raw.to(tl.float16, bitcast=True).to(tl.float32).to(tl.uint32, bitcast=True)
        # The GPU's fp16 -> fp32 conversion returns a positive canonical NaN; keep the element's own sign.
        bits = (widened & 0x7FFFFFFF) | ((half & 0x8000) << 16)
    else:
        bits = tl.load(ptrs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    return bits


@triton.jit
def _e2m1_magnitude(a, TIE_AWAY: tl.constexpr, saturate):
    """E2M1 magnitude code (uint32 0..7) of fp32 a >= 0 (or NaN): values >= 1 take min(code, saturate).

    saturate is 7 (6.0), or the profile's NaN element in blocks whose multiplier is 0: there every finite
    element is 0 (below 1) and every NaN/Inf element is NaN, whose bits give a code above 7."""
    ab = a.to(tl.uint32, bitcast=True)
    if TIE_AWAY:
        big = (ab - (0x3F000000 - 0x200000)) >> 22
        small = (a >= 0.25).to(tl.uint32) + (a >= 0.75).to(tl.uint32)
    else:
        # [1, inf): keep one mantissa bit (add 0x1FFFFF + lowest kept bit); the kept (exponent, mantissa bit)
        # minus 252 is the code (1.0 -> 2, 6.0 -> 7), folded into the add: 252 << 22 = 0x3F000000.
        big = (ab - (0x3F000000 - 0x1FFFFF) + ((ab >> 22) & 1)) >> 22
        # [0, 1): spacing 0.5 = ulp of 2^22, so the add rounds a onto {0, .5, 1} half to even. If the compiler
        # fuses the multiply that made `a` into this add (FMA), the result is the same: the product is exact
        # unless it underflows below 2^-126, and then both ways give 2^22 (code 0).
        small = (a + 4194304.0).to(tl.uint32, bitcast=True) - 0x4A800000
    # uint32 arithmetic: for |a| >= 1 (all that is selected) nothing wraps; Inf/NaN bits give 258 > 7.
    return tl.where(ab < 0x3F800000, small, tl.minimum(big, saturate))


@triton.jit
def _e4m3_byte(a, xbits):
    """float8_e4m3fn byte of fp32 a = |x| * multiplier (>= 0 or NaN), saturated at 448, with x's sign bit."""
    ab = a.to(tl.uint32, bitcast=True)
    is_nan = ab > 0x7F800000
    sat = tl.minimum(ab, 0x43E00000)  # 448 = largest finite E4M3 (clamp before the cast, as the reference)
    normal = ((sat + 0x7FFFF + ((sat >> 20) & 1)) >> 20) - 960  # keep 3 mantissa bits; rebias 127 -> 7
    # Below 2^-6 (E4M3's smallest normal) the spacing is 2^-9 = ulp of 2^14.
    sub = (a + 16384.0).to(tl.uint32, bitcast=True) - 0x46800000
    byte = tl.where(sat < 0x3C800000, sub, normal)
    byte = tl.where(is_nan, 0x7F, byte)
    return byte | ((xbits >> 24) & 0x80)


@triton.jit
def _e2m1_bits(nib):
    """fp32 bits (uint32) of E2M1 nibbles: magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6 with the sign bit."""
    m = nib & 7
    # m >= 2: exponent/mantissa pair (m + 252) << 22 (1.0 = 254 << 22); m == 1: 0.5; m == 0: +0.
    mag = tl.where(m >= 2, (m + 252) << 22, m * 0x3F000000)
    return mag | ((nib & 8) << 28)

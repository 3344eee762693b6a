"""Numeric constants of the MX formats (OCP Microscaling Formats v1.0, sections 5 and 6)."""

BLOCK_SIZE = 32  # elements that share one E8M0 scale (OCP MX v1.0 section 5.1)

# fp32 bit fields
F32_MANT_BITS = 23
F32_EXP_MASK = 0xFF
F32_MANT_MASK = 0x7FFFFF

# E8M0 scale byte: 2^(code - 127); 0xFF is NaN (OCP MX v1.0 section 5.4.1)
E8M0_BIAS = 127
E8M0_NAN = 0xFF
E8M0_MAX_FINITE = 0xFE  # 2^127

# E2M1 element: 1 sign, 2 exponent, 1 mantissa bit; magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6
E2M1_MAX = 6.0
E2M1_EMAX = 2  # exponent of the largest normal, 6 = 1.5 * 2^2
E2M1_SIGN = 0x8
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Rounding boundaries between consecutive magnitudes (midpoints of E2M1_VALUES).
E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
# Under round-half-to-even a midpoint goes up exactly when the upper neighbour has an even mantissa
# (codes 2, 4, 6: values 1, 2, 4); the others go down (to 0, 1, 2, 4 -> codes 0, 2, 4, 6).
E2M1_MIDPOINT_ROUNDS_UP_RNE = (False, True, False, True, False, True, False)

# E4M3 (fn variant, no Inf) element of MXFP8: largest normal 448 = 1.75 * 2^8
E4M3_MAX = 448.0
E4M3_EMAX = 8

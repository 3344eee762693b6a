"""E8M0 block scales: from block absmax to scale byte (per profile), and from scale byte to fp32 factors.

Everything is integer arithmetic on fp32 bit patterns, never float log2 (which misrounds near powers of two:
torchao's float-log2 RCEIL is off for fp32 blocks just above 6 * 2^k) and never torch's fp32 -> e8m0 cast
(which rounds to nearest).
"""

from __future__ import annotations

import torch

from . import constants as C
from .formats import ElementFormat
from .profiles import Profile, ScaleRule


def _fields(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    bits = x.contiguous().view(torch.int32)
    return (bits >> C.F32_MANT_BITS) & C.F32_EXP_MASK, bits & C.F32_MANT_MASK


def scale_codes(amax: torch.Tensor, profile: Profile, fmt: ElementFormat) -> torch.Tensor:
    """Scale byte (uint8) per block from the fp32 block absmax (non-negative; may hold Inf/NaN).

    Inf blocks get profile.inf_scale and NaN blocks profile.nan_scale; callers that refuse non-finite input
    check before calling this.
    """
    if amax.dtype != torch.float32:
        raise TypeError(f"amax must be float32, got {amax.dtype}")
    a = amax
    if profile.amax_floor is not None:
        a = torch.clamp_min(a, profile.amax_floor)  # clamp_min keeps NaN
    rule = profile.scale_rule
    if rule is ScaleRule.RCEIL:
        exp, mant = _fields(a)
        code = exp - fmt.emax + (mant > fmt.rceil_threshold).to(torch.int32)
    elif rule is ScaleRule.FLOOR:
        exp, _ = _fields(a)
        code = exp - fmt.emax
    elif rule is ScaleRule.EVEN:
        bits = a.contiguous().view(torch.int32)
        rounded = (bits + (1 << (C.F32_MANT_BITS - fmt.mbits - 1))) >> C.F32_MANT_BITS
        code = (rounded & C.F32_EXP_MASK) - fmt.emax
    elif rule is ScaleRule.CEIL_QUOTIENT:
        q = torch.div(a, fmt.max_value)  # IEEE division, round to nearest even
        bits = q.contiguous().view(torch.int32)
        code = ((bits + C.F32_MANT_MASK) >> C.F32_MANT_BITS) & C.F32_EXP_MASK
    else:  # pragma: no cover - ScaleRule is closed
        raise AssertionError(rule)
    code = torch.clamp(code, 0, C.E8M0_MAX_FINITE)
    code = torch.where(torch.isinf(amax), profile.inf_scale, code)
    code = torch.where(torch.isnan(amax), profile.nan_scale, code)
    return code.to(torch.uint8)


def pow2_f32(exponent: torch.Tensor) -> torch.Tensor:
    """2^e as fp32 for integer e in [-127, 127], exact (2^-127 is the subnormal 0x00400000)."""
    e = exponent.to(torch.int32)
    bits = torch.where(e >= -126, (e + 127) << C.F32_MANT_BITS, torch.full_like(e, 0x00400000))
    return bits.view(torch.float32)


def quant_multipliers(codes: torch.Tensor, profile: Profile) -> torch.Tensor:
    """fp32 factor that maps a block's elements onto the element grid: 2^(127 - min(code, 254)), with the
    profile's code-0 rule (2^code0_exponent, or 0 when the profile zeroes code-0 blocks)."""
    c = codes.to(torch.int32)
    code0 = 0 if profile.code0_exponent is None else profile.code0_exponent
    e = torch.where(c == 0, code0, C.E8M0_BIAS - torch.clamp(c, max=C.E8M0_MAX_FINITE))
    m = pow2_f32(e)
    if profile.code0_exponent is None:
        m = torch.where(c == 0, 0.0, m)
    return m


def scale_values(codes: torch.Tensor) -> torch.Tensor:
    """The fp32 value 2^(code - 127) of each scale byte; 0xFF gives NaN."""
    c = codes.to(torch.int32)
    v = pow2_f32(torch.clamp(c, max=C.E8M0_MAX_FINITE) - C.E8M0_BIAS)
    return torch.where(c == C.E8M0_NAN, torch.nan, v)

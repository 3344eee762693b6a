"""Pure-torch reference codec (any device). The oracle that the Triton kernels must match byte for byte."""

from __future__ import annotations

import torch

from . import constants as C
from . import e2m1
from .errors import DTypeError, NonFiniteError, ShapeError, describe
from .formats import E2M1, E4M3, ElementFormat
from .profiles import Profile, TieRule
from .scale import quant_multipliers, scale_codes, scale_values

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NONFINITE_MODES = ("raise", "profile")


def check_input(x: torch.Tensor, name: str | None) -> None:
    what = describe(name)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise DTypeError(f"{what}: expected dtype float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] % C.BLOCK_SIZE != 0:
        raise ShapeError(
            f"{what}: the last (K) dimension must be a multiple of {C.BLOCK_SIZE}, got shape {tuple(x.shape)}"
        )


def check_finite(x: torch.Tensor, name: str | None) -> None:
    """Raise NonFiniteError naming the first block (index over the leading dims, block along K) with NaN/Inf."""
    finite = torch.isfinite(x)
    if bool(finite.all()):
        return
    bad = (~finite).reshape(*x.shape[:-1], x.shape[-1] // C.BLOCK_SIZE, C.BLOCK_SIZE).any(-1)
    first = tuple(int(i) for i in bad.nonzero()[0])
    count = int(bad.sum())
    raise NonFiniteError(
        f"{describe(name)}: {count} block(s) of {C.BLOCK_SIZE} hold NaN or Inf; the first is at index "
        f"{first[:-1]} block {first[-1]} (elements {first[-1] * C.BLOCK_SIZE}..{first[-1] * C.BLOCK_SIZE + 31}). "
        f"Pass nonfinite='profile' to apply the profile's documented NaN/Inf rule instead."
    )


def _blocks_f32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).reshape(*x.shape[:-1], x.shape[-1] // C.BLOCK_SIZE, C.BLOCK_SIZE)


def check_quantizer_input(x: torch.Tensor, name: str | None, nonfinite: str) -> None:
    """The checks every quantizer (reference or kernel) runs first: dtype, K % 32, the non-finite policy."""
    check_input(x, name)
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
    if nonfinite == "raise":
        check_finite(x, name)


def validated_blocks(x: torch.Tensor, name: str | None, nonfinite: str) -> torch.Tensor:
    """check_quantizer_input, then x as fp32 [..., K/32, 32]."""
    check_quantizer_input(x, name, nonfinite)
    return _blocks_f32(x)


def _block_scales(xb: torch.Tensor, profile: Profile, fmt: ElementFormat) -> tuple[torch.Tensor, torch.Tensor]:
    # torch.amax propagates NaN, which scale_codes maps to the profile's NaN byte.
    amax = xb.abs().amax(dim=-1) if xb.numel() else xb.new_zeros(xb.shape[:-1])
    codes = scale_codes(amax, profile, fmt)
    # A NaN block's finite elements become +-0 (x * 0); its NaN elements stay NaN for the element encoder.
    mult = torch.where(torch.isnan(amax), 0.0, quant_multipliers(codes, profile))
    return codes, mult


def quantize_mxfp4(x: torch.Tensor, profile: Profile, *, name: str | None = None,
                   nonfinite: str = "raise") -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., N, K] float -> (codes uint8 [..., N, K/2], scales uint8 [..., N, K/32])."""
    xb = validated_blocks(x, name, nonfinite)
    scales, mult = _block_scales(xb, profile, E2M1)
    # copysign: a NaN product (NaN element, or Inf * 0) carries no reliable sign; the element's own sign is kept.
    y = torch.copysign(xb * mult.unsqueeze(-1), xb)
    nibbles = e2m1.encode(y, profile.tie_rule, profile.nan_element)
    codes = e2m1.pack(nibbles.reshape(*x.shape[:-1], x.shape[-1]))
    return codes, scales


def check_scales_not_nan(scales: torch.Tensor, name: str | None) -> None:
    bad = scales == C.E8M0_NAN
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise NonFiniteError(f"{describe(name)}: scale byte 0xFF (NaN) at index {idx}; MXFP4 data must not hold NaN scales")


def dequantize_mxfp4(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16, *,
                     name: str | None = None, allow_nan_scale: bool = False) -> torch.Tensor:
    """Exact: E2M1 value * 2^(scale - 127) in fp32, then cast to dtype. Scale byte 0xFF raises; a value beyond
    dtype becomes +-Inf by the cast, never a saturated one (docs/codec.md, "Non-finite results")."""
    if not allow_nan_scale:
        check_scales_not_nan(scales, name)
    values = e2m1.decode(e2m1.unpack(codes))
    values = values.reshape(*scales.shape, C.BLOCK_SIZE) * scale_values(scales).unsqueeze(-1)
    return values.reshape(*codes.shape[:-1], codes.shape[-1] * 2).to(dtype)


def quantize_mxfp8(x: torch.Tensor, profile: Profile, *, name: str | None = None,
                   nonfinite: str = "raise") -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] float -> (elements float8_e4m3fn [..., K], scales uint8 [..., K/32]).

    Elements are x * 2^(127 - code) in fp32, clamped to +-448 and rounded half to even (torch's cast), so
    finite values saturate as `cvt.rn.satfinite.e4m3x2` does.
    """
    if profile.tie_rule is not TieRule.EVEN:
        raise ValueError(f"profile {profile.name!r}: MXFP8 supports only round-half-to-even elements")
    xb = validated_blocks(x, name, nonfinite)
    scales, mult = _block_scales(xb, profile, E4M3)
    # clamp keeps NaN; copysign pins a NaN product's sign to the element's own (it is platform-dependent otherwise)
    y = torch.copysign(torch.clamp(xb * mult.unsqueeze(-1), -C.E4M3_MAX, C.E4M3_MAX), xb)
    return y.to(torch.float8_e4m3fn).reshape(x.shape), scales


def dequantize_mxfp8(elements: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16, *,
                     name: str | None = None, allow_nan_scale: bool = False) -> torch.Tensor:
    """Exact: E4M3 value * 2^(scale - 127) in fp32, then cast to dtype. Scale byte 0xFF raises, as for MXFP4; a
    value beyond dtype becomes +-Inf by the cast, as for MXFP4 (docs/codec.md, "Non-finite results")."""
    if elements.dtype != torch.float8_e4m3fn:
        raise DTypeError(f"{describe(name)}: MXFP8 elements must be float8_e4m3fn, got {elements.dtype}")
    if not allow_nan_scale:
        check_scales_not_nan(scales, name)
    xb = _blocks_f32(elements)
    return (xb * scale_values(scales).unsqueeze(-1)).reshape(elements.shape).to(dtype)

"""Public codec entry points: quantize / dequantize / fake_quant for MXFP4, and the MXFP8 activation quantizer.

`backend="auto"` runs the Triton kernels on CUDA tensors and the pure-torch reference elsewhere; both give the
same bytes (tests/common/test_kernels.py). The profile has no default here on purpose: callers pass the one
recorded in the checkpoint or the engine's config.
"""

from __future__ import annotations

import torch

from . import reference
from .profiles import Profile, get_profile
from .tensor import MXFP4Tensor, check_packed

BACKENDS = ("auto", "torch", "triton")


def _use_triton(backend: str, t: torch.Tensor) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"unknown codec backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return t.is_cuda
    return backend == "triton"


def quantize(x: torch.Tensor, *, profile: str | Profile, name: str | None = None, nonfinite: str = "raise",
             backend: str = "auto") -> MXFP4Tensor:
    """Quantize x [..., N, K] (K a multiple of 32) along K to MXFP4.

    nonfinite="raise" (default) refuses NaN/Inf naming the tensor and the first bad block;
    nonfinite="profile" applies the profile's documented NaN/Inf rule.
    """
    prof = get_profile(profile)
    # Checked here once for both backends, so the kernels see only inputs the reference accepts.
    reference.check_quantizer_input(x, name, nonfinite)
    if _use_triton(backend, x):
        from .kernels import quantize_mxfp4_triton

        codes, scales = quantize_mxfp4_triton(x, prof)
    else:
        codes, scales = reference.quantize_mxfp4(x, prof, name=name, nonfinite="profile")
    return MXFP4Tensor(codes, scales, prof.name)


def dequantize(q: MXFP4Tensor | tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype = torch.bfloat16, *,
               name: str | None = None, backend: str = "auto") -> torch.Tensor:
    """Exact dequantization (E2M1 value * 2^(scale-127) in fp32, cast to dtype). Scale byte 0xFF raises."""
    codes, scales = (q.codes, q.scales) if isinstance(q, MXFP4Tensor) else q
    check_packed(codes, scales, name)
    if _use_triton(backend, codes):
        from .kernels import dequantize_mxfp4_triton

        reference.check_scales_not_nan(scales, name)
        return dequantize_mxfp4_triton(codes, scales, dtype)
    return reference.dequantize_mxfp4(codes, scales, dtype, name=name)


def fake_quant(x: torch.Tensor, *, profile: str | Profile, name: str | None = None, nonfinite: str = "raise",
               backend: str = "auto") -> torch.Tensor:
    """dequantize(quantize(x)) in x's dtype: what the engine computes with after the next sync.

    The result is exact in fp32, then cast: a value x's dtype cannot hold becomes +-Inf, never a saturated value
    (fp16 60000 under flashinfer / even: scale 2^14, element 4, 65536 -> inf), the same on both backends and for
    fake_quant_mxfp8 (docs/codec.md, "Non-finite results")."""
    q = quantize(x, profile=profile, name=name, nonfinite=nonfinite, backend=backend)
    return dequantize(q, dtype=x.dtype, name=name, backend=backend)


def quantize_mxfp8(x: torch.Tensor, *, profile: str | Profile, name: str | None = None, nonfinite: str = "raise",
                   backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP8 (E4M3 elements, E8M0 block-32 scales) along the last axis: (float8_e4m3fn [..., K], uint8 [..., K/32])."""
    prof = get_profile(profile)
    # Checked here once for both backends, so the kernels see only inputs the reference accepts.
    reference.check_quantizer_input(x, name, nonfinite)
    if _use_triton(backend, x):
        from .kernels import quantize_mxfp8_triton

        return quantize_mxfp8_triton(x, prof)
    return reference.quantize_mxfp8(x, prof, name=name, nonfinite="profile")


def dequantize_mxfp8(elements: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16, *,
                     name: str | None = None) -> torch.Tensor:
    """Exact (E4M3 value * 2^(scale-127) in fp32, cast to dtype). Scale byte 0xFF raises, as dequantize does."""
    return reference.dequantize_mxfp8(elements, scales, dtype, name=name)


def fake_quant_mxfp8(x: torch.Tensor, *, profile: str | Profile, name: str | None = None, nonfinite: str = "raise",
                     backend: str = "auto") -> torch.Tensor:
    """dequantize(quantize_mxfp8(x)) in x's dtype: the activations a W4A8 engine feeds its experts (overflow of x's
    dtype as in fake_quant). With nonfinite="profile" a NaN block keeps the profile's NaN result."""
    e, s = quantize_mxfp8(x, profile=profile, name=name, nonfinite=nonfinite, backend=backend)
    return reference.dequantize_mxfp8(e, s, x.dtype, name=name, allow_nan_scale=nonfinite == "profile")

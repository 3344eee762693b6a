"""Canonical bytes <-> torch's MX dtypes: float4_e2m1fn_x2 for packed codes, float8_e8m0fnu for scales.

torch packs two E2M1 values per float4_e2m1fn_x2 byte with the first (even) element in the low nibble (c10
Float4_e2m1fn_x2.h; torch.testing._internal.common_quantized.pack_uint4 computes `x[1::2] << 4 | x[::2]`), the
same order as our canonical codes, so both directions are zero-copy `.view`s. Never `.to()` between these dtypes
and uint8: that converts values (float8_e8m0fnu 1.0 -> uint8 1) instead of reinterpreting bytes.
"""

from __future__ import annotations

import torch

from ..tensor import MXFP4Tensor
from ._checks import expect_dtype


def codes_as_float4(codes: torch.Tensor) -> torch.Tensor:
    expect_dtype(codes, torch.uint8, "codes")
    return codes.view(torch.float4_e2m1fn_x2)


def float4_as_codes(x: torch.Tensor) -> torch.Tensor:
    expect_dtype(x, torch.float4_e2m1fn_x2, "float4 codes")
    return x.view(torch.uint8)


def scales_as_e8m0(scales: torch.Tensor) -> torch.Tensor:
    expect_dtype(scales, torch.uint8, "scales")
    return scales.view(torch.float8_e8m0fnu)


def e8m0_as_scales(x: torch.Tensor) -> torch.Tensor:
    expect_dtype(x, torch.float8_e8m0fnu, "e8m0 scales")
    return x.view(torch.uint8)


def to_torch_views(q: MXFP4Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float4_e2m1fn_x2 [..., N, K/2], float8_e8m0fnu [..., N, K/32]) sharing q's storage."""
    return codes_as_float4(q.codes), scales_as_e8m0(q.scales)


def from_torch_views(codes: torch.Tensor, scales: torch.Tensor, profile: str) -> MXFP4Tensor:
    return MXFP4Tensor(float4_as_codes(codes), e8m0_as_scales(scales), profile)

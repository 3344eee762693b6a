"""Canonical <-> DeepSeek-V4 MXFP4 expert layout.

DeepSeek-V4 stores each routed expert's `w1/w2/w3.weight` as int8 [out, in/2] (the same packed bytes as our
canonical codes) and `.scale` as float8_e8m0fnu [out, in/32] (the same E8M0 bytes). Both conversions are
reinterpretations with `.view`: never `.to()` / `copy_()` across these dtypes, which would convert numerically
(an E8M0 byte 0x7F is the value 1.0, and would become uint8 1).
"""

from __future__ import annotations

import torch

from ..moe.params import DEEPSEEK_V4_PROJ_NAMES
from ..tensor import MXFP4Tensor
from ._checks import expect_dtype, expect_shape

# DeepSeek-V4 projection names -> our names: w1 = gate, w3 = up, w2 = down (SwiGLU: w2(silu(w1 x) * w3 x)).
PROJ_NAMES = {v: k for k, v in DEEPSEEK_V4_PROJ_NAMES.items()}


def to_deepseek_v4(q: MXFP4Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical [..., out, in] -> (weight int8 [..., out, in/2], scale float8_e8m0fnu [..., out, in/32])."""
    return q.codes.view(torch.int8), q.scales.view(torch.float8_e8m0fnu)


def from_deepseek_v4(weight: torch.Tensor, scale: torch.Tensor, profile: str, name: str = "weight") -> MXFP4Tensor:
    """Inverse of to_deepseek_v4 (views, no copy)."""
    expect_dtype(weight, torch.int8, name)
    expect_dtype(scale, torch.float8_e8m0fnu, f"{name} scale")
    expect_shape(scale, (*weight.shape[:-1], weight.shape[-1] // 16), f"{name} scale")
    return MXFP4Tensor(weight.view(torch.uint8), scale.view(torch.uint8), profile)

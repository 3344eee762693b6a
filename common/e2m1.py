"""E2M1 elements: rounding fp32 values onto the grid (0, .5, 1, 1.5, 2, 3, 4, 6) and nibble packing."""

from __future__ import annotations

import torch

from . import constants as C
from .profiles import TieRule

_DECODE = torch.tensor([v for v in C.E2M1_VALUES] + [-v for v in C.E2M1_VALUES], dtype=torch.float32)


def encode(y: torch.Tensor, tie_rule: TieRule, nan_element: int = 0x7) -> torch.Tensor:
    """Nibble (uint8, 0..15) of each fp32 value already scaled onto the grid; saturates at +-6.

    The magnitude code is the number of midpoints below |y|: a midpoint counts when |y| is above it, or at
    it when the tie goes up (always for TieRule.AWAY; for TieRule.EVEN where the upper neighbour's mantissa is
    even). Comparisons are exact in fp32, so this is the IEEE rounding with no arithmetic error. The sign bit
    is kept, also for values that round to zero (-0 and -0.1 give 0x8).
    """
    if y.dtype != torch.float32:
        raise TypeError(f"encode expects float32, got {y.dtype}")
    a = y.abs()
    code = torch.zeros(y.shape, dtype=torch.uint8, device=y.device)
    for midpoint, up_rne in zip(C.E2M1_MIDPOINTS, C.E2M1_MIDPOINT_ROUNDS_UP_RNE):
        up = tie_rule is TieRule.AWAY or up_rne
        code += (a >= midpoint) if up else (a > midpoint)
    code = torch.where(torch.isnan(y), nan_element, code)
    sign = (y.view(torch.int32) < 0).to(torch.uint8) << 3
    return code | sign


def decode(nibbles: torch.Tensor) -> torch.Tensor:
    """fp32 value of each nibble (uint8, 0..15)."""
    return _DECODE.to(nibbles.device)[nibbles.long()]


def pack(nibbles: torch.Tensor) -> torch.Tensor:
    """[..., K] nibbles -> [..., K/2] bytes; byte j = nibble[2j] | nibble[2j+1] << 4."""
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack(codes: torch.Tensor) -> torch.Tensor:
    """[..., K/2] bytes -> [..., K] nibbles (inverse of pack)."""
    return torch.stack((codes & 0xF, codes >> 4), dim=-1).flatten(-2)

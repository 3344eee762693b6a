"""The interleaved column order of the word-decode GEMMs (common/grouped_gemm/_tiles.py, `_dequant_words`).

A dot product may reduce over K in any order. The forward GEMMs decode each 32-bit code word (8 E2M1 nibbles)
straight into the registers Hopper's wgmma reads as its A operand; that fixes which stored element feeds which
reduction slot: within every 32-element block (one scale block), slot c = 8i + 2t + h takes stored element
p = 8t + i + 4h (word t, nibble i + 4h). The activations must follow the same order, so the kernels read them
interleaved: `interleave_k(x)[:, c] = x[:, p]`. The gated GEMM can write its output in this order directly
(`out_interleaved`), so inside the MoE layer only the layer input is interleaved on the host.
"""

from __future__ import annotations

import torch

from ..errors import ShapeError

BLOCK = 32


def _check(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2 or x.shape[1] % BLOCK:
        raise ShapeError(f"tensor '{name}': expected [M, K] with K a multiple of {BLOCK}, got {tuple(x.shape)}")


def interleave_k(x: torch.Tensor) -> torch.Tensor:
    """[M, K] -> [M, K] with column 32b + 8i + 2t + h = x[:, 32b + 8t + i + 4h] (a contiguous copy)."""
    _check(x, "x")
    m, k = x.shape
    # x viewed as [M, blocks, t, h, i] -> order (i, t, h)
    return x.reshape(m, k // BLOCK, 4, 2, 4).permute(0, 1, 4, 2, 3).reshape(m, k)


def deinterleave_k(x: torch.Tensor) -> torch.Tensor:
    """The inverse of interleave_k."""
    _check(x, "x")
    m, k = x.shape
    return x.reshape(m, k // BLOCK, 4, 4, 2).permute(0, 1, 3, 4, 2).reshape(m, k)

"""The interleaved column order of the word-decode GEMMs (common/grouped_gemm/_tiles.py, `_dequant_words`).

A dot product may reduce over K in any order. The forward GEMMs decode each 32-bit code word (8 E2M1 nibbles)
straight into the registers Hopper's wgmma reads as its A operand; that fixes which stored element feeds which
reduction slot: within every 32-element block (one scale block), slot c = 8i + 2t + h takes stored element
p = 8t + i + 4h (word t, nibble i + 4h). The activations must follow the same order, so the kernels read them
interleaved: `interleave_k(x)[:, c] = x[:, p]`. The gated GEMM can write its output in this order directly
(`out_order`), so inside the MoE layer only the layer input is reordered on the host.

Kb-major codes (layout.py) store each block's elements already permuted (word t, slot i + 4h holds element
8i + 2t + h), so the word decode, the only one that reads them, reduces them in the natural order. Which order a
GEMM reads is `ORDERS[...]`, picked by ops.reduction_order from the decode and the code layout; "deinterleaved"
(the inverse permutation) remains for callers that hold data in it.
"""

from __future__ import annotations

import torch

from ..errors import ShapeError

BLOCK = 32
# the column orders a forward GEMM may read its x in (and the gated GEMM may write its output in)
ORDERS = ("natural", "interleaved", "deinterleaved")


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


def check_order(order: str, name: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"{name} must be one of {ORDERS}, got {order!r}")


def reorder_k(x: torch.Tensor, src: str, dst: str) -> torch.Tensor:
    """x given in column order src -> the same values in order dst (x itself when they agree)."""
    check_order(src, "src")
    check_order(dst, "dst")
    if src == dst:
        return x
    to_natural = {"natural": lambda t: t, "interleaved": deinterleave_k, "deinterleaved": interleave_k}
    from_natural = {"natural": lambda t: t, "interleaved": interleave_k, "deinterleaved": deinterleave_k}
    return from_natural[dst](to_natural[src](x))

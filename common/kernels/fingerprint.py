"""The audit fingerprint's lanes (common.fingerprint) in one pass over the words: each program mixes a block of words
with their positions and writes its two partial sums; the partial sums are added on the device (order-free modular
sums, so the value equals the torch loop's)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..fingerprint import LANES
from .launch import interpreting

_BLOCK = 4096


@triton.jit
def _mix(w, idx, a: tl.constexpr, b: tl.constexpr, m1: tl.constexpr, m2: tl.constexpr):
    x = (idx * a + b) ^ w
    x = x * m1
    # logical right shift by 32 of the 64-bit pattern
    x = x ^ ((x.to(tl.uint64, bitcast=True) >> 32).to(tl.int64, bitcast=True))
    return x * m2


@triton.jit
def _lanes_kernel(words_ptr, out_ptr, n, A0: tl.constexpr, B0: tl.constexpr, M10: tl.constexpr, M20: tl.constexpr,
                  A1: tl.constexpr, B1: tl.constexpr, M11: tl.constexpr, M21: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < n
    w = tl.load(words_ptr + idx, mask=mask, other=0)
    x0 = tl.where(mask, _mix(w, idx, A0, B0, M10, M20), 0)
    x1 = tl.where(mask, _mix(w, idx, A1, B1, M11, M21), 0)
    tl.store(out_ptr + 2 * pid, tl.sum(x0, axis=0))
    tl.store(out_ptr + 2 * pid + 1, tl.sum(x1, axis=0))


@triton.jit
def _moves_kernel(pos_ptr, old_ptr, new_ptr, out_ptr, n, A0: tl.constexpr, B0: tl.constexpr, M10: tl.constexpr,
                  M20: tl.constexpr, A1: tl.constexpr, B1: tl.constexpr, M11: tl.constexpr, M21: tl.constexpr,
                  BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = i < n
    idx = tl.load(pos_ptr + i, mask=mask, other=0)
    old = tl.load(old_ptr + i, mask=mask, other=0)
    new = tl.load(new_ptr + i, mask=mask, other=0)
    d0 = tl.where(mask, _mix(new, idx, A0, B0, M10, M20) - _mix(old, idx, A0, B0, M10, M20), 0)
    d1 = tl.where(mask, _mix(new, idx, A1, B1, M11, M21) - _mix(old, idx, A1, B1, M11, M21), 0)
    tl.store(out_ptr + 2 * pid, tl.sum(d0, axis=0))
    tl.store(out_ptr + 2 * pid + 1, tl.sum(d1, axis=0))


def lane_moves_triton(positions: torch.Tensor, old_words: torch.Tensor, new_words: torch.Tensor) -> torch.Tensor:
    """int64 [2] on the words' device, not read back: how far each lane moves (mod 2^64) when the int64 words at
    `positions` (each once) change from old_words to new_words. One launch and one sum, where the torch terms take
    about 17 elementwise launches per lane: a block delta's sparse rehash is bound by the host's launches."""
    if not new_words.is_cuda and not interpreting():
        raise RuntimeError("fingerprint kernel: needs CUDA tensors, or TRITON_INTERPRET=1 on CPU")
    n = positions.numel()
    if n == 0:
        return torch.zeros(2, dtype=torch.int64, device=new_words.device)
    grid = (triton.cdiv(n, _BLOCK),)
    partial = torch.empty(grid[0], 2, dtype=torch.int64, device=new_words.device)
    (a0, b0, m10, m20), (a1, b1, m11, m21) = LANES
    _moves_kernel[grid](positions, old_words, new_words, partial, n, a0, b0, m10, m20, a1, b1, m11, m21,
                        BLOCK=_BLOCK)
    return partial.sum(0)


def lanes_triton(words: torch.Tensor) -> list[int]:
    """The two lane sums of int64 `words` (CUDA, or CPU under TRITON_INTERPRET=1)."""
    if not words.is_cuda and not interpreting():
        raise RuntimeError("fingerprint kernel: needs a CUDA tensor, or TRITON_INTERPRET=1 on CPU")
    n = words.numel()
    grid = (triton.cdiv(n, _BLOCK),)
    partial = torch.empty(grid[0], 2, dtype=torch.int64, device=words.device)
    (a0, b0, m10, m20), (a1, b1, m11, m21) = LANES
    _lanes_kernel[grid](words, partial, n, a0, b0, m10, m20, a1, b1, m11, m21, BLOCK=_BLOCK)
    return [int(v) for v in partial.sum(0).tolist()]

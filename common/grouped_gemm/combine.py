"""The MoE layer's last step: each token's k expert rows summed into one output row.

The down GEMM's weighted scatter writes the (token, slot) rows as [T, k, H], router weights applied. One Triton
launch sums each token's k rows in fp32, in slot order, and rounds once to the output dtype. torch's
`sum(1, dtype=float32).to(bf16)` took two launches and 9.5 us at DeepSeek-V4-Flash decode size on an H100 (4.5% of
the layer); the order is fixed here (a contract, tested bit for bit), not left to a generic reduction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import DTypeError, ShapeError
from ..kernels import interpreting

BLOCK_H = 1024  # output columns per program: 2 KB of bf16 per slot row, 4 warps of 8-element vectors


@triton.jit
def _sum_slots_kernel(y_ptr, out_ptr, H, stride_y, stride_out, K: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < H
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for slot in tl.static_range(K):
        acc += tl.load(y_ptr + (token * K + slot) * stride_y + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


def sum_slots(y: torch.Tensor, top_k: int, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y [T*k, H] (row t*k + j: token t's slot j) -> [T, H] = ((y[t*k] + y[t*k+1]) + ...) in fp32, rounded once
    to out_dtype (default y's). CUDA tensors, or any under TRITON_INTERPRET=1."""
    if y.dim() != 2 or top_k < 1 or y.shape[0] % top_k:
        raise ShapeError(f"tensor 'y': expected [T * k, H] with k = {top_k}, got {tuple(y.shape)}")
    if not y.is_floating_point():
        raise DTypeError(f"tensor 'y': expected a float dtype, got {y.dtype}")
    if not y.is_cuda and not interpreting():
        raise RuntimeError(f"sum_slots needs a CUDA tensor (got {y.device}); on CPU set TRITON_INTERPRET=1 before "
                           "importing triton")
    t, h = y.shape[0] // top_k, y.shape[1]
    out = torch.empty(t, h, dtype=out_dtype or y.dtype, device=y.device)
    if t == 0 or h == 0:
        return out
    if y.stride(1) != 1:
        y = y.contiguous()
    _sum_slots_kernel[(t, triton.cdiv(h, BLOCK_H))](y, out, h, y.stride(0), out.stride(0), K=top_k, BLOCK=BLOCK_H,
                                                    num_warps=4)
    return out

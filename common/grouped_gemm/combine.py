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
from ..kernels import interpreting, pdl
from ..kernels.pdl import pdl_enter

BLOCK_H = 1024  # output columns per program: 2 KB of bf16 per slot row, 4 warps of 8-element vectors


@triton.jit
def _sum_slots_kernel(y_ptr, out_ptr, H, stride_y, stride_out, K: tl.constexpr, BLOCK: tl.constexpr,
                      PDL: tl.constexpr):
    pdl_enter(PDL)
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
                                                    num_warps=4, **pdl.launch_options(pdl.mode(y), small=True))
    return out


@triton.jit
def _combine_rows_kernel(y_ptr, inv_ptr, w_ptr, bias_ptr, ids_ptr, out_ptr, H, stride_y, stride_b, stride_out,
                         K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < H
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for slot in tl.static_range(K):
        pair = token * K + slot
        row = tl.load(inv_ptr + pair).to(tl.int64)
        v = tl.load(y_ptr + row * stride_y + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            expert = tl.load(ids_ptr + pair).to(tl.int64)
            v += tl.load(bias_ptr + expert * stride_b + cols, mask=ok, other=0.0).to(tl.float32)
        acc += tl.load(w_ptr + pair) * v
    tl.store(out_ptr + token * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


def combine_rows(y_sorted: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor,
                 out_dtype: torch.dtype | None = None, *, bias: torch.Tensor | None = None,
                 expert_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The un-permute of an unweighted down GEMM (the dense prefill path, dense.py): y_sorted [M, H] in expert
    order, inverse [T*k] (routing.Routing.inverse: the sorted row of each (token, slot)), weights fp32 [T*k] ->
    [T, H] = sum over slots j in order of weights[t, j] * (y_sorted[inverse[t*k + j]] (+ bias[expert_ids[t*k + j]])),
    in fp32 (each product rounded, then added: no fused multiply-add), rounded once to out_dtype (default
    y_sorted's). bias [E, H] needs expert_ids [T*k] (the routed ids).
    CUDA tensors, or any under TRITON_INTERPRET=1."""
    if weights.dtype != torch.float32 or weights.dim() != 2:
        raise DTypeError(f"tensor 'weights': expected the router's float32 [T, k], got {weights.dtype} "
                         f"{tuple(weights.shape)}")
    t_count, k = weights.shape
    m = t_count * k
    if inverse.shape != (m,):
        raise ShapeError(f"tensor 'inverse': expected [T * k = {m}], got {tuple(inverse.shape)}")
    if y_sorted.dim() != 2 or y_sorted.shape[0] != m or y_sorted.stride(1) != 1:
        raise ShapeError(f"tensor 'y_sorted': expected [T * k = {m}, H] with unit column stride, got "
                         f"{tuple(y_sorted.shape)}")
    if (bias is None) != (expert_ids is None):
        raise ValueError("combine_rows: give bias and expert_ids together, or neither")
    if bias is not None and (bias.dim() != 2 or bias.shape[1] != y_sorted.shape[1] or expert_ids.numel() != m):
        raise ShapeError(f"tensor 'bias': expected [E, {y_sorted.shape[1]}] with expert_ids [T * k = {m}], got "
                         f"{tuple(bias.shape)} and {tuple(expert_ids.shape)}")
    if not y_sorted.is_cuda and not interpreting():
        raise RuntimeError(f"combine_rows needs CUDA tensors (got {y_sorted.device}); on CPU set TRITON_INTERPRET=1 "
                           "before importing triton")
    h = y_sorted.shape[1]
    out = torch.empty(t_count, h, dtype=out_dtype or y_sorted.dtype, device=y_sorted.device)
    if t_count == 0 or h == 0:
        return out
    w = weights.contiguous().reshape(-1)
    bias = bias.contiguous() if bias is not None else None
    _combine_rows_kernel[(t_count, triton.cdiv(h, BLOCK_H))](
        y_sorted, inverse.contiguous(), w, bias if bias is not None else w,
        expert_ids.contiguous().reshape(-1) if expert_ids is not None else inverse, out, h, y_sorted.stride(0),
        bias.stride(0) if bias is not None else 0, out.stride(0), K=k, HAS_BIAS=bias is not None, BLOCK=BLOCK_H,
        num_warps=4, enable_fp_fusion=False)  # w * v, then + acc: two roundings, as the contract's loop (no FMA)
    return out

"""Small bf16 grouped GEMMs for the LoRA terms (rank R << hidden): torch._grouped_mm where it runs (CPU, and
CUDA on Hopper+ in torch >= 2.8), a per-expert loop elsewhere. The rank-R products are < 1% of the expert FLOPs,
so they are not fused into the MXFP4 kernels' main loop; their up-projections are (the kernels' LoRA epilogue).
"""

from __future__ import annotations

import torch


def _native_ok(*ts: torch.Tensor) -> bool:
    """torch._grouped_mm needs sm90+ on CUDA and 16-byte aligned strides and pointers (a rank-4 bf16 LoRA factor
    has 8-byte rows): otherwise the per-expert loop runs."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    t = ts[0]
    if t.is_cuda and torch.cuda.get_device_capability(t.device) < (9, 0):
        return False
    for u in ts:
        size = u.element_size()
        if u.data_ptr() % 16 or any(st * size % 16 for st, n in zip(u.stride(), u.shape) if st != 1 and n > 1):
            return False
    return True


def _bounds(offsets: torch.Tensor) -> list[tuple[int, int, int]]:
    o = offsets.tolist()
    return [(e, o[e], o[e + 1]) for e in range(len(o) - 1)]


def grouped_mm(a: torch.Tensor, offsets: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out [M, N] = a_e [rows_e, K] @ b[e] [K, N] per expert (bf16 in, bf16 out, fp32 accumulation)."""
    a = a.to(torch.bfloat16)
    b = b.to(torch.bfloat16)
    if a.shape[0] == 0:
        return a.new_empty(0, b.shape[2])
    if _native_ok(a, b):
        return torch._grouped_mm(a, b, offs=offsets[1:])
    out = a.new_zeros(a.shape[0], b.shape[2])
    for e, lo, hi in _bounds(offsets):
        if hi > lo:
            out[lo:hi] = a[lo:hi] @ b[e]
    return out


def grouped_wgrad(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """out [E, P, Q] = a_e^T [P, rows_e] @ b_e [rows_e, Q] per expert (zero for an expert without rows)."""
    a = a.to(torch.bfloat16)
    b = b.to(torch.bfloat16)
    e = offsets.numel() - 1
    if a.shape[0] == 0:
        return a.new_zeros(e, a.shape[1], b.shape[1])
    if _native_ok(a.t(), b):
        return torch._grouped_mm(a.t(), b, offs=offsets[1:])
    out = a.new_zeros(e, a.shape[1], b.shape[1])
    for i, lo, hi in _bounds(offsets):
        if hi > lo:
            out[i] = a[lo:hi].t() @ b[lo:hi]
    return out

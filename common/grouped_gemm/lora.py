"""The per-expert LoRA terms of the grouped MLP that the MXFP4 GEMMs do not fuse: the rank-R projections of the
sorted rows (their up-projections are the GEMMs' LoRA epilogue) and the factors' weight gradients.

Triton kernels (common/grouped_gemm/_lora_kernels.py) wherever the grouped GEMMs run (CUDA, or the interpreter
on CPU): fp32 accumulation, one rounding, the scaling folded in before it, and two launches fewer per projection
than a grouped GEMM followed by a multiply.
"""

from __future__ import annotations

import torch

from ..errors import ShapeError
from ..kernels import fast_launch, interpreting
from ._lora_kernels import _lora_project_kernel, _lora_wgrad_kernel
from .configs import cdiv, next_pow2

_MAX_BLOCK_R = 64


def _rank_block(r: int) -> int:
    """The MMA needs >= 16 along every dimension: a smaller rank is masked inside a 16-wide tile."""
    return min(_MAX_BLOCK_R, max(16, next_pow2(r)))


def _check(offsets: torch.Tensor, rows: int, *named: tuple[str, torch.Tensor]) -> None:
    for name, t in named:
        if t.dim() != 2 or t.shape[0] != rows:
            raise ShapeError(f"tensor '{name}': expected [M={rows}, ...] sorted rows, got {tuple(t.shape)}")
        if t.device != offsets.device:
            raise ValueError(f"tensor '{name}' is on {t.device} but 'expert_offsets' on {offsets.device}")
    if not offsets.is_cuda and not interpreting():
        raise RuntimeError("LoRA grouped kernels: need CUDA tensors, or TRITON_INTERPRET=1 on CPU")
    if offsets.dtype != torch.int32 or offsets.dim() != 1:
        raise ShapeError(f"tensor 'expert_offsets': expected int32 [E+1], got {offsets.dtype} "
                         f"{tuple(offsets.shape)}")


def project(x: torch.Tensor, offsets: torch.Tensor, factor: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """h [M, R] bf16 = scaling * x_e @ factor_e^T per expert's rows, factor [E, R, K] at any strides (an A factor
    as stored, or B.transpose(1, 2) of a B factor [E, K, R]); x [M, K] is bf16 or wider (rounded to bf16 first,
    as the factor is, by torch's round to nearest)."""
    _check(offsets, x.shape[0], ("x", x))
    e, r, k = factor.shape
    if x.shape[1] != k or offsets.numel() != e + 1:
        raise ShapeError(f"LoRA projection: x {tuple(x.shape)} against factor [E, R, K] {tuple(factor.shape)} "
                         f"with {offsets.numel()} offsets: expected x [M, {k}] and {e + 1} offsets")
    m = x.shape[0]
    out = torch.empty(m, r, dtype=torch.bfloat16, device=x.device)
    if m == 0:
        return out
    # rounded here, not in the kernel: the interpreter's in-kernel cast truncates where torch and GPUs round
    x, factor = x.to(torch.bfloat16).contiguous(), factor.to(torch.bfloat16)
    avg = cdiv(m, e)
    interp = interpreting()
    block_m = 16 if (avg <= 16 or interp) else 32 if avg <= 32 else 64
    block_r = _rank_block(r)
    grid = (cdiv(m, block_m) + e, cdiv(r, block_r))
    fast_launch.launch(_lora_project_kernel, grid, x, factor, offsets, out, k, e, r, float(scaling), x.stride(0),
                       factor.stride(0), factor.stride(1), factor.stride(2), out.stride(0),
                       E_POW2=max(2, next_pow2(e)), F32_DOT=interp, BLOCK_M=block_m, BLOCK_R=block_r,
                       BLOCK_K=64 if interp else 128, num_warps=4, num_stages=3)
    return out


def grouped_wgrad(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor,
                  out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """out [E, P, Q] = a_e^T [P, rows_e] @ b_e [rows_e, Q] per expert, zero for an expert without rows; a [M, P]
    and b [M, Q] sorted rows, one of P, Q the rank. Rounded once into out_dtype (e.g. an fp32 master's)."""
    _check(offsets, a.shape[0], ("a", a), ("b", b))
    e = offsets.numel() - 1
    p, q = a.shape[1], b.shape[1]
    out = torch.empty(e, p, q, dtype=out_dtype, device=a.device)
    if a.shape[0] == 0:
        return out.zero_()
    a, b = a.to(torch.bfloat16).contiguous(), b.to(torch.bfloat16).contiguous()
    so = (out.stride(0), out.stride(1), out.stride(2))
    if p < q:  # the wide operand on the MMA's M side: compute out_e^T = b_e^T a_e into the transposed strides
        a, b, p, q, so = b, a, q, p, (so[0], so[2], so[1])
    block_q = _rank_block(q)
    interp = interpreting()
    block_p = 64 if interp else 128
    grid = (e, cdiv(p, block_p), cdiv(q, block_q))
    fast_launch.launch(_lora_wgrad_kernel, grid, a, b, offsets, out, p, q, a.stride(0), b.stride(0), *so,
                       F32_DOT=interp, BLOCK_P=block_p, BLOCK_Q=block_q, BLOCK_ROWS=16 if interp else 64,
                       num_warps=4, num_stages=3)
    return out

"""Pure-torch twins of the grouped MXFP4 GEMMs (any device): dequantize each expert with common.dequantize,
multiply in fp32. The oracle of tests/common/test_grouped_gemm.py and the CPU path of the callers.

All functions take the same arguments as common/grouped_gemm/ops.py and return fp32.
"""

from __future__ import annotations

import torch

from ..api import dequantize
from . import activations as A


def _groups(offsets: torch.Tensor) -> list[tuple[int, int, int]]:
    o = offsets.tolist()
    return [(e, o[e], o[e + 1]) for e in range(len(o) - 1)]


def dequantize_expert(codes: torch.Tensor, scales: torch.Tensor, e: int) -> torch.Tensor:
    """fp32 [N, K] weight of expert e (exact)."""
    return dequantize((codes[e], scales[e]), torch.float32, name=f"expert {e}")


def grouped_mm_ref(x: torch.Tensor, offsets: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, *,
                   bias: torch.Tensor | None = None, lora: tuple[torch.Tensor, torch.Tensor] | None = None
                   ) -> torch.Tensor:
    """y = x_e @ W_e^T (+ bias[e]) (+ h @ B_e^T), fp32 [M, N]."""
    y = torch.zeros(x.shape[0], codes.shape[1], dtype=torch.float32, device=x.device)
    for e, lo, hi in _groups(offsets):
        if hi == lo:
            continue
        out = x[lo:hi].float() @ dequantize_expert(codes, scales, e).T
        if bias is not None:
            out = out + bias[e].float()
        if lora is not None:
            out = out + lora[0][lo:hi].float() @ lora[1][e].float().T
        y[lo:hi] = out
    return y


def grouped_mm_dx_ref(dy: torch.Tensor, offsets: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, *,
                      lora: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """dx = dy_e @ W_e (+ h @ A_e), fp32 [M, K]."""
    dx = torch.zeros(dy.shape[0], codes.shape[2] * 2, dtype=torch.float32, device=dy.device)
    for e, lo, hi in _groups(offsets):
        if hi == lo:
            continue
        out = dy[lo:hi].float() @ dequantize_expert(codes, scales, e)
        if lora is not None:
            out = out + lora[0][lo:hi].float() @ lora[1][e].float()
        dx[lo:hi] = out
    return dx


def grouped_mm_gated_ref(x: torch.Tensor, offsets: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, *,
                         activation: str, bias: torch.Tensor | None = None,
                         lora: tuple[torch.Tensor, torch.Tensor] | None = None,
                         gate_up: str = "halves", limit: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(pre) [M, I], pre [M, 2I]) in fp32, w13 rows (and pre's columns) in the gate_up layout; limit:
    silu_clamp's."""
    pre = grouped_mm_ref(x, offsets, codes, scales, bias=bias, lora=lora)
    return A.gated(pre, activation, gate_up, limit), pre


def gated_bwd_ref(pre: torch.Tensor, da: torch.Tensor, activation: str, gate_up: str = "halves",
                  limit: float | None = None) -> torch.Tensor:
    """d pre [M, 2I] of the gated activation (autograd through activations.py, fp32)."""
    p = pre.float().detach().requires_grad_(True)
    A.gated(p, activation, gate_up, limit).backward(da.float())
    return p.grad


def moe_mlp_ref(x: torch.Tensor, offsets: torch.Tensor, w13: tuple[torch.Tensor, torch.Tensor],
                w2: tuple[torch.Tensor, torch.Tensor], *, activation: str, lora13=None, lora2=None,
                scaling: float = 1.0, bias13: torch.Tensor | None = None,
                bias2: torch.Tensor | None = None, gate_up: str = "halves", limit: float | None = None) -> torch.Tensor:
    """Differentiable fp32 expert MLP on sorted rows: y_e = act(x_e W13_e^T + s x_e A13^T B13^T) W2_e^T + LoRA2.

    lora13 / lora2 = (A [E, R, in], B [E, out, R]) tensors (may require grad); x may require grad. The frozen
    MXFP4 weights get no gradient. Used as the autograd oracle of common.grouped_gemm.mlp.
    """
    y = x.new_zeros(x.shape[0], w2[0].shape[1], dtype=torch.float32)
    parts = []
    for e, lo, hi in _groups(offsets):
        xe = x[lo:hi].float()
        pre = xe @ dequantize_expert(*w13, e).T
        if bias13 is not None:
            pre = pre + bias13[e].float()
        if lora13 is not None:
            pre = pre + scaling * (xe @ lora13[0][e].float().T) @ lora13[1][e].float().T
        a = A.gated(pre, activation, gate_up, limit)
        out = a @ dequantize_expert(*w2, e).T
        if bias2 is not None:
            out = out + bias2[e].float()
        if lora2 is not None:
            out = out + scaling * (a @ lora2[0][e].float().T) @ lora2[1][e].float().T
        parts.append(out)
    return torch.cat(parts, 0) if parts else y

"""Gated activations of the first MoE GEMM, in pure torch (fp32): the reference the fused epilogues match.

Canonical w13 layout is vLLM's: rows 0..I-1 are the gate projection (w1), rows I..2I-1 the up projection (w3).
gpt-oss interleaves gate/up rows in its checkpoint (row 2i gate i, row 2i+1 up i); the engine de-interleaves them
at load (common.layouts), the learner keeps them, so the gated kernels read either (GATE_UP_LAYOUTS).
"""

from __future__ import annotations

import torch

from ..moe.activations import GATE_UP_ORDERS, SWIGLU_ALPHA, SWIGLU_LIMIT, GateUpOrder, split_gate_up

__all__ = ["ACTIVATIONS", "GATE_UP_LAYOUTS", "SWIGLU_ALPHA", "SWIGLU_LIMIT", "activation_code", "check_gate_up",
           "gated", "silu_mul", "split_gate_up", "swiglu_oai"]

# Kernel codes of the activations (constexpr ACT of common/grouped_gemm/_kernels.py). 0 = no activation.
ACT_NONE = 0
ACT_SILU = 1
ACT_SWIGLU_OAI = 2
ACTIVATIONS = {"silu": ACT_SILU, "swiglu_oai": ACT_SWIGLU_OAI}

# gpt-oss's clamp-swiglu constants and the gate/up row orders: the learner-engine contract (common.moe).
GATE_UP_LAYOUTS = GATE_UP_ORDERS


def check_gate_up(gate_up: str) -> bool:
    """True for the interleaved layout (the kernels' GATE_UP_PAIRS); a clear error for an unknown one."""
    return GateUpOrder.of(gate_up) is GateUpOrder.INTERLEAVED


def activation_code(activation: str) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[activation]


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (Qwen3-MoE, DeepSeek-V3/V4 experts)."""
    return torch.nn.functional.silu(gate) * up


def swiglu_oai(gate: torch.Tensor, up: torch.Tensor, alpha: float = SWIGLU_ALPHA,
               limit: float = SWIGLU_LIMIT) -> torch.Tensor:
    """gpt-oss: gate clamped to <= limit, up to [-limit, limit]; ((up + 1) * gate) * sigmoid(alpha * gate), in the
    association of the fused epilogue (common.moe.clamp_swiglu is transformers' association, for the learner).

    torch.clamp's gradient passes where the input lies inside the closed interval, which the fused backward
    epilogue reproduces (common/grouped_gemm/_tiles.py::_act_bwd).
    """
    g = gate.clamp(max=limit)
    u = up.clamp(min=-limit, max=limit)
    return (u + 1) * g * torch.sigmoid(alpha * g)


def gated(pre: torch.Tensor, activation: str, gate_up: str = "halves") -> torch.Tensor:
    """Apply the gated activation to pre [M, 2I] ([gate | up] halves or interleaved pairs) -> [M, I]."""
    fn = {"silu": silu_mul, "swiglu_oai": swiglu_oai}
    activation_code(activation)
    return fn[activation](*split_gate_up(pre, gate_up))

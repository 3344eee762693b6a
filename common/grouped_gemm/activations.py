"""Gated activations of the first MoE GEMM, in pure torch (fp32): the reference the fused epilogues match.

Canonical w13 layout is vLLM's: rows 0..I-1 are the gate projection (w1), rows I..2I-1 the up projection (w3).
gpt-oss interleaves gate/up rows in its checkpoint (row 2i gate i, row 2i+1 up i); the engine de-interleaves them
at load (common.layouts), the learner keeps them, so the gated kernels read either (GATE_UP_LAYOUTS).
"""

from __future__ import annotations

import torch

from ..moe.activations import (
    GATE_UP_ORDERS,
    SWIGLU_ALPHA,
    SWIGLU_LIMIT,
    GateUpOrder,
    check_limit,
    clamp_silu,
    split_gate_up,
)

__all__ = ["ACTIVATIONS", "GATE_UP_LAYOUTS", "SWIGLU_ALPHA", "SWIGLU_LIMIT", "activation_code", "check_gate_up",
           "gated", "kernel_constants", "silu_clamp", "silu_mul", "split_gate_up", "swiglu_oai"]

# Kernel codes of the activations (constexpr ACT of common/grouped_gemm/_kernels.py). 0 = no activation.
ACT_NONE = 0
ACT_SILU = 1
ACT_SWIGLU_OAI = 2
ACT_SILU_CLAMP = 3
ACTIVATIONS = {"silu": ACT_SILU, "swiglu_oai": ACT_SWIGLU_OAI, "silu_clamp": ACT_SILU_CLAMP}
# the activations whose clamp limit is the caller's (the model's config), not compiled in
LIMIT_ACTIVATIONS = ("silu_clamp",)

# gpt-oss's clamp-swiglu constants and the gate/up row orders: the learner-engine contract (common.moe).
GATE_UP_LAYOUTS = GATE_UP_ORDERS


def check_gate_up(gate_up: str) -> bool:
    """True for the interleaved layout (the kernels' GATE_UP_PAIRS); a clear error for an unknown one."""
    return GateUpOrder.of(gate_up) is GateUpOrder.INTERLEAVED


def activation_code(activation: str) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[activation]


def kernel_constants(activation: str | None, limit: float | None) -> tuple[int, float, float]:
    """(ACT, ALPHA, LIMIT) constexprs of the kernels for an activation (None: no activation) and the caller's limit.

    silu_clamp needs the model's limit (a new value compiles one more kernel variant: a model has one); swiglu_oai
    compiles gpt-oss's alpha and limit in; plain silu and no activation take no limit (a limit given to them is an
    error, not ignored: a caller passing one expects a clamp)."""
    act = ACT_NONE if activation is None else activation_code(activation)
    if activation in LIMIT_ACTIVATIONS:
        return act, SWIGLU_ALPHA, check_limit(limit, f"activation {activation!r}")
    if limit is not None:
        raise ValueError(f"activation {activation!r} takes no clamp limit (got {limit!r}); only "
                         f"{LIMIT_ACTIVATIONS} do (swiglu_oai compiles gpt-oss's {SWIGLU_LIMIT} in)")
    return act, SWIGLU_ALPHA, SWIGLU_LIMIT


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


# DeepSeek-V4's clamped silu: the contract's own function. Unlike swiglu_oai above, transformers and the fused
# epilogue associate it alike (the clamp is exact, then silu(gate) * up), so the kernels' twin is the contract's.
silu_clamp = clamp_silu


def gated(pre: torch.Tensor, activation: str, gate_up: str = "halves", limit: float | None = None) -> torch.Tensor:
    """Apply the gated activation to pre [M, 2I] ([gate | up] halves or interleaved pairs) -> [M, I]; limit: the
    model's clamp limit, for silu_clamp only (kernel_constants)."""
    kernel_constants(activation, limit)
    gate, up = split_gate_up(pre, gate_up)
    if activation == "silu_clamp":
        return silu_clamp(gate, up, limit)
    return {"silu": silu_mul, "swiglu_oai": swiglu_oai}[activation](gate, up)

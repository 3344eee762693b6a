"""Gated activations of the first MoE GEMM, in pure torch (fp32): the reference the fused epilogues match.

Canonical w13 layout is vLLM's: rows 0..I-1 are the gate projection (w1), rows I..2I-1 the up projection (w3).
gpt-oss interleaves gate/up rows in its checkpoint (row 2i gate i, row 2i+1 up i); the engine de-interleaves them
at load (common.layouts), the learner keeps them, so the gated kernels read either (GATE_UP_LAYOUTS).
"""

from __future__ import annotations

import torch

# Kernel codes of the activations (constexpr ACT of common/grouped_gemm/_kernels.py). 0 = no activation.
ACT_NONE = 0
ACT_SILU = 1
ACT_SWIGLU_OAI = 2
ACTIVATIONS = {"silu": ACT_SILU, "swiglu_oai": ACT_SWIGLU_OAI}

# gpt-oss clamp-swiglu constants (gpt-oss model card / reference implementation: alpha 1.702, limit 7.0).
SWIGLU_ALPHA = 1.702
SWIGLU_LIMIT = 7.0


# Row layouts of a gated w13 (and the column order of its pre-activation and gradient): "halves" [gate; up],
# "interleaved" gate/up pairs (gpt-oss's checkpoint order).
GATE_UP_LAYOUTS = ("halves", "interleaved")


def check_gate_up(gate_up: str) -> bool:
    """True for the interleaved layout (the kernels' GATE_UP_PAIRS); a clear error for an unknown one."""
    if gate_up not in GATE_UP_LAYOUTS:
        raise ValueError(f"unknown gate_up layout {gate_up!r}; choose one of {GATE_UP_LAYOUTS}")
    return gate_up == "interleaved"


def split_gate_up(pre: torch.Tensor, gate_up: str = "halves") -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) columns of pre [..., 2I] in the given layout."""
    if check_gate_up(gate_up):
        return pre[..., 0::2], pre[..., 1::2]
    return pre.chunk(2, dim=-1)


def activation_code(activation: str) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[activation]


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (Qwen3-MoE, DeepSeek-V3/V4 experts)."""
    return torch.nn.functional.silu(gate) * up


def swiglu_oai(gate: torch.Tensor, up: torch.Tensor, alpha: float = SWIGLU_ALPHA,
               limit: float = SWIGLU_LIMIT) -> torch.Tensor:
    """gpt-oss: gate clamped to <= limit, up to [-limit, limit]; (up + 1) * gate * sigmoid(alpha * gate).

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

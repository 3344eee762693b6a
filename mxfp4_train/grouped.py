"""The grouped MoE MLP seam: routed tokens x packed (or fake-quantized) experts + per-expert LoRA -> output.

`grouped_mlp` is the one function the learner's experts call. Backends plug in behind it (the fused Triton kernels
with in-kernel dequant of issue 5 register here); `reference` is the pure-torch oracle that runs anywhere. Its loop
mirrors transformers' eager experts forward op for op (same token order per expert, same index_add_ order), so a
converted model reproduces the model whose experts hold the dequantized weights bit for bit.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from common.moe.activations import SWIGLU_ALPHA, SWIGLU_LIMIT, GateUpOrder, clamp_swiglu, split_gate_up

from .lora import ExpertLoRA
from .weights import fake_quant_act_mxfp8


@dataclasses.dataclass(frozen=True)
class Activation:
    """How gate_up rows become the down projection's input (the contract's activations, common.moe.activations).

    kind "glu": rows GateUpOrder.HALVES, act_fn(gate) * up with the model's hidden_act (Qwen3-MoE, DeepSeek-V3;
    the engine's "silu" when act_fn is silu).
    kind "clamp_swiglu": rows GateUpOrder.INTERLEAVED (gpt-oss's checkpoint order, read in place), then
    common.moe.clamp_swiglu with alpha and limit (the engine's "swigluoai"; defaults: gpt-oss's constants).
    """

    kind: str
    act_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    alpha: float = SWIGLU_ALPHA
    limit: float = SWIGLU_LIMIT
    # glu only: DeepSeek-V4's swiglu_limit, gate clamped above and up to [-clamp, clamp] before act_fn(gate) * up
    # (transformers DeepseekV4Experts._apply_gate, op for op); None = no clamp (Qwen3-MoE, DeepSeek-V3)
    clamp: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("glu", "clamp_swiglu"):
            raise ValueError(f"unknown activation kind {self.kind!r}; expected 'glu' or 'clamp_swiglu'")
        if self.kind == "glu" and self.act_fn is None:
            raise ValueError("activation kind 'glu' needs act_fn (the model's hidden_act)")

    @property
    def gate_up(self) -> GateUpOrder:
        """Row order of the learner's w13 for this activation."""
        return GateUpOrder.HALVES if self.kind == "glu" else GateUpOrder.INTERLEAVED

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = split_gate_up(gate_up, self.gate_up)
        if self.kind == "glu":
            if self.clamp is not None:
                gate, up = gate.clamp(max=self.clamp), up.clamp(min=-self.clamp, max=self.clamp)
            return self.act_fn(gate) * up
        return clamp_swiglu(gate, up, self.alpha, self.limit)


@dataclasses.dataclass
class ExpertOperands:
    """Everything the grouped MLP needs besides the tokens. w13/w2 are weights views (see weights.py)."""

    w13: object
    w2: object
    activation: Activation
    num_experts: int
    b13: torch.Tensor | None = None
    b2: torch.Tensor | None = None
    lora13: ExpertLoRA | None = None
    lora2: ExpertLoRA | None = None
    act_quant_profile: str | None = None  # set for W4A8: activations pass through the MXFP8 fake quant


def _project(x: torch.Tensor, w, bias: torch.Tensor | None, lora: ExpertLoRA | None, e: int,
             act_profile: str | None) -> torch.Tensor:
    xq = fake_quant_act_mxfp8(x, act_profile) if act_profile else x
    y = w.linear(xq, e)
    if bias is not None:
        y = y + bias[e]
    if lora is not None:
        y = y + lora.apply_expert(x, e)
    return y


def reference_grouped_mlp(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                          ops: ExpertOperands) -> torch.Tensor:
    out = torch.zeros_like(x)
    with torch.no_grad():
        # [E, top_k, T]: same mask transformers builds, so torch.where yields the same token order per expert.
        mask = nn.functional.one_hot(topk_ids, num_classes=ops.num_experts).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit.flatten().tolist():
        pos, tok = torch.where(mask[e])
        xe = x[tok]
        h = ops.activation(_project(xe, ops.w13, ops.b13, ops.lora13, e, ops.act_quant_profile))
        y = _project(h, ops.w2, ops.b2, ops.lora2, e, ops.act_quant_profile)
        y = y * topk_weights[tok, pos, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


Supports = Callable[[torch.Tensor, ExpertOperands], tuple[bool, str]]
_BACKENDS: dict[str, tuple[Callable, Supports]] = {
    "reference": (reference_grouped_mlp, lambda x, ops: (True, "pure torch, any device")),
}
# Tried in this order by backend="auto"; a fused backend registered later goes in front of the reference.
_PRIORITY: list[str] = ["reference"]


def register_backend(name: str, fn: Callable, supports: Supports, *, prefer: bool = True) -> None:
    """Plug a grouped-MLP implementation in behind `grouped_mlp` (same signature as reference_grouped_mlp)."""
    _BACKENDS[name] = (fn, supports)
    if name not in _PRIORITY:
        _PRIORITY.insert(0 if prefer else len(_PRIORITY), name)


def backend_names() -> list[str]:
    return list(_PRIORITY)


def select_backend(x: torch.Tensor, ops: ExpertOperands, backend: str = "auto") -> str:
    """Name of the backend that runs (x, ops); raises listing every rejection when none can."""
    if backend != "auto":
        if backend not in _BACKENDS:
            raise ValueError(f"unknown grouped-MLP backend {backend!r}; registered: {', '.join(_PRIORITY)}")
        ok, reason = _BACKENDS[backend][1](x, ops)
        if not ok:
            raise ValueError(f"grouped-MLP backend {backend!r} cannot run this input: {reason}")
        return backend
    reasons = []
    for name in _PRIORITY:
        ok, reason = _BACKENDS[name][1](x, ops)
        if ok:
            return name
        reasons.append(f"{name}: {reason}")
    raise ValueError("no grouped-MLP backend can run this input; " + "; ".join(reasons))


def grouped_mlp(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, ops: ExpertOperands,
                backend: str = "auto") -> torch.Tensor:
    """x [T, H], topk_ids [T, k] int, topk_weights [T, k] -> sum_k w_k * MLP_{id_k}(x) [T, H] in x's dtype."""
    if x.dim() != 2 or topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"grouped_mlp: expected x [T, H] with topk_ids/topk_weights [T, k]; got x {tuple(x.shape)}, "
                         f"topk_ids {tuple(topk_ids.shape)}, topk_weights {tuple(topk_weights.shape)}")
    return _BACKENDS[select_backend(x, ops, backend)][0](x, topk_ids, topk_weights, ops)

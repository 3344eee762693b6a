"""The fused GPU backend of the grouped MoE MLP seam: `common.grouped_gemm`'s Triton kernels, which dequantize the
packed MXFP4 weight tiles in registers in forward and backward (no bf16 expert copy), in two modes:
- frozen packed experts (mode "lora"): no weight gradient, the per-expert LoRA as rank-r grouped GEMMs;
- fake-QAT masters (mode "qat", common.grouped_gemm.qat): the masters quantized by the codec's kernel every step,
  the same GEMMs, and the straight-through weight (and bias) gradient as grouped GEMMs of dy^T x; with W4A8 the
  MXFP8 activation fake quant right before each GEMM, as the reference does.
Registered in front of the reference; `supports` says when it applies.
"""

from __future__ import annotations

import torch
from torch import nn

from common.moe.activations import SWIGLU_ALPHA, SWIGLU_LIMIT

from .grouped import ExpertOperands, register_backend
from .weights import FakeQuantExpertWeights, PackedExpertWeights

# gpt-oss's clamp-swiglu (alpha, limit): the contract's constants, compiled into the kernels
GPT_OSS_SWIGLU = (SWIGLU_ALPHA, SWIGLU_LIMIT)


def _kernel_activation(ops: ExpertOperands) -> tuple[str | None, str, str]:
    """(kernel activation, w13 row layout, "") or (None, "", why the kernels cannot run it)."""
    act = ops.activation
    if act.kind == "glu":
        probe = torch.linspace(-8, 8, 33)  # transformers' ACT2FN["silu"] is its own class: compare behaviour
        if torch.equal(act.act_fn(probe), nn.functional.silu(probe)):
            # DeepSeek-V4 clamps gate/up at its swiglu_limit first: the kernels' silu_clamp, the limit an argument
            return ("silu" if act.clamp is None else "silu_clamp"), act.gate_up.value, ""
        return None, "", f"glu with {getattr(act.act_fn, '__name__', act.act_fn)!r}: the kernels fuse silu only"
    # clamp_swiglu is gpt-oss's: its w13 rows stay interleaved in the learner (the checkpoint's order) and the
    # kernels read them so; alpha and limit are compiled into the kernels
    if (act.alpha, act.limit) != GPT_OSS_SWIGLU:
        return None, "", (f"clamp_swiglu with alpha {act.alpha}, limit {act.limit}: the kernels fuse gpt-oss's "
                          f"(alpha, limit) = {GPT_OSS_SWIGLU} only")
    return "swiglu_oai", act.gate_up.value, ""


def _is_qat(ops: ExpertOperands) -> bool:
    return isinstance(ops.w13, FakeQuantExpertWeights) and isinstance(ops.w2, FakeQuantExpertWeights)


def _qat_supports(x: torch.Tensor, ops: ExpertOperands) -> tuple[bool, str]:
    for label, w in (("w13", ops.w13), ("w2", ops.w2)):
        if w.master.device != x.device:
            return False, f"QAT master {label} is on {w.master.device}, the activations on {x.device}"
        if w.master.dtype not in (torch.bfloat16, torch.float32):
            return False, f"QAT master {label} is {w.master.dtype}; the fused step takes bf16 or fp32 masters"
    if ops.w13.profile != ops.w2.profile:
        return False, f"QAT masters with two profiles ({ops.w13.profile!r}, {ops.w2.profile!r})"
    return True, ""


def supports(x: torch.Tensor, ops: ExpertOperands) -> tuple[bool, str]:
    if not x.is_cuda:
        return False, "needs CUDA tensors"
    if x.dtype != torch.bfloat16:
        return False, f"the kernels take bf16 activations, got {x.dtype}"
    name, _, reason = _kernel_activation(ops)
    if name is None:
        return False, reason
    loras = [lo for lo in (ops.lora13, ops.lora2) if lo is not None]
    if _is_qat(ops):
        if name == "silu_clamp":
            return False, "QAT masters with DeepSeek-V4's clamped silu: the fused QAT step has no limit argument yet"
        ok, reason = _qat_supports(x, ops)
        if not ok or not loras:
            return ok, reason
        return False, "LoRA adapters on QAT masters are not fused (the fused QAT step trains the masters only)"
    if not (isinstance(ops.w13, PackedExpertWeights) and isinstance(ops.w2, PackedExpertWeights)):
        return False, (f"experts must be both frozen packed or both QAT masters (which get a weight gradient), got "
                       f"{type(ops.w13).__name__} and {type(ops.w2).__name__}")
    if any(not isinstance(lo.dropout, nn.Identity) and lo.training for lo in loras):
        return False, "LoRA dropout is not fused"
    if len({lo.spec.scaling for lo in loras}) > 1:
        return False, "gate/up and down LoRA with different scaling"
    return True, ""


def triton_grouped_mlp(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                       ops: ExpertOperands) -> torch.Tensor:
    """Same contract as grouped.reference_grouped_mlp; callers go through grouped_mlp (which checks `supports`)."""
    from common.grouped_gemm import MXFP4GroupedMLP, permute, route, unpermute

    activation, gate_up, reason = _kernel_activation(ops)
    if activation is None:
        raise ValueError(f"triton grouped MLP: {reason}")
    routing = route(topk_ids, ops.num_experts)
    if _is_qat(ops):
        return unpermute(_qat_rows(permute(x.to(torch.bfloat16), routing), routing.offsets, ops, activation,
                                   gate_up), routing, topk_weights).to(x.dtype)
    lo13, lo2 = ops.lora13, ops.lora2
    scaling = (lo13 or lo2).spec.scaling if (lo13 or lo2) else 1.0
    y = MXFP4GroupedMLP.apply(
        permute(x.to(torch.bfloat16), routing), routing.offsets, ops.w13.codes, ops.w13.scales, ops.w2.codes,
        ops.w2.scales, None if lo13 is None else lo13.A, None if lo13 is None else lo13.B,
        None if lo2 is None else lo2.A, None if lo2 is None else lo2.B, scaling, activation, ops.b13, ops.b2,
        gate_up, ops.activation.clamp if activation == "silu_clamp" else None, ops.act_quant_profile)
    return unpermute(y, routing, topk_weights).to(x.dtype)


def _qat_rows(xs: torch.Tensor, offsets: torch.Tensor, ops: ExpertOperands, activation: str,
              gate_up: str) -> torch.Tensor:
    """The fake-QAT expert MLP on sorted rows: masters quantized with their profile, W4A8 with the model's."""
    from common.grouped_gemm.qat import MXFP4QATGroupedMLP

    return MXFP4QATGroupedMLP.apply(xs, offsets, ops.w13.master, ops.w2.master, ops.w13.profile, activation,
                                    gate_up, ops.b13, ops.b2, ops.act_quant_profile,
                                    (ops.w13.label, ops.w2.label))


register_backend("triton", triton_grouped_mlp, supports)

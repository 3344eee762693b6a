"""The reference MXFP4 MoE: pure torch, any device, fp32 math. The oracle that every faster backend must match.

Per local expert that has tokens: dequantize its packed w13/w2 with the codec (exact), gather its tokens, two
matmuls in fp32 with the activation between, scale by the router weight and scatter-add. Dequantizing on the fly
keeps memory at one expert's bf16/fp32 weights, never the stack.
"""

from __future__ import annotations

import torch

from common import dequantize, fake_quant_mxfp8
from common.moe import params as P
from common.moe.activations import split_gate_up

from .. import expert_lora
from .base import ActivationSpec, DeviceInfo, MoEBackend, act_quant_profile


def gated_activation(h: torch.Tensor, act: ActivationSpec) -> torch.Tensor:
    """h [T, 2I] = [gate | up] (GateUpOrder.HALVES: the gpt-oss loader de-interleaves its checkpoint rows)."""
    return act(*split_gate_up(h))


def _lora(x: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor] | None, scaling: float) -> torch.Tensor | None:
    """scaling * (x A^T) B^T in fp32, in the learner's association (mxfp4_train.lora.ExpertLoRA.apply_expert)."""
    if factors is None:
        return None
    a, b = factors
    return torch.nn.functional.linear(torch.nn.functional.linear(x, a.float()), b.float()) * scaling


def _quant(t: torch.Tensor, profile: str | None) -> torch.Tensor:
    return t if profile is None else fake_quant_mxfp8(t, profile=profile, nonfinite="profile")


def expert_mlp(w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor,
               b13: torch.Tensor | None, b2: torch.Tensor | None, x: torch.Tensor, act: ActivationSpec,
               lora13: tuple[torch.Tensor, torch.Tensor] | None = None,
               lora2: tuple[torch.Tensor, torch.Tensor] | None = None, scaling: float = 1.0,
               act_quant: str | None = None) -> torch.Tensor:
    """One expert (its packed slices) on its tokens x [n, H] in fp32 -> [n, H] fp32; optional LoRA factors (A, B)
    at their active rank, added after the bias as the learner does (mxfp4_train.grouped._project). act_quant (a
    codec profile): W4A8 emulation, both packed GEMMs read the MXFP8 fake quant of their input, LoRA the input."""
    h = _quant(x, act_quant) @ dequantize((w13, w13_scale), torch.float32).t()
    if b13 is not None:
        h = h + b13.float()
    if lora13 is not None:
        h = h + _lora(x, lora13, scaling)
    a = gated_activation(h, act)
    y = _quant(a, act_quant) @ dequantize((w2, w2_scale), torch.float32).t()
    if b2 is not None:
        y = y + b2.float()
    if lora2 is not None:
        y = y + _lora(a, lora2, scaling)
    return y


# A torch custom op, so that torch.compile (vLLM compiles the model unless --enforce-eager) treats the
# data-dependent per-expert loop as one opaque call instead of failing on its graph breaks.
@torch.library.custom_op("mxfp4_rl::cpu_reference_moe", mutates_args=())
def cpu_reference_moe(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                      w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor,
                      w13_bias: torch.Tensor | None, w2_bias: torch.Tensor | None, expert_map: torch.Tensor | None,
                      activation: str, alpha: float, limit: float | None, router_weight_on_input: bool,
                      lora13_a: torch.Tensor | None = None, lora13_b: torch.Tensor | None = None,
                      lora2_a: torch.Tensor | None = None, lora2_b: torch.Tensor | None = None,
                      lora_rank: torch.Tensor | None = None, lora_scaling: float = 1.0,
                      act_quant: str | None = None) -> torch.Tensor:
    act = ActivationSpec(activation, alpha, limit)  # silu_clamp's limit: the model's swiglu_limit (compat)
    # the active rank is read here, at run time: the factors are padded to the engine's max rank with zeros, and
    # computing at the learner's rank keeps its association (a zero-padded K changes how BLAS blocks the sum)
    r = 0 if lora_rank is None else int(lora_rank.item())
    ids = topk_ids.long()
    if expert_map is not None:
        ids = expert_map.to(ids.device)[ids]  # global -> local, -1 for experts of other EP ranks
    xf = x.float()
    weights = topk_weights.float()
    out = torch.zeros_like(xf)
    for e in torch.unique(ids).tolist():
        if e < 0:
            continue
        tok, slot = (ids == e).nonzero(as_tuple=True)
        w = weights[tok, slot].unsqueeze(1)
        b13 = None if w13_bias is None else w13_bias[e]
        b2 = None if w2_bias is None else w2_bias[e]
        args = (w13[e], w13_scale[e], w2[e], w2_scale[e], b13, b2)
        lora = {}
        if r > 0:
            lora = {"lora13": (lora13_a[e, :r], lora13_b[e, :, :r]), "lora2": (lora2_a[e, :r], lora2_b[e, :, :r]),
                    "scaling": lora_scaling}
        if router_weight_on_input:  # llama4-style: the router weight scales the expert's input
            y = expert_mlp(*args, xf[tok] * w, act, **lora, act_quant=act_quant)
        else:
            y = expert_mlp(*args, xf[tok], act, **lora, act_quant=act_quant) * w
        out.index_add_(0, tok, y)
    return out.to(x.dtype)


@cpu_reference_moe.register_fake
def _(x, topk_weights, topk_ids, w13, w13_scale, w2, w2_scale, w13_bias, w2_bias, expert_map, activation, alpha,
      limit, router_weight_on_input, lora13_a=None, lora13_b=None, lora2_a=None, lora2_b=None, lora_rank=None,
      lora_scaling=1.0, act_quant=None):
    return torch.empty_like(x)


class CPUReferenceBackend(MoEBackend):
    name = "cpu_reference"
    serves_lora = True
    activation_modes = ("bf16", "mxfp8")  # "mxfp8": fp32 math on the codec's MXFP8 round trip of each GEMM input
    activation_names = {"bf16": "W4A16", "mxfp8": MoEBackend.W4A8_EMULATION}
    activations = "bf16"  # set by the MoE method from the serve settings, with the model's codec profile
    profile: str | None = None

    @classmethod
    def supports(cls, device: DeviceInfo) -> tuple[bool, str]:
        return True, ""  # plain torch: runs wherever torch does (slowly on GPUs: it is the oracle, not a kernel)

    def apply(self, layer, x, topk_weights, topk_ids, activation, expert_map, apply_router_weight_on_input=False):
        lora = expert_lora.factors(layer)
        extra = {} if lora is None else {"lora13_a": lora.a13, "lora13_b": lora.b13, "lora2_a": lora.a2,
                                         "lora2_b": lora.b2, "lora_rank": lora.rank, "lora_scaling": lora.scaling}
        return cpu_reference_moe(
            x, topk_weights, topk_ids, layer.w13_weight, layer.w13_weight_scale, layer.w2_weight,
            layer.w2_weight_scale, getattr(layer, P.W13_BIAS, None), getattr(layer, P.W2_BIAS, None), expert_map,
            activation.name, float(activation.alpha), None if activation.limit is None else float(activation.limit),
            bool(apply_router_weight_on_input),
            **extra, act_quant=act_quant_profile(self, layer))

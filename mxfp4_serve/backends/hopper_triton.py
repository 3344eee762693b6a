"""SM90 backend: the Triton grouped GEMMs of `common.grouped_gemm`, which dequantize the packed MXFP4 weight tiles
in registers (no bf16 weight buffer). The canonical vLLM parameters are already the kernels' layout, so `prepare`
has nothing to convert and weight sync writes straight into them. `moe_layer_forward` routes with a Triton counting
sort and fuses the token gather into the first GEMM and the router-weighted scatter into the second; nothing issues
a host sync, so the backend runs under CUDA graphs.
"""

from __future__ import annotations

import torch

from .base import GPT_OSS_ALPHA, GPT_OSS_LIMIT, ActivationSpec, DeviceInfo, MoEBackend

# ActivationSpec name -> common.grouped_gemm activation name. The kernels bake gpt-oss's alpha and limit in.
_KERNEL_ACTIVATION = {"silu": "silu", "swigluoai": "swiglu_oai"}


class HopperTritonBackend(MoEBackend):
    name = "hopper_triton"
    min_capability = (9, 0)

    @classmethod
    def supports(cls, device: DeviceInfo) -> tuple[bool, str]:
        if device.kind != "cuda" or device.capability is None:
            return False, "needs a CUDA device of capability >= sm90"
        if device.capability < cls.min_capability:
            return False, f"needs capability >= sm90 (its tile configs assume Hopper shared memory), got {device}"
        try:
            import triton  # noqa: F401
        except ImportError as exc:  # pragma: no cover - vLLM's CUDA wheels bring triton
            return False, f"triton is not importable: {exc}"
        return True, ""

    def apply(self, layer, x, topk_weights, topk_ids, activation: ActivationSpec, expert_map,
              apply_router_weight_on_input=False):
        from common.grouped_gemm import moe_layer_forward

        if apply_router_weight_on_input:
            raise NotImplementedError("MXFP4 MoE backend 'hopper_triton' does not apply router weights on the input "
                                      "(llama4-style); set MXFP4_RL_MOE_BACKEND=cpu_reference for such models")
        if activation.name == "swigluoai" and (activation.alpha, activation.limit) != (GPT_OSS_ALPHA, GPT_OSS_LIMIT):
            raise NotImplementedError(f"MXFP4 MoE backend 'hopper_triton' implements clamp-swiglu with alpha "
                                      f"{GPT_OSS_ALPHA}, limit {GPT_OSS_LIMIT}; the model asks for alpha "
                                      f"{activation.alpha}, limit {activation.limit}")
        ids, weights = topk_ids, topk_weights
        if expert_map is not None:
            # EP: experts of other ranks map to -1; route them to local expert 0 with weight 0 (their rows are
            # computed and dropped), which keeps every shape static for CUDA graphs.
            local = expert_map.to(ids.device)[ids.long()]
            weights = torch.where(local < 0, torch.zeros_like(weights), weights)
            ids = local.clamp_min(0)
        # The kernels take bf16 activations; other engine dtypes round-trip through bf16.
        out = moe_layer_forward(
            x.to(torch.bfloat16), ids, weights.float(), (layer.w13_weight, layer.w13_weight_scale),
            (layer.w2_weight, layer.w2_weight_scale), activation=_KERNEL_ACTIVATION[activation.name],
            bias13=getattr(layer, "w13_bias", None), bias2=getattr(layer, "w2_bias", None))
        return out.to(x.dtype)

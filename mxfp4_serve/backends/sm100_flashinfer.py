"""SM100 (B200/GB200) backend: FlashInfer's TRT-LLM-gen MXFP4 MoE, with bf16 (W4A16) or MXFP8 (W4A8) activations.

Implemented against flashinfer-python 0.7.2 (`trtllm_fp4_block_scale_routed_moe`: the routed variant of
`trtllm_fp4_block_scale_moe`, because vLLM hands our method already-routed top-k ids/weights) and NOT RUN on a B200:
no SM100 GPU is lent to this project. What was verified, on an H100 with FlashInfer's own helpers, is the weight
layout (common/layouts/flashinfer_trtllm.py, byte for byte) and the MXFP8 activation quantizer (docs/backends.md).

Weights: `prepare` rewrites the canonical packed parameters in place into the kernel layout (same shapes, same
storage, so layerwise reload and CUDA graphs stay valid); `prepare_experts` does it for the experts a refit touched.
Activations in MXFP8 mode are quantized by OUR codec with the model's profile, so the learner, which fake-quantizes
expert inputs with the same `common.fake_quant_mxfp8`, sees exactly what the experts saw.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import torch

from common import moe, quantize_mxfp8
from common.moe import params as P

from .base import ActivationSpec, DeviceInfo, MoEBackend

ACTIVATION_MODES = ("bf16", "mxfp8")
KERNEL = "trtllm_fp4_block_scale_routed_moe"
SWIGLU = 3  # flashinfer ActivationType.Swiglu: silu and gpt-oss's clamped swiglu (via alpha/beta/limit)
RENORMALIZE = 1  # RoutingMethodType.Renormalize: ignored with pre-computed routing, must be a supported value


def flashinfer_kernel():
    """FlashInfer's routed MXFP4 MoE entry point, imported only when asked for (no import cost elsewhere)."""
    module = importlib.import_module("flashinfer.fused_moe")
    return getattr(module, KERNEL)


def flashinfer_status() -> tuple[bool, str]:
    try:
        flashinfer_kernel()
    except ImportError as exc:
        return False, f"flashinfer is not importable ({exc}); install flashinfer-python (>= 0.7) on the B200 host"
    except AttributeError:
        return False, f"the installed flashinfer has no fused_moe.{KERNEL} (needs flashinfer-python >= 0.7)"
    return True, ""


def local_expert_range(expert_map: torch.Tensor | None, num_local: int) -> tuple[int, int]:
    """(global expert count, offset of this rank's first expert). The kernel takes one contiguous block of
    local experts, [offset, offset + num_local), numbered in order: vLLM's linear EP placement."""
    if expert_map is None:
        return num_local, 0
    m = expert_map.detach().cpu()
    owned = (m >= 0).nonzero().flatten()
    if owned.numel() != num_local:
        raise ValueError(f"expert_map gives this rank {owned.numel()} experts but the layer holds {num_local}")
    offset = int(owned[0]) if num_local else 0
    if not torch.equal(owned, torch.arange(offset, offset + num_local)) or \
            not torch.equal(m[owned], torch.arange(num_local)):
        raise ValueError("sm100_flashinfer needs the local experts to be one contiguous, ordered block of global "
                         "ids (vLLM's linear expert placement); got a round-robin/EPLB map")
    return m.numel(), offset


def quantize_activations(x: torch.Tensor, mode: str, profile: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden_states, hidden_states_scale) as the kernel takes them: bf16 and None, or MXFP8 e4m3 elements and
    [T, H/32] E8M0 bytes (linear layout, viewed as float8_e4m3fn as vLLM passes them) from our codec."""
    if mode == "bf16":
        return x.to(torch.bfloat16).contiguous(), None
    if profile is None:
        raise ValueError("MXFP8 activations need the model's codec profile (layer.mxfp4_rl_profile or the backend's "
                         "profile argument); none was given")
    elements, scales = quantize_mxfp8(x, profile=profile, name="moe hidden_states")
    return elements, scales.view(torch.float8_e4m3fn)


def activation_params(act: ActivationSpec, num_local: int, device: torch.device) -> dict[str, torch.Tensor | None]:
    """Per-expert SwiGLU parameters of the TRT-LLM kernel, which computes clamp-then-gate
    x_glu * sigmoid(alpha * x_glu) * (x_linear + beta) with x_glu clamped above and x_linear on both sides at
    clamp_limit (FlashInfer's trtllm_fp4_block_scale_moe: gemm1_alpha / gemm1_beta / gemm1_clamp_limit, float32
    [num_experts]). silu: none (plain silu(gate) * up). gpt-oss swigluoai: alpha, beta = 1 (the `up + 1`) and its
    limit, as vLLM's TRTLLM path sets them. DeepSeek-V4's silu_clamp: alpha 1 and beta 0 (given explicitly, not left
    to the kernel's defaults) with the model's limit: silu(min(gate, L)) * clamp(up, -L, L); vLLM 0.32's own
    DeepSeek-V4 MXFP4 TRTLLM path passes the same limit as gemm1_clamp_limit. Not yet run on a B200."""
    if act.name == "silu":
        return {"gemm1_alpha": None, "gemm1_beta": None, "gemm1_clamp_limit": None}
    full = lambda v: torch.full((num_local,), float(v), dtype=torch.float32, device=device)  # noqa: E731
    if act.name == "silu_clamp":
        return {"gemm1_alpha": full(1.0), "gemm1_beta": full(0.0), "gemm1_clamp_limit": full(act.limit)}
    return {"gemm1_alpha": full(act.alpha), "gemm1_beta": full(1.0), "gemm1_clamp_limit": full(act.limit)}


def _bias(layer: torch.nn.Module, name: str) -> torch.Tensor | None:
    b = getattr(layer, name, None)
    return None if b is None else b.float()  # the kernel takes fp32 biases; the parameter keeps its dtype


class SM100FlashInferBackend(MoEBackend):
    """activations: "bf16" (W4A16) or "mxfp8" (W4A8, activations quantized by common.quantize_mxfp8 with profile,
    or with `layer.mxfp4_rl_profile` when profile is None)."""

    name = "sm100_flashinfer"
    lora_refusal = ("FlashInfer's TRT-LLM MoE computes both expert GEMMs and the activation in one kernel, so the "
                    "gate/up adapter term (added before the nonlinear activation) has no place to go; serve expert "
                    "LoRA with MXFP4_RL_MOE_BACKEND=hopper_triton (Triton, runs on sm90 and sm100)")

    activation_modes = ACTIVATION_MODES

    def __init__(self, activations: str = "bf16", profile: str | None = None) -> None:
        if activations not in ACTIVATION_MODES:
            raise ValueError(f"sm100_flashinfer: unknown activation mode {activations!r}; expected one of "
                             f"{ACTIVATION_MODES}")
        self.activations = activations
        self.profile = profile

    @classmethod
    def supports(cls, device: DeviceInfo) -> tuple[bool, str]:
        if device.kind != "cuda" or device.capability is None:
            return False, f"needs a CUDA device of capability 10.x (B200/GB200), got {device}"
        if device.capability[0] != 10:
            return False, f"FlashInfer's TRT-LLM-gen MXFP4 MoE kernels run on capability 10.x only, got {device}"
        return flashinfer_status()

    # ---- weights: canonical bytes in, FlashInfer's TRT-LLM-gen layout kept (common.moe.FLASHINFER_TRTLLM) ----
    layout = moe.FLASHINFER_TRTLLM

    def prepare_experts(self, layer: torch.nn.Module, expert_ids: Sequence[int] | None) -> None:
        """Convert the canonical bytes of the given local experts (all when None) to the kernel layout in place.
        Run it once after every write of canonical bytes: converting twice scrambles the layout."""
        params = moe.layouts.layer_params(layer)
        ids = None if expert_ids is None else torch.as_tensor(list(expert_ids), dtype=torch.long)
        self.layout.to_layout(params, ids)

    # ---- compute ----
    def apply(self, layer, x, topk_weights, topk_ids, activation, expert_map, apply_router_weight_on_input=False):
        kernel = flashinfer_kernel()
        num_local = layer.w13_weight.shape[0]
        num_global, offset = local_expert_range(expert_map, num_local)
        if apply_router_weight_on_input:  # llama4-style: only meaningful for top-1, as in vLLM's fused MoE
            if topk_ids.shape[-1] != 1:
                raise ValueError("apply_router_weight_on_input needs top_k == 1")
            x = x * topk_weights.to(x.dtype)
            topk_weights = torch.ones_like(topk_weights)
        profile = self.profile or getattr(layer, "mxfp4_rl_profile", None)
        hidden, hidden_scale = quantize_activations(x, self.activations, profile)
        out = kernel(
            topk_ids=(topk_ids.to(torch.int32), topk_weights.float()),
            routing_bias=None, hidden_states=hidden, hidden_states_scale=hidden_scale,
            gemm1_weights=layer.w13_weight, gemm1_weights_scale=layer.w13_weight_scale.view(torch.float8_e4m3fn),
            gemm1_bias=_bias(layer, P.W13_BIAS),
            gemm2_weights=layer.w2_weight, gemm2_weights_scale=layer.w2_weight_scale.view(torch.float8_e4m3fn),
            gemm2_bias=_bias(layer, P.W2_BIAS),
            output1_scale_scalar=None, output1_scale_gate_scalar=None, output2_scale_scalar=None,
            num_experts=num_global, top_k=topk_ids.shape[-1], n_group=None, topk_group=None,
            intermediate_size=layer.w13_weight.shape[1] // 2, local_expert_offset=offset,
            local_num_experts=num_local, routed_scaling_factor=None, routing_method_type=RENORMALIZE,
            do_finalize=True, activation_type=SWIGLU,
            **activation_params(activation, num_local, x.device),
        )
        out = out[0] if isinstance(out, (list, tuple)) else out
        return out.to(x.dtype)


__all__ = ["ACTIVATION_MODES", "SM100FlashInferBackend", "flashinfer_status", "local_expert_range"]

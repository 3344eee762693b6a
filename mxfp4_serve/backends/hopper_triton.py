"""SM90 backend: the Triton grouped GEMMs of `common.grouped_gemm`, which dequantize the packed MXFP4 weight tiles
in registers (no bf16 weight buffer). `prepare` rewrites the code bytes of w13/w2 in place into the kb-major order
of common/grouped_gemm/layout.py (the parameters keep their shapes and storage; the scales stay canonical), which
the forward GEMMs read without shared-memory bank conflicts. Weight sync goes through `read_canonical` /
`write_experts`, which translate per expert. A layer whose scale bytes are all <= 128 at load runs the word decode
with one multiply per weight pair (ENV_ONE_MUL; a later sync that brings a larger byte is refused, not served
wrong). `moe_layer_forward` routes with a Triton counting sort and fuses the
token gather into the first GEMM and the router-weighted scatter into the second; nothing issues a host sync, so
the backend runs under CUDA graphs. At prefill sizes (from 704 rows per expert, MXFP4_RL_HOPPER_PREFILL) the same
entry point dequantizes the experts into a bounded bf16 scratch and runs cuBLAS's grouped GEMM instead
(common/grouped_gemm/dense.py): 0.70x the fused layer's time at 8192 tokens of DeepSeek-V4-Flash on an H100.
"""

from __future__ import annotations

import torch

from common import envs, moe
from common.moe import params as P

from .. import expert_lora
from .base import ActivationSpec, DeviceInfo, MoEBackend, act_quant_profile

# set on a layer whose scale bytes were all <= 128 at load: the word decode then applies 2^126 and the scale with
# one multiply (common.grouped_gemm max_scale_byte; 9% faster layer at DeepSeek-V4-Flash decode sizes on an H100)
_ONE_MUL = "_mxfp4_rl_one_mul"
ENV_ONE_MUL = envs.HOPPER_ONE_MUL.name


def one_mul_enabled() -> bool:
    """common.envs.HOPPER_ONE_MUL: 1 (default) lets layers whose scale bytes are all <= 128 at load run the
    one-multiply word decode; 0 always keeps two multiplies (an engine that must accept any weight a sync brings)."""
    return envs.HOPPER_ONE_MUL.get()


class HopperTritonBackend(MoEBackend):
    name = "hopper_triton"
    serves_lora = True  # the learner's LoRA kernels (common/grouped_gemm/lora.py) around the same GEMMs
    min_capability = (9, 0)
    # "mxfp8" is an emulation here: bf16 MMAs on the codec's MXFP8 round trip of each GEMM input (what a W4A8
    # sm100_flashinfer engine and the learner's act_quant feed the experts), not MXFP8 MMAs
    activation_modes = ("bf16", "mxfp8")
    activation_names = {"bf16": "W4A16", "mxfp8": MoEBackend.W4A8_EMULATION}
    activations = "bf16"  # set by the MoE method from the serve settings, with the model's codec profile
    profile: str | None = None

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

    # ---- weights: canonical bytes in, kb-major codes kept (common.moe.KB_MAJOR) ----
    layout = moe.KB_MAJOR

    def prepare(self, layer: torch.nn.Module) -> None:
        from common.grouped_gemm.ops import ONE_MUL_MAX_SCALE_BYTE

        if moe.layout_of(layer) is self.layout:
            raise RuntimeError("hopper_triton: prepare() ran twice on one layer (its codes are already kb-major); "
                               "write new canonical bytes through write_experts")
        super().prepare(layer)
        # One host read of the largest scale byte, at load (never on the forward path, which CUDA graphs capture).
        largest = max(int(getattr(layer, moe.scale_name(n)).max()) for n in moe.PACKED_WEIGHTS)
        setattr(layer, _ONE_MUL, one_mul_enabled() and largest <= ONE_MUL_MAX_SCALE_BYTE)

    def _check_prepared(self, layer: torch.nn.Module) -> None:
        if moe.layout_of(layer) is not self.layout:
            raise RuntimeError("hopper_triton: the layer's codes were never converted (prepare() did not run); "
                               "the MoE method's process_weights_after_loading calls it")

    def read_canonical(self, layer: torch.nn.Module, param_name: str) -> torch.Tensor:
        self._check_prepared(layer)
        return super().read_canonical(layer, param_name)

    def write_experts(self, layer: torch.nn.Module, param_name: str, local_experts: torch.Tensor,
                      values: torch.Tensor) -> None:
        self._check_prepared(layer)
        super().write_experts(layer, param_name, local_experts, values)

    def check_values(self, layer: torch.nn.Module, param_name: str, values: torch.Tensor) -> None:
        """Refuse scale bytes that the layer's one-multiply decode would overflow."""
        from common.grouped_gemm.ops import ONE_MUL_MAX_SCALE_BYTE

        if param_name.endswith("_scale") and getattr(layer, _ONE_MUL, False) and values.numel():
            largest = int(values.max())
            if largest > ONE_MUL_MAX_SCALE_BYTE:
                raise moe.wire.SyncError(
                    f"hopper_triton: the new '{param_name}' holds scale byte {largest} (> {ONE_MUL_MAX_SCALE_BYTE}: "
                    f"weight blocks with |w| >= 16); this engine was loaded with every scale byte <= "
                    f"{ONE_MUL_MAX_SCALE_BYTE} and runs (and has captured CUDA graphs of) the one-multiply decode, "
                    f"which would overflow. Nothing was written; restart the engine with {ENV_ONE_MUL}=0 to serve "
                    f"such weights")

    def activation_refusal(self, activation: ActivationSpec) -> str:
        """The kernels take silu_clamp's limit as an argument but compile gpt-oss's swigluoai constants in."""
        if activation.fused_in_kernels:
            return ""
        return (f"its kernels implement clamp-swiglu with alpha {moe.SWIGLU_ALPHA}, limit {moe.SWIGLU_LIMIT}; the "
                f"model asks for alpha {activation.alpha}, limit {activation.limit}")

    def apply(self, layer, x, topk_weights, topk_ids, activation: ActivationSpec, expert_map,
              apply_router_weight_on_input=False):
        from common.grouped_gemm import moe_layer_forward
        from common.grouped_gemm.layout import kb_major_view
        from common.grouped_gemm.ops import ONE_MUL_MAX_SCALE_BYTE

        if apply_router_weight_on_input:
            raise NotImplementedError("MXFP4 MoE backend 'hopper_triton' does not apply router weights on the input "
                                      "(llama4-style); set MXFP4_RL_MOE_BACKEND=cpu_reference for such models")
        if not activation.fused_in_kernels:
            raise NotImplementedError(f"MXFP4 MoE backend 'hopper_triton' implements clamp-swiglu with alpha "
                                      f"{moe.SWIGLU_ALPHA}, limit {moe.SWIGLU_LIMIT}; the model asks for alpha "
                                      f"{activation.alpha}, limit {activation.limit}")
        ids, weights = topk_ids, topk_weights
        if expert_map is not None:
            # EP: experts of other ranks map to -1; route them to local expert 0 with weight 0 (their rows are
            # computed and dropped), which keeps every shape static for CUDA graphs.
            local = expert_map.to(ids.device)[ids.long()]
            weights = torch.where(local < 0, torch.zeros_like(weights), weights)
            ids = local.clamp_min(0)
        self._check_prepared(layer)
        w13 = kb_major_view(layer.w13_weight.data, P.W13)
        w2 = kb_major_view(layer.w2_weight.data, P.W2)
        # The kernels take bf16 activations; other engine dtypes round-trip through bf16.
        out = moe_layer_forward(
            x.to(torch.bfloat16), ids, weights.float(), (w13, layer.w13_weight_scale),
            (w2, layer.w2_weight_scale), activation=activation.kernel_name, limit=activation.kernel_limit,
            max_scale_byte=ONE_MUL_MAX_SCALE_BYTE if getattr(layer, _ONE_MUL, False) else None,
            bias13=getattr(layer, P.W13_BIAS, None), bias2=getattr(layer, P.W2_BIAS, None),
            lora=self._lora(layer), act_quant=act_quant_profile(self, layer))
        return out.to(x.dtype)

    @staticmethod
    def _lora(layer: torch.nn.Module):
        # the full max-rank factors, always (zero until a sync): the same kernels run before and after the first
        # adapter arrives, so captured CUDA graphs stay valid; the zero rank columns add exact zeros. The bf16
        # kernel copies (expert_lora.refresh): the operands the kernels would round the fp32 buffers to on every
        # call (four launches), rounded once per sync instead
        lora = expert_lora.factors(layer)
        return None if lora is None else (*lora.kernel, lora.scaling)

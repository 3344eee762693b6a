"""`mxfp4_rl`: the vLLM QuantizationConfig of this plugin. It owns only the routed experts.

Every other layer gets the method it would have had without us: the delegate config's method when the checkpoint
names one (e.g. vLLM's FP8 block method for DeepSeek-V4 dense weights, `"delegate": {"quant_method": "fp8", ...}`
in our quantization_config), else vLLM's UnquantizedLinearMethod for linear layers and vLLM's defaults (None) for
the rest (embeddings, attention).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from common.checkpoint import deepseek_v4 as ds
from common.checkpoint import validate

from . import compat
from .moe_method import make_moe_method
from .settings import (
    QUANT_METHOD,
    ServeSettings,
    claims_checkpoint,
    settings_for_online,
    settings_from_quant_config,
)

logger = logging.getLogger(__name__)


class MXFP4RLConfig(QuantizationConfig):
    def __init__(self, settings: ServeSettings | None = None) -> None:
        super().__init__()
        # No quantization_config anywhere (bf16 checkpoint + --quantization mxfp4_rl): vLLM calls cls() -> online.
        self.settings = settings if settings is not None else settings_for_online()
        self.delegate = self._make_delegate(self.settings.delegate)
        block = getattr(self.delegate, "weight_block_size", None)
        if block is not None:
            # model code reads the FP8 block shape off the model's quant config (vLLM's DeepSeek-V4 pads its shared
            # expert's intermediate size to whole blocks by it): the delegate's, as without us
            self.weight_block_size = block
        logger.info("mxfp4_rl: profile %r, format %r, delegate %s", self.settings.profile, self.settings.fmt,
                    type(self.delegate).__name__ if self.delegate else "none (unquantized)")

    @staticmethod
    def _make_delegate(cfg) -> QuantizationConfig | None:
        if cfg is None:
            return None
        return compat.quantization_config_class(cfg["quant_method"]).from_config(dict(cfg))

    # ---- vLLM's QuantizationConfig interface ----
    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # the CPU reference backend runs anywhere; faster backends check capability in the oracle

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config (or the environment for online mode)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "MXFP4RLConfig":
        out = cls(settings_from_quant_config(config))
        out.raw_quant_config = dict(config)
        return out

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None, **_: Any) -> None:
        """vLLM's hook with the model path, called before any weight is loaded: an mxfp4_rl checkpoint on local disk
        passes the header validation of inspect and the learner's loader (format vs model_type, codec_version,
        code/scale pairs, expert shapes and ids against config.json), so a bad one never starts an engine."""
        lora = self.settings.expert_lora
        if lora is not None and lora.adapter is not None and not os.path.isabs(lora.adapter):
            # a served adapter named relative to the checkpoint (enable_expert_lora writes it so)
            resolved = dataclasses.replace(lora, adapter=os.path.join(str(model_name), lora.adapter))
            self.settings = dataclasses.replace(self.settings, expert_lora=resolved)
        if self.settings.online:
            return  # bf16 experts: the loader quantizes and checks every tensor as it arrives
        if (getattr(self, "raw_quant_config", None) or {}).get("quant_method") in ds.FP8_METHODS:
            self._check_deepseek_v4(model_name, hf_config)  # DeepSeek's own layout, not an mxfp4_rl checkpoint
            return
        if not os.path.isfile(os.path.join(str(model_name), "config.json")):
            # a hub id (no local files to read ahead): what the config alone proves, format against the model's
            # architecture included; the loader checks every tensor as it arrives
            raw = getattr(self, "raw_quant_config", None)
            if raw is not None and raw.get("quant_method") == QUANT_METHOD:
                validate.check_quant_config(raw, model_type=getattr(hf_config, "model_type", None))
            return
        config = validate.read_config(model_name)
        if (config.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD:
            validate.validate_checkpoint(model_name, strict=False)  # the loader names missing / mistyped tensors

    @staticmethod
    def _check_deepseek_v4(model_name: str, hf_config) -> None:
        """A shipped DeepSeek-V4 checkpoint (settings.deepseek_v4_settings): the model really is one, and on local
        disk its headers pass common.checkpoint.deepseek_v4.validate_shipped (experts int8 + e8m0 pairs, shapes and
        ids against config.json), so a bad one never starts an engine."""
        model_type = getattr(hf_config, "model_type", None)
        if hf_config is not None and model_type != ds.MODEL_TYPE:
            raise ValueError(f"mxfp4_rl: an FP8 quantization_config is served as DeepSeek-V4's shipped layout only; "
                             f"this model's model_type is {model_type!r}")
        if os.path.isfile(os.path.join(str(model_name), "config.json")):
            ds.validate_shipped(model_name)

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None) -> str | None:
        model_type = getattr(hf_config, "model_type", None)
        expert_dtype = getattr(hf_config, "expert_dtype", None)
        return QUANT_METHOD if claims_checkpoint(hf_quant_cfg, user_quant, model_type, expert_dtype) else None

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if compat.is_moe_layer(layer):
            return make_moe_method(layer.moe_config, self.settings)
        if self.delegate is not None:
            # vLLM sets the model's fused-module names on the config it built (ours); the delegate's
            # ignored-layer matching needs them
            self.delegate.packed_modules_mapping = self.packed_modules_mapping
            return self.delegate.get_quant_method(layer, prefix)
        if compat.is_linear_layer(layer):
            return compat.unquantized_linear_method()
        return None

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        if self.delegate is not None:
            self.delegate.apply_vllm_mapper(hf_to_vllm_mapper)

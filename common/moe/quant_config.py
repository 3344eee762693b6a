"""The `quantization_config` an mxfp4_rl checkpoint carries in its config.json: written by the converter
(common.checkpoint), read by the engine plugin (mxfp4_serve.settings) and the learner's loader.

    {"quant_method": "mxfp4_rl", "profile": <codec profile>, "format": "native" | "gpt-oss" | "deepseek-v4",
     "block_size": 32, "codec_version": 1, "delegate": {<the source checkpoint's own quantization_config>},
     "expert_lora": {"max_rank": R, "scaling": s[, "adapter": dir]}}   # optional: serve expert adapters unmerged

`delegate` is the method every non-expert layer keeps (e.g. DeepSeek-V4's FP8 block config of its dense layers):
the converter records the source checkpoint's config under it and the engine hands those layers to that method.
Checkpoints written before this contract recorded it as `source_quantization_config`; `delegate_config` reads both.
`expert_lora` makes the engine keep per-expert LoRA factors (rank <= max_rank, zero at start: the un-adapted engine
is bitwise the base) that syncs update in place; `scaling` (alpha / r, or alpha / sqrt(r) with rslora) is fixed at
engine start because the engine's captured CUDA graphs bake it in, so a learner with another scaling is refused.
`adapter` (optional) names a PEFT adapter directory (mxfp4_train.adapters.save_adapters; relative paths are relative
to the checkpoint) whose expert factors the engine serves from the start: `vllm serve` of base + adapter.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from ..constants import BLOCK_SIZE

QUANT_METHOD = "mxfp4_rl"
CODEC_VERSION = 1  # bump when the bytes quantize() writes for some input change
DELEGATE_KEY = "delegate"
LEGACY_DELEGATE_KEYS = ("source_quantization_config",)  # mxfp4-rl converters before the contract module


def quantization_config(profile: str, fmt: str, delegate: Mapping[str, Any] | None = None) -> dict:
    """The checkpoint's quantization_config; delegate: the source checkpoint's own config (non-expert layers)."""
    cfg = {"quant_method": QUANT_METHOD, "profile": profile, "format": fmt, "block_size": BLOCK_SIZE,
           "codec_version": CODEC_VERSION}
    if delegate:
        cfg[DELEGATE_KEY] = dict(delegate)
    return cfg


def delegate_config(cfg: Mapping[str, Any]) -> dict | None:
    """The delegate method's config recorded in an mxfp4_rl quantization_config, or None (unquantized layers)."""
    for key in (DELEGATE_KEY, *LEGACY_DELEGATE_KEYS):
        value = cfg.get(key)
        if value:
            if not isinstance(value, Mapping):
                raise ValueError(f"mxfp4_rl quantization_config: {key!r} must be a quantization_config dict, got "
                                 f"{type(value).__name__}")
            return dict(value)
    return None


EXPERT_LORA_KEY = "expert_lora"


@dataclasses.dataclass(frozen=True)
class ExpertLoRAConfig:
    """The engine's expert-LoRA capacity: factors of rank up to max_rank, applied with one fixed scaling."""

    max_rank: int
    scaling: float
    adapter: str | None = None  # PEFT adapter directory served from the start

    def __post_init__(self) -> None:
        if not isinstance(self.max_rank, int) or isinstance(self.max_rank, bool) or not 0 < self.max_rank <= 1024:
            raise ValueError(f"mxfp4_rl quantization_config '{EXPERT_LORA_KEY}': max_rank must be an int in "
                             f"[1, 1024], got {self.max_rank!r}")
        if not isinstance(self.scaling, (int, float)) or not math.isfinite(self.scaling) or self.scaling == 0:
            raise ValueError(f"mxfp4_rl quantization_config '{EXPERT_LORA_KEY}': scaling must be a finite nonzero "
                             f"number, got {self.scaling!r}")

    def as_dict(self) -> dict:
        out = {"max_rank": self.max_rank, "scaling": float(self.scaling)}
        if self.adapter is not None:
            out["adapter"] = self.adapter
        return out


def expert_lora_config(cfg: Mapping[str, Any]) -> ExpertLoRAConfig | None:
    """The `expert_lora` entry of an mxfp4_rl quantization_config, checked, or None (adapters not served)."""
    value = cfg.get(EXPERT_LORA_KEY)
    if value is None:
        return None
    if not isinstance(value, Mapping) or not {"max_rank", "scaling"} <= set(value) <= {"max_rank", "scaling",
                                                                                          "adapter"}:
        raise ValueError(f"mxfp4_rl quantization_config '{EXPERT_LORA_KEY}' must be {{'max_rank': int, 'scaling': "
                         f"float[, 'adapter': str]}}, got {value!r}")
    adapter = value.get("adapter")
    if adapter is not None and not isinstance(adapter, str):
        raise ValueError(f"mxfp4_rl quantization_config '{EXPERT_LORA_KEY}': 'adapter' must be a directory path, got "
                         f"{adapter!r}")
    return ExpertLoRAConfig(value["max_rank"], float(value["scaling"]), adapter)

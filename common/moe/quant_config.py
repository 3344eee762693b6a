"""The `quantization_config` an mxfp4_rl checkpoint carries in its config.json: written by the converter
(common.checkpoint), read by the engine plugin (mxfp4_serve.settings) and the learner's loader.

    {"quant_method": "mxfp4_rl", "profile": <codec profile>, "format": "native" | "gpt-oss" | "deepseek-v4",
     "block_size": 32, "codec_version": 1, "delegate": {<the source checkpoint's own quantization_config>}}

`delegate` is the method every non-expert layer keeps (e.g. DeepSeek-V4's FP8 block config of its dense layers):
the converter records the source checkpoint's config under it and the engine hands those layers to that method.
Checkpoints written before this contract recorded it as `source_quantization_config`; `delegate_config` reads both.
"""

from __future__ import annotations

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

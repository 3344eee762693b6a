"""Entry point `vllm.general_plugins: mxfp4_rl = mxfp4_serve.plugin:register`.

vLLM calls it in every process it starts (API server, engine core, workers), so it must be idempotent and cheap.
"""

from __future__ import annotations

import os

from .settings import QUANT_METHOD

_registered = False
# vLLM's gpt-oss loader bypasses per-expert weight loaders; ours routes fused expert tensors (see models/gpt_oss.py).
MODEL_OVERRIDES = {"GptOssForCausalLM": "mxfp4_serve.models.gpt_oss:MXFP4GptOssForCausalLM"}


def _configure_logging() -> None:
    """Our loggers in a vLLM process: MXFP4_RL_LOG_LEVEL, else the level vLLM logs at (VLLM_LOGGING_LEVEL, INFO by
    default), so an engine told to be quiet (our demo's, `mxfp4-rl -q`) is quiet about the plugin too."""
    from common.log import apply_env

    apply_env(default=os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper())


def register() -> None:
    """Register the `mxfp4_rl` quantization config, the model overrides and the `mxfp4_rl` weight-transfer engine
    with vLLM (once per process)."""
    global _registered
    if _registered:
        return
    from . import compat
    from .config import MXFP4RLConfig

    _configure_logging()
    compat.register_quantization_config(QUANT_METHOD)(MXFP4RLConfig)
    for arch, target in MODEL_OVERRIDES.items():
        compat.register_model(arch, target)
    from .sync import transfer_engine

    transfer_engine.register()
    _registered = True

"""What the engine plugin was asked to serve: profile, checkpoint format, backend override, delegate method.

Read once from the checkpoint's `quantization_config` (or, for a bf16 checkpoint served with
`--quantization mxfp4_rl`, from the environment) and validated here, so that the config and method classes stay
thin glue. No vLLM import: unit tests construct these without an engine.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from common import envs, get_profile
from common.checkpoint import deepseek_v4 as ds
from common.checkpoint.validate import check_quant_config
from common.moe.quant_config import QUANT_METHOD, ExpertLoRAConfig, delegate_config, expert_lora_config

logger = logging.getLogger(__name__)

# Checkpoint expert layouts (docs/serve.md, "What it serves"). "bf16" = unquantized experts that the
# plugin quantizes at load with the codec (online mode).
FORMATS = ("native", "gpt-oss", "deepseek-v4", "bf16")
# quant_method names of other tools' MXFP4 checkpoints, claimed only when the user passes --quantization mxfp4_rl.
FOREIGN_MXFP4_METHODS = ("mxfp4", "gpt_oss_mxfp4")
# Model types whose routed experts this plugin serves.
SUPPORTED_MODEL_TYPES = ("qwen3_moe", "gpt_oss", "deepseek_v3", "deepseek_v4")
# Model types whose other-tool MXFP4 checkpoints (quant_method "mxfp4") we claim, and the layout they use.
FOREIGN_FORMAT_BY_MODEL_TYPE = {"gpt_oss": "gpt-oss"}
# DeepSeek-V4 as DeepSeek ships it (common/checkpoint/deepseek_v4.py): config.json's quantization_config is the FP8
# block config of the DENSE layers ("fp8", or vLLM's name "deepseek_v4_fp8"), the experts are MXFP4 through
# `expert_dtype` "fp4". Claimed on an explicit --quantization mxfp4_rl like gpt-oss's; the dense layers go to vLLM's
# own DeepSeek-V4 FP8 method (its ue8m0 scale handling), the experts' bytes to our MoE method as shipped.
DEEPSEEK_V4_DELEGATE_METHOD = "deepseek_v4_fp8"

ENV_PROFILE = envs.PROFILE.name
ENV_BACKEND = envs.MOE_BACKEND.name
ENV_ACTIVATIONS = envs.MOE_ACTIVATIONS.name
ACTIVATION_MODES = envs.MOE_ACTIVATIONS.choices
# Used only when the user explicitly asked for --quantization mxfp4_rl and named no profile; logged when chosen.
EXPLICIT_REQUEST_PROFILE = "flashinfer"


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """profile: codec profile name (common.profile_names()); fmt: one of FORMATS; backend: explicit MoE backend
    name or None for the capability-based choice; delegate: the quantization_config of the method that non-expert
    layers get (None = unquantized, i.e. what vLLM would give them without us)."""

    profile: str
    fmt: str = "native"
    backend: str | None = None
    delegate: Mapping[str, Any] | None = None
    activations: str = "bf16"  # expert-input format: "bf16" (W4A16) or "mxfp8" (W4A8, B200 backend)
    # expert adapters served unmerged (quantization_config "expert_lora"; mxfp4_serve.expert_lora), or None
    expert_lora: ExpertLoRAConfig | None = None

    def __post_init__(self) -> None:
        get_profile(self.profile)  # raises UnknownProfileError listing the known profiles
        if self.activations not in ACTIVATION_MODES:
            raise ValueError(f"mxfp4_rl: unknown expert activation format {self.activations!r}; expected one of "
                             f"{ACTIVATION_MODES} (quantization_config 'activations' or ${ENV_ACTIVATIONS})")
        if self.fmt not in FORMATS:
            raise ValueError(f"mxfp4_rl quantization_config: unknown format {self.fmt!r}; expected one of {FORMATS}")
        if self.delegate is not None and "quant_method" not in self.delegate:
            raise ValueError(f"mxfp4_rl quantization_config: delegate {dict(self.delegate)!r} has no 'quant_method'")

    @property
    def online(self) -> bool:
        """True when expert weights arrive in bf16 and are quantized at load."""
        return self.fmt == "bf16"


def _backend_override(cfg: Mapping[str, Any]) -> str | None:
    return envs.MOE_BACKEND.get() or cfg.get("moe_backend") or None


def _activations(cfg: Mapping[str, Any]) -> str:
    # the raw value: a bad one is refused by ServeSettings, naming the checkpoint key and the variable
    return envs.MOE_ACTIVATIONS.raw() or cfg.get("activations") or "bf16"


def settings_from_quant_config(cfg: Mapping[str, Any]) -> ServeSettings:
    """Settings from a checkpoint's (or --hf-overrides') quantization_config dict."""
    method = cfg.get("quant_method")
    if method == QUANT_METHOD:
        # the checks of inspect and the learner's loader (codec_version, profile, format, block_size), same messages
        cfg = check_quant_config(cfg, formats=FORMATS)
        return ServeSettings(profile=cfg["profile"], fmt=cfg["format"],
                             backend=_backend_override(cfg), delegate=delegate_config(cfg),
                             activations=_activations(cfg), expert_lora=expert_lora_config(cfg))
    if method in ds.FP8_METHODS:
        return deepseek_v4_settings(cfg)
    if method in FOREIGN_MXFP4_METHODS:
        # Another tool's MXFP4 checkpoint, claimed because the user passed --quantization mxfp4_rl. The bytes are
        # fixed already; the profile only matters for later refits, so it comes from the user or the default.
        # claims_checkpoint only lets gpt-oss through, so the layout is gpt-oss's.
        return ServeSettings(profile=online_profile(), fmt="gpt-oss", backend=_backend_override(cfg),
                             activations=_activations(cfg), expert_lora=expert_lora_config(cfg))
    raise ValueError(f"mxfp4_rl cannot serve a checkpoint with quant_method {method!r}; expected {QUANT_METHOD!r}, "
                     f"one of {FOREIGN_MXFP4_METHODS} or DeepSeek-V4's {ds.FP8_METHODS}")


def deepseek_v4_settings(cfg: Mapping[str, Any]) -> ServeSettings:
    """Settings of a shipped DeepSeek-V4 checkpoint (reached only through claims_checkpoint, which requires model_type
    deepseek_v4 with FP4 experts; MXFP4RLConfig.maybe_update_config checks the model type again): its experts' bytes
    in format deepseek-v4 with DeepSeek's own scale rule (profile deepseek_v4, which later refits re-quantize with),
    its FP8 config as the delegate of every other layer under vLLM's DeepSeek-V4 FP8 method."""
    if str(cfg.get("scale_fmt", "ue8m0")) != "ue8m0":
        raise ValueError(f"mxfp4_rl: a DeepSeek-V4 checkpoint with FP4 experts stores its FP8 scales as ue8m0 "
                         f"(float8_e8m0fnu); this quantization_config says scale_fmt {cfg.get('scale_fmt')!r}")
    delegate = {**cfg, "quant_method": DEEPSEEK_V4_DELEGATE_METHOD}
    return ServeSettings(profile=ds.SHIPPED_PROFILE, fmt=ds.FMT, backend=_backend_override(cfg), delegate=delegate,
                         activations=_activations(cfg), expert_lora=expert_lora_config(cfg))


def online_profile() -> str:
    """Profile for a checkpoint that does not record one: $MXFP4_RL_PROFILE, else the explicit-request default."""
    name = envs.PROFILE.get()
    if name:
        logger.info("mxfp4_rl: using MXFP4 profile %r from $%s", name, ENV_PROFILE)
        return name
    logger.warning("mxfp4_rl: no profile recorded in the checkpoint and $%s unset; using %r because "
                   "--quantization mxfp4_rl was requested explicitly", ENV_PROFILE, EXPLICIT_REQUEST_PROFILE)
    return EXPLICIT_REQUEST_PROFILE


def settings_for_online() -> ServeSettings:
    """Settings for a bf16 checkpoint served with --quantization mxfp4_rl (no quantization_config anywhere)."""
    return ServeSettings(profile=online_profile(), fmt="bf16", backend=_backend_override({}),
                         activations=_activations({}))


def claims_checkpoint(hf_quant_cfg: Mapping[str, Any] | None, user_quant: str | None, model_type: str | None,
                      expert_dtype: str | None = None) -> bool:
    """Whether `override_quantization_method` should resolve this checkpoint to mxfp4_rl. expert_dtype: the
    DeepSeek-V4 config's (absent = "fp4", vLLM's default); FP8 experts (DeepSeek-V4-Flash-Base) are not ours."""
    if not hf_quant_cfg:
        return False
    if user_quant is not None and user_quant != QUANT_METHOD:
        # The user asked for another method: let vLLM's own mismatch check refuse the contradiction.
        return False
    method = hf_quant_cfg.get("quant_method")
    if method == QUANT_METHOD:
        return True
    if user_quant != QUANT_METHOD:
        return False
    if method in ds.FP8_METHODS:
        return model_type == ds.MODEL_TYPE and (expert_dtype or "fp4") == "fp4"
    return method in FOREIGN_MXFP4_METHODS and model_type in FOREIGN_FORMAT_BY_MODEL_TYPE

"""Where each supported architecture keeps its routed experts, and how the output formats name them.

Only routed experts are quantized. Shared experts (`mlp.shared_experts.*`, `ffn.shared_experts.*`), routers
(`mlp.gate`, `mlp.router`), attention, norms, embeddings and the LM head never match these patterns.
"""

from __future__ import annotations

import dataclasses
import re

from ..moe.params import DEEPSEEK_V4_PROJ_NAMES, GPT_OSS_FUSED_NAMES, HF_PROJ_NAMES

FORMATS = ("native", "gpt-oss", "deepseek-v4")
PROJS = ("gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class ExpertSource:
    """One source tensor holding routed-expert weights.

    expert is None for gpt-oss's fused tensors ([E, K, N]: input features first, as transformers stores them);
    proj is "gate", "up", "down" or, fused, "gate_up" (columns 2i = gate i, 2i+1 = up i).
    """

    name: str
    layer: int
    expert: int | None
    proj: str


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    model_type: str
    pattern: str  # regex with groups (layer, expert, proj) or, fused, (layer, proj)
    proj_map: dict  # checkpoint projection name -> gate/up/down (gate_up when fused)
    formats: tuple[str, ...]
    fused: bool = False
    native_template: str = "model.layers.{layer}.mlp.experts.{expert}.{proj}"
    native_pattern: str = (r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)"
                           r"\.(weight|weight_scale)")
    native_proj_names: dict = dataclasses.field(default_factory=lambda: dict(HF_PROJ_NAMES))

    def match(self, name: str) -> ExpertSource | None:
        m = re.fullmatch(self.pattern, name)
        if m is None:
            return None
        if self.fused:
            return ExpertSource(name, int(m.group(1)), None, self.proj_map[m.group(2)])
        return ExpertSource(name, int(m.group(1)), int(m.group(2)), self.proj_map[m.group(3)])

    def native_prefix(self, layer: int, expert: int, proj: str) -> str:
        """Prefix of `{prefix}.weight` / `{prefix}.weight_scale` in the native format."""
        return self.native_template.format(layer=layer, expert=expert, proj=self.native_proj_names[proj])

    def parse_native(self, name: str) -> tuple[int, int, str, str] | None:
        """`{prefix}.weight` / `{prefix}.weight_scale` of the native format -> (layer, expert, proj, suffix)."""
        m = re.fullmatch(self.native_pattern, name)
        if m is None:
            return None
        inv = {v: k for k, v in self.native_proj_names.items()}
        return int(m.group(1)), int(m.group(2)), inv[m.group(3)], m.group(4)


_PER_EXPERT_HF = r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight"
_HF_PROJS = {v: k for k, v in HF_PROJ_NAMES.items()}

ARCHS: dict[str, ArchSpec] = {
    "qwen3_moe": ArchSpec("qwen3_moe", _PER_EXPERT_HF, _HF_PROJS, ("native",)),
    "deepseek_v3": ArchSpec("deepseek_v3", _PER_EXPERT_HF, _HF_PROJS, ("native",)),
    "gpt_oss": ArchSpec("gpt_oss", r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)",
                        {v: k for k, v in GPT_OSS_FUSED_NAMES.items()}, ("native", "gpt-oss"), fused=True),
    "deepseek_v4": ArchSpec("deepseek_v4", r"layers\.(\d+)\.ffn\.experts\.(\d+)\.(w1|w2|w3)\.weight",
                            {v: k for k, v in DEEPSEEK_V4_PROJ_NAMES.items()}, ("native", "deepseek-v4"),
                            native_template="layers.{layer}.ffn.experts.{expert}.{proj}",
                            native_pattern=r"layers\.(\d+)\.ffn\.experts\.(\d+)\.(w1|w2|w3)\.(weight|weight_scale)",
                            native_proj_names=dict(DEEPSEEK_V4_PROJ_NAMES)),
    "glm4_moe": ArchSpec("glm4_moe", _PER_EXPERT_HF, _HF_PROJS, ("native",)),  # GLM-4.5/4.6/4.7 MoE
}


def arch_spec(config: dict, where: str = "config.json") -> ArchSpec:
    """The ArchSpec for a config dict; a clear error for unsupported model types."""
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        raise ValueError(f"{where}: model_type {model_type!r} is not supported for MXFP4 expert conversion; "
                         f"supported: {', '.join(ARCHS)}")
    return ARCHS[model_type]


def check_format(spec: ArchSpec, fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt not in spec.formats:
        raise ValueError(f"format {fmt!r} is not available for model_type {spec.model_type!r}; "
                         f"available: {', '.join(spec.formats)}")

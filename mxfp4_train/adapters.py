"""Save / load the learner's LoRA adapters in PEFT's on-disk format (adapter_model.safetensors + adapter_config.json).

Names follow what PEFT 0.21 writes for the same model when it targets the fused expert parameters
(`target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]`) and the shared experts' linears
(`target_modules`): PEFT nests one ParamWrapper per targeted parameter, gate_up_proj innermost, so the gate_up adapter
is saved as `{experts}.base_layer.lora_{A,B}.weight` and the down adapter as `{experts}.lora_{A,B}.weight`.
tests/train/test_adapters.py loads our files with `PeftModel.from_pretrained` on the bf16 model to prove it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .conversion import experts_modules
from .lora import LoRALinear, LoRASpec

PREFIX = "base_model.model."
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _lora_linears(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{PEFT key: fp32 tensor} for every adapter of a converted model."""
    out: dict[str, torch.Tensor] = {}
    for name, mod in experts_modules(model):
        if mod.lora_gate_up is None:
            continue
        for sub, lora in (("base_layer.", mod.lora_gate_up), ("", mod.lora_down)):
            a, b = lora.to_peft()
            out[f"{PREFIX}{name}.{sub}lora_A.weight"] = a
            out[f"{PREFIX}{name}.{sub}lora_B.weight"] = b
    for name, mod in _lora_linears(model):
        out[f"{PREFIX}{name}.lora_A.weight"] = mod.lora_A.weight.detach().contiguous()
        out[f"{PREFIX}{name}.lora_B.weight"] = mod.lora_B.weight.detach().contiguous()
    return out


def _spec(model: nn.Module) -> LoRASpec:
    info = getattr(model, "mxfp4_rl", None) or {}
    spec = info.get("lora")
    if spec is None:
        raise ValueError("model has no LoRA adapters (convert it with mode='lora')")
    return spec


def adapter_config(model: nn.Module, base_model_name_or_path: str | None = None) -> dict:
    spec = _spec(model)
    shared = sorted({n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n, _ in _lora_linears(model)})
    has_experts = any(m.lora_gate_up is not None for _, m in experts_modules(model))
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": spec.r,
        "lora_alpha": spec.alpha,
        # PEFT refuses lora_dropout != 0 on parameter targets (dropout cannot be factored out of a merged delta);
        # dropout only acts in training, so the file says 0 and the training value goes to the metadata.
        "lora_dropout": 0.0 if has_experts else spec.dropout,
        "use_rslora": spec.use_rslora,
        "target_modules": shared,
        "target_parameters": EXPERT_TARGETS if has_experts else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def save_adapters(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = _spec(model)
    meta = {"format": "pt", "mxfp4_rl_profile": model.mxfp4_rl["profile"], "mxfp4_rl_lora_dropout": str(spec.dropout)}
    save_file(adapter_state_dict(model), str(out / ADAPTER_FILE), metadata=meta)
    cfg = adapter_config(model, base_model_name_or_path)
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def load_adapters(model: nn.Module, adapter_dir: str | Path) -> None:
    """Fill a converted model's adapters from PEFT files (ours, or PEFT's own for the same targets)."""
    sd = load_file(str(Path(adapter_dir) / ADAPTER_FILE))
    expected = adapter_state_dict(model)
    missing, extra = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or extra:
        raise ValueError(f"adapter '{adapter_dir}' does not fit this model: missing {missing[:4]}, "
                         f"unexpected {extra[:4]}")
    for name, mod in experts_modules(model):
        if mod.lora_gate_up is None:
            continue
        for sub, lora in (("base_layer.", mod.lora_gate_up), ("", mod.lora_down)):
            lora.load_peft(sd[f"{PREFIX}{name}.{sub}lora_A.weight"], sd[f"{PREFIX}{name}.{sub}lora_B.weight"])
    for name, mod in _lora_linears(model):
        for part in ("lora_A", "lora_B"):
            t = sd[f"{PREFIX}{name}.{part}.weight"]
            w = getattr(mod, part).weight
            if t.shape != w.shape:
                raise ValueError(f"adapter tensor '{name}.{part}.weight': expected {tuple(w.shape)}, "
                                 f"got {tuple(t.shape)}")
            with torch.no_grad():
                w.copy_(t)

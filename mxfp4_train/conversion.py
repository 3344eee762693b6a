"""`convert`: turn a transformers MoE model's routed experts into MXFP4Experts, in place.

Supported: every experts block decorated with transformers 5's `use_experts_implementation` that holds fused
`gate_up_proj` / `down_proj` parameters: Qwen3-MoE and DeepSeek-V3 ([E, out, in], gate/up concatenated, act(gate)*up)
and gpt-oss ([E, in, out] transposed, gate/up interleaved, clamp-swiglu, biases). The decorator's own flags
(`is_transposed`, `is_concatenated`, `has_bias`) say which layout a block uses, so no model class is special-cased.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from tqdm.auto import tqdm

import common

from .experts import MODES, MXFP4Experts
from .grouped import Activation
from .lora import LoRALinear, LoRASpec

SHARED_PROJ = ("gate_proj", "up_proj", "down_proj")


def is_hf_experts(module: nn.Module) -> bool:
    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.dim() == 3 and dn.dim() == 3


def activation_of(module: nn.Module) -> Activation:
    if getattr(module, "is_concatenated", True):
        # DeepSeek-V4's experts (and the models built on them) clamp gate / up at `limit` = config.swiglu_limit in
        # their _apply_gate; gpt-oss's `limit` belongs to its interleaved clamp-swiglu (the branch below)
        limit = getattr(module, "limit", None) if hasattr(module, "_apply_gate") else None
        act = Activation("glu", act_fn=module.act_fn, clamp=None if limit is None else float(limit))
        if hasattr(module, "_apply_gate"):  # other models' gates differ: compare behaviour, never guess
            probe = torch.linspace(-3 * (act.clamp or 8), 3 * (act.clamp or 8), 64).view(2, 32)
            if not torch.equal(module._apply_gate(probe), act(probe)):
                raise ValueError(f"{type(module).__name__}._apply_gate is not act(gate) * up with gate/up clamped "
                                 f"at {act.clamp}: this experts block's activation is not supported")
        return act
    return Activation("clamp_swiglu", alpha=float(module.alpha), limit=float(module.limit))


def canonical_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(w13 [E, 2I, H], w2 [E, H, I]) in [out, in] orientation, quantizable along the last axis."""
    w13, w2 = module.gate_up_proj.detach(), module.down_proj.detach()
    if getattr(module, "is_transposed", False):
        w13, w2 = w13.transpose(1, 2), w2.transpose(1, 2)
    return w13.contiguous(), w2.contiguous()


def empty_like_hf(module: nn.Module, *, mode: str, profile: str, act_quant: str | None, backend: str,
                  device: torch.device | str | None = None) -> MXFP4Experts:
    """An MXFP4Experts with the dims/activation/bias of a transformers experts block (storage not filled)."""
    e, a, b = module.gate_up_proj.shape
    hidden, two_i = (a, b) if getattr(module, "is_transposed", False) else (b, a)
    new = MXFP4Experts(mode=mode, profile=profile, activation=activation_of(module), num_experts=e,
                       hidden_size=hidden, intermediate_size=two_i // 2,
                       has_bias=bool(getattr(module, "has_bias", False)), act_quant=act_quant, backend=backend)
    return new.to(device if device is not None else module.gate_up_proj.device)


def from_hf_experts(module: nn.Module, *, mode: str, profile: str, act_quant: str | None = None,
                    backend: str = "auto") -> MXFP4Experts:
    new = empty_like_hf(module, mode=mode, profile=profile, act_quant=act_quant, backend=backend)
    w13, w2 = canonical_weights(module)
    if mode == "lora":
        new.load_packed(common.quantize(w13, profile=profile, name="gate_up_proj"),
                        common.quantize(w2, profile=profile, name="down_proj"))
    else:
        new.load_master(w13.to(torch.bfloat16), w2.to(torch.bfloat16))
    if new.b13 is not None:
        new.load_bias(module.gate_up_proj_bias.detach(), module.down_proj_bias.detach())
    return new


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _wrap_shared_experts(model: nn.Module, spec: LoRASpec, pattern: re.Pattern | None) -> int:
    n = 0
    for name, module in list(model.named_modules()):
        if not name.endswith("shared_experts") or (pattern and not pattern.search(name)):
            continue
        for proj in SHARED_PROJ:
            lin = getattr(module, proj, None)
            if isinstance(lin, nn.Linear):
                setattr(module, proj, LoRALinear(lin, spec))
                n += 1
    return n


def convert(model: nn.Module, mode: str = "lora", *, profile: str, target: str | None = None, lora_rank: int = 8,
            lora_alpha: float = 16.0, lora_dropout: float = 0.0, use_rslora: bool = False,
            shared_experts_lora: bool = True, act_quant: str | None = None, backend: str = "auto") -> nn.Module:
    """Convert the routed experts of `model` in place and return it.

    mode "lora": experts packed + frozen, per-expert LoRA on gate_up and down, LoRA on shared experts' linears
    (DeepSeek-V3) when shared_experts_lora; every other parameter is frozen, as PEFT does.
    mode "qat": experts become bf16 masters with fake quant in forward (straight-through); nothing is frozen.
    profile: the codec profile the engine serves with (no default: read it from the checkpoint / engine config).
    target: optional regex; only experts blocks whose module name matches are converted.
    act_quant: "mxfp8" to fake-quantize expert inputs as a W4A8 engine does.
    """
    if mode not in MODES:
        raise ValueError(f"convert: mode must be one of {MODES}, got {mode!r}")
    if profile is None:
        raise ValueError("convert: profile is required (the one recorded in the checkpoint / engine config); "
                         f"known: {', '.join(common.profile_names())}")
    profile = common.get_profile(profile).name
    pattern = re.compile(target) if target else None
    names = [n for n, m in model.named_modules() if is_hf_experts(m) and (pattern is None or pattern.search(n))]
    if not names:
        raise ValueError(f"convert: no transformers MoE experts block (gate_up_proj/down_proj [E, ., .]) found"
                         f"{' matching ' + repr(target) if target else ''} in {type(model).__name__}")
    spec = LoRASpec(r=lora_rank, alpha=lora_alpha, dropout=lora_dropout, use_rslora=use_rslora)
    if mode == "lora":
        model.requires_grad_(False)
    for name in tqdm(names, desc=f"mxfp4 convert ({mode})", disable=len(names) < 8):
        new = from_hf_experts(model.get_submodule(name), mode=mode, profile=profile, act_quant=act_quant,
                              backend=backend)
        if mode == "lora":
            new.add_lora(spec)
        _set_submodule(model, name, new)
    if mode == "lora" and shared_experts_lora:
        _wrap_shared_experts(model, spec, pattern)
    model.mxfp4_rl = {"mode": mode, "profile": profile, "lora": spec if mode == "lora" else None}
    return model


def experts_modules(model: nn.Module) -> list[tuple[str, MXFP4Experts]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MXFP4Experts)]

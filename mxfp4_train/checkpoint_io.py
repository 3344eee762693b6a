"""Learner <-> MXFP4 checkpoints: load a model whose experts stay packed, save a QAT model as an MXFP4 checkpoint.

Loading never builds bf16 experts: the transformers model is built on the meta device, each experts block is
replaced by an MXFP4Experts filled from `common.checkpoint.iter_packed_experts` (one source tensor at a time), and
only the remaining (non-expert) tensors are materialised and read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

import common
from common.checkpoint import CheckpointReader, deepseek_v4, iter_packed_experts, read_quantization_config, save_tensors
from common.checkpoint.convert import quantization_config
from common.layouts import gpt_oss as gpt_oss_layout

from .conversion import _set_submodule, _wrap_shared_experts, empty_like_hf, experts_modules, is_hf_experts
from .experts import MXFP4Experts
from .lora import LoRASpec

def _layer_index(name: str) -> int:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1])


def _assemble(mod: MXFP4Experts, parts: dict, interleaved: bool, name: str) -> tuple[common.MXFP4Tensor, ...]:
    """Per-expert gate/up/down MXFP4Tensors -> stacked canonical w13 ([gate; up] or interleaved rows) and w2."""
    missing = [(e, p) for e in range(mod.num_experts) for p in ("gate", "up", "down") if (e, p) not in parts]
    if missing:
        raise ValueError(f"checkpoint lacks packed experts {missing[:4]}{'...' if len(missing) > 4 else ''} for {name}")
    stack = {p: [parts[(e, p)] for e in range(mod.num_experts)] for p in ("gate", "up", "down")}

    def cat(p, field):
        return torch.stack([getattr(q, field) for q in stack[p]])

    join = gpt_oss_layout.interleave_rows if interleaved else (lambda g, u: torch.cat((g, u), dim=-2))
    w13 = common.MXFP4Tensor(join(cat("gate", "codes"), cat("up", "codes")),
                             join(cat("gate", "scales"), cat("up", "scales")), stack["gate"][0].profile)
    w2 = common.MXFP4Tensor(cat("down", "codes"), cat("down", "scales"), stack["down"][0].profile)
    return w13, w2


def _hf_config(config: dict):
    from transformers import AutoConfig

    cfg = {k: v for k, v in config.items() if k != "quantization_config"}
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def load_mxfp4_model(path: str | Path, mode: str = "lora", *, dtype: torch.dtype = torch.bfloat16,
                     lora: LoRASpec | None = LoRASpec(), act_quant: str | None = None,
                     backend: str = "auto") -> nn.Module:
    """A transformers CausalLM from an mxfp4_rl checkpoint; the profile is the checkpoint's. mode "lora" keeps the
    experts packed (and adds `lora` adapters unless None); mode "qat" makes bf16 masters of the dequantized bytes."""
    from transformers import AutoModelForCausalLM

    config, qc = read_quantization_config(path)
    profile = qc["profile"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_hf_config(config), dtype=dtype)
    names = [n for n, m in model.named_modules() if is_hf_experts(m)]
    by_layer: dict[int, dict] = {}
    for (layer, expert, proj), q in iter_packed_experts(path):
        by_layer.setdefault(layer, {})[(expert, proj)] = q
    for name in names:
        hf = model.get_submodule(name)
        new = empty_like_hf(hf, mode="lora", profile=profile, act_quant=act_quant, backend=backend, device="cpu")
        interleaved = new.activation.kind == "clamp_swiglu"
        new.load_packed(*_assemble(new, by_layer.pop(_layer_index(name), {}), interleaved, name))
        if mode == "qat":
            new = _to_qat(new)
        _set_submodule(model, name, new)
    if by_layer:
        raise ValueError(f"checkpoint '{path}' holds packed experts for layers {sorted(by_layer)} that the model has no "
                         f"experts block for")
    names = _load_dense(model, path, dtype, model_type=config.get("model_type"))
    if mode == "lora":
        model.requires_grad_(False)
        if lora is not None:  # same adapters as convert(..., "lora"): routed experts and shared experts
            for _, m in experts_modules(model):
                m.add_lora(lora)
            _wrap_shared_experts(model, lora, None)
    model.mxfp4_rl = {"mode": mode, "profile": profile, "lora": lora if mode == "lora" else None}
    if config.get("model_type") == deepseek_v4.MODEL_TYPE:
        model.mxfp4_rl["checkpoint_names"] = names  # transformers name -> DeepSeek name, for saving
    return model


def _to_qat(packed: MXFP4Experts) -> MXFP4Experts:
    qat = MXFP4Experts(mode="qat", profile=packed.profile, activation=packed.activation,
                       num_experts=packed.num_experts, hidden_size=packed.hidden_size,
                       intermediate_size=packed.intermediate_size, has_bias=packed.b13 is not None,
                       act_quant=packed.act_quant, backend=packed.backend)
    qat.load_master(*packed.dequantized(torch.bfloat16), packed=packed.packed())  # served until a master changes
    return qat


def _checkpoint_tensors(path, dtype: torch.dtype, model_type: str | None):
    """(transformers name, loader, keep the stored dtype) of the checkpoint's tensors.

    DeepSeek-V4 checkpoints use DeepSeek's own names and (as shipped) FP8 block-quantized dense weights:
    deepseek_v4.iter_dense maps the names as transformers' conversion mapping does and decodes FP8 exactly (e4m3 x
    2^(e-127) per 128x128 block) into the model dtype; its routed experts come from iter_packed_experts. A tensor
    not decoded from FP8 keeps its stored dtype (fp32 hyper-connections and sinks, bf16 norms, int32 tid2eid), as
    transformers' loader does for the shipped checkpoint: every DeepSeek name is renamed (the 'model.' prefix
    included), and core_model_loading loads a renamed key of a pre-quantized checkpoint "with the same dtype from
    the checkpoint"."""
    if model_type == deepseek_v4.MODEL_TYPE:
        for name, t, source, from_fp8 in deepseek_v4.iter_dense(path, dtype):
            yield name, (lambda t=t: t), not from_fp8, source
        return
    with CheckpointReader(path) as reader:
        for name in reader.names():
            yield name, (lambda name=name: reader.get(name)), False, name


def _keep_in_fp32(model: nn.Module, dtype: torch.dtype):
    """The regex transformers' from_pretrained uses to keep `_keep_in_fp32_modules_strict` (and, for fp16,
    `_keep_in_fp32_modules`) in fp32 (DeepSeek-V3/V4: hyper-connections, sinks, norms, the router bias), or None.
    from_config builds every module in `dtype`; without this the learner's model would not be transformers'."""
    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    if not plan:
        return None
    from transformers.core_model_loading import build_glob_alternation

    return build_glob_alternation(list(plan))[0]


def _load_dense(model: nn.Module, path, dtype: torch.dtype, model_type: str | None = None) -> dict[str, str]:
    """Materialise every meta tensor left (non-expert weights, biases) and read them from the checkpoint.
    Returns {model tensor name: checkpoint tensor name}."""
    model._apply(lambda t: torch.empty_like(t, device="cpu") if t.is_meta else t)
    targets = dict(model.state_dict(keep_vars=True))
    packed_suffixes = (".weight", ".weight_scale")
    expert_prefixes = tuple(n + "." for n, _ in experts_modules(model))
    loaded = set()
    fp32 = _keep_in_fp32(model, dtype)
    sources = {}
    for name, get, keep_dtype, source in _checkpoint_tensors(path, dtype, model_type):
        sources[name] = source
        if name.startswith(expert_prefixes):
            rest = name[len(next(p for p in expert_prefixes if name.startswith(p))):]
            if rest in ("gate_up_proj_bias", "down_proj_bias"):  # gpt-oss biases live on the experts block
                name_in_model = name.rsplit(".", 1)[0] + (".b13" if rest.startswith("gate") else ".b2")
                targets[name_in_model].data.copy_(get())
                loaded.add(name_in_model)
                continue
            if (rest.split(".", 1)[0].isdigit() and rest.endswith(packed_suffixes)) or \
                    rest.endswith(("_blocks", "_scales")):
                continue  # packed tensors (native per-expert or gpt-oss fused): already in the experts buffers
        if name not in targets:
            raise ValueError(f"checkpoint tensor '{name}' has no place in {type(model).__name__}")
        t = targets[name]
        if keep_dtype:
            t.data = get()
        elif fp32 is not None and t.is_floating_point() and fp32.search(name):
            t.data = get().to(torch.float32)  # as from_pretrained: these modules stay fp32 in a bf16 model
        else:
            t.data.copy_(get().to(t.dtype))
        loaded.add(name)
    # everything but the packed buffers / masters (filled from the packed experts) must come from the checkpoint
    filled = tuple(f"{p}{b}" for p in expert_prefixes for b in ("w13_codes", "w13_scales", "w2_codes", "w2_scales",
                                                                 "w13", "w2"))
    missing = [n for n in targets if n not in loaded and n not in filled]
    if missing:
        raise ValueError(f"checkpoint '{path}' lacks tensors {missing[:5]} of {type(model).__name__}")
    for module in model.modules():  # non-persistent buffers (rotary inv_freq) are not in the checkpoint
        if "RotaryEmbedding" in type(module).__name__:
            model._init_weights(module)
    return sources


def save_mxfp4_checkpoint(model: nn.Module, out_dir: str | Path, *, max_shard_bytes: int | str | None = None) -> Path:
    """Write the model as a native mxfp4_rl checkpoint: packed experts from the codec (the QAT masters quantized,
    or the resident bytes), every other tensor as the model holds it. LoRA adapters are not merged (save them
    with save_adapters)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = getattr(model, "mxfp4_rl", None)
    if info is None:
        raise ValueError("model was not converted with mxfp4_train.convert / load_mxfp4_model")
    tensors: dict[str, torch.Tensor] = {}
    experts = dict(experts_modules(model))
    for name, t in model.state_dict().items():
        owner = name.rsplit(".", 1)[0]
        if owner in experts or ".lora_" in name or name.endswith((".lora_A.weight", ".lora_B.weight")):
            continue
        tensors[name.replace(".base_layer.", ".")] = t.contiguous()
    fmt = "native"
    if model.config.model_type == deepseek_v4.MODEL_TYPE:
        tensors, fmt = _deepseek_v4_names(tensors, info), deepseek_v4.FMT
    for name, mod in experts.items():
        tensors.update(_packed_tensors(name, mod) if fmt == "native" else _packed_tensors_deepseek_v4(name, mod))
    save_tensors(out, tensors, max_shard_bytes=max_shard_bytes)
    config = model.config.to_dict()
    config.pop("expert_dtype", None)  # experts are mxfp4_rl's now; dense layers are saved decoded (bf16 / fp32)
    config["quantization_config"] = quantization_config(info["profile"], fmt)
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    return out


def _packed_tensors(name: str, mod: MXFP4Experts) -> dict[str, torch.Tensor]:
    w13, w2 = mod.packed()
    i = mod.intermediate_size
    if mod.activation.kind == "clamp_swiglu":
        gate_c, up_c = gpt_oss_layout.deinterleave_rows(w13.codes)
        gate_s, up_s = gpt_oss_layout.deinterleave_rows(w13.scales)
    else:
        gate_c, up_c, gate_s, up_s = w13.codes[:, :i], w13.codes[:, i:], w13.scales[:, :i], w13.scales[:, i:]
    out = {}
    for e in range(mod.num_experts):
        for proj, c, s in (("gate_proj", gate_c, gate_s), ("up_proj", up_c, up_s),
                           ("down_proj", w2.codes, w2.scales)):
            out[f"{name}.{e}.{proj}.weight"] = c[e].contiguous()
            out[f"{name}.{e}.{proj}.weight_scale"] = s[e].contiguous()
    if mod.b13 is not None:
        out[f"{name}.gate_up_proj_bias"] = mod.b13.detach().contiguous()
        out[f"{name}.down_proj_bias"] = mod.b2.detach().contiguous()
    return out


def _deepseek_v4_names(tensors: dict[str, torch.Tensor], info: dict) -> dict[str, torch.Tensor]:
    """DeepSeek-V4 checkpoints are read under DeepSeek's names (ARCHS["deepseek_v4"], deepseek_v4.iter_dense): the
    dense tensors go back to the names they were loaded from (their FP8 weights saved decoded, in the model's
    dtype: the values the learner trained, exactly)."""
    names = info.get("checkpoint_names")
    if names is None:
        raise ValueError("save_mxfp4_checkpoint: a DeepSeek-V4 model is saved under DeepSeek's tensor names, which "
                         "only a model from load_mxfp4_model records; convert() of a transformers model has none")
    missing = [n for n in tensors if n not in names]
    if missing:
        raise ValueError(f"save_mxfp4_checkpoint: tensors {missing[:4]} have no DeepSeek-V4 checkpoint name")
    return {names[n]: t for n, t in tensors.items()}


def _packed_tensors_deepseek_v4(name: str, mod: MXFP4Experts) -> dict[str, torch.Tensor]:
    """`layers.L.ffn.experts.E.w{1,3,2}.weight` int8 + `.scale` float8_e8m0fnu (format deepseek-v4), from the
    canonical rows [w1; w3] and w2: byte views, no conversion."""
    w13, w2 = mod.packed()
    i = mod.intermediate_size
    layer = _layer_index(name)
    out = {}
    for e in range(mod.num_experts):
        for proj, codes, scales in (("gate", w13.codes[e, :i], w13.scales[e, :i]),
                                    ("up", w13.codes[e, i:], w13.scales[e, i:]),
                                    ("down", w2.codes[e], w2.scales[e])):
            stem = f"layers.{layer}.ffn.experts.{e}.{deepseek_v4.PROJ_NAMES[proj]}"
            out[f"{stem}.weight"] = codes.contiguous().view(torch.int8)
            out[f"{stem}.scale"] = scales.contiguous().view(torch.float8_e8m0fnu)
    return out

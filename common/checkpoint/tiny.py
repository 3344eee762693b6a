"""Tiny random bf16 MoE checkpoints in hub format, for tests and demos (no transformers, no hub, no download).

The tensor names and shapes are those of the released checkpoints that transformers 5.19 and vLLM 0.32 load:
- qwen3_moe / deepseek_v3: one tensor per expert, `model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight` [out, in];
- gpt_oss (bf16 hub names): fused `model.layers.L.mlp.experts.gate_up_proj` [E, H, 2I] with gate/up interleaved along
  the last axis (column 2i = gate i, 2i+1 = up i), `down_proj` [E, I, H], their biases, router and attention sinks.
tests/common/test_checkpoint.py loads every arch with `AutoModelForCausalLM.from_pretrained` and checks that no key
is missing or unexpected.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..moe.activations import SWIGLU_LIMIT

# Shared tiny dims: head_dim 64 because vLLM's CPU attention rejects smaller heads.
TINY_DIMS = {
    "vocab_size": 256,
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "head_dim": 64,
    "num_key_value_heads": 1,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 64,
}
# DeepSeek-V3 only. vLLM's CPU MLA kernel compiles for a latent cache of exactly kv_lora_rank 512 + rope 64, so
# those two keep their real values; the rest are shrunk. Layer 0 is dense (first_k_dense_replace) as in the release.
DEEPSEEK_DIMS = {
    "q_lora_rank": 64,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 64,
    "v_head_dim": 64,
    "intermediate_size": 128,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
}
ARCHS = ("qwen3_moe", "gpt_oss", "deepseek_v3", "glm4_moe")
# Large enough that the routed experts visibly change the logits (so parity tests measure something), small enough
# that activations stay far from bf16 overflow through 2 layers.
DEFAULT_INIT_STD = 0.05


def _base_config(d: dict, model_type: str, arch_class: str, dtype: torch.dtype) -> dict:
    return {
        "architectures": [arch_class],
        "model_type": model_type,
        "dtype": str(dtype).removeprefix("torch."),
        "vocab_size": d["vocab_size"],
        "hidden_size": d["hidden_size"],
        "num_hidden_layers": d["num_hidden_layers"],
        "num_attention_heads": d["num_attention_heads"],
        "num_key_value_heads": d["num_key_value_heads"],
        "num_experts_per_tok": d["num_experts_per_tok"],
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": None,
        "initializer_range": 0.02,
    }


def _common_tensors(d: dict) -> list[tuple[str, tuple[int, ...], str]]:
    h, v = d["hidden_size"], d["vocab_size"]
    out = [("model.embed_tokens.weight", (v, h), "w"), ("model.norm.weight", (h,), "one"),
           ("lm_head.weight", (v, h), "w")]
    for layer in range(d["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        out += [(f"{p}.input_layernorm.weight", (h,), "one"), (f"{p}.post_attention_layernorm.weight", (h,), "one")]
    return out


def _gqa_attention(d: dict, layer: int, bias: bool) -> list[tuple[str, tuple[int, ...], str]]:
    h, hd = d["hidden_size"], d["head_dim"]
    q, kv = d["num_attention_heads"] * hd, d["num_key_value_heads"] * hd
    p = f"model.layers.{layer}.self_attn"
    out = [(f"{p}.q_proj.weight", (q, h), "w"), (f"{p}.k_proj.weight", (kv, h), "w"),
           (f"{p}.v_proj.weight", (kv, h), "w"), (f"{p}.o_proj.weight", (h, q), "w")]
    if bias:
        out += [(f"{p}.q_proj.bias", (q,), "w"), (f"{p}.k_proj.bias", (kv,), "w"),
                (f"{p}.v_proj.bias", (kv,), "w"), (f"{p}.o_proj.bias", (h,), "w")]
    return out


def _per_expert_mlp(prefix: str, h: int, inter: int) -> list[tuple[str, tuple[int, ...], str]]:
    return [(f"{prefix}.gate_proj.weight", (inter, h), "w"), (f"{prefix}.up_proj.weight", (inter, h), "w"),
            (f"{prefix}.down_proj.weight", (h, inter), "w")]


def _qwen3_moe(d: dict, dtype: torch.dtype):
    cfg = _base_config(d, "qwen3_moe", "Qwen3MoeForCausalLM", dtype)
    cfg.update(head_dim=d["head_dim"], num_experts=d["num_experts"], moe_intermediate_size=d["moe_intermediate_size"],
               intermediate_size=4 * d["hidden_size"], decoder_sparse_step=1, mlp_only_layers=[],
               norm_topk_prob=True, attention_bias=False, use_sliding_window=False,
               rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    h, hd = d["hidden_size"], d["head_dim"]
    tensors = _common_tensors(d)
    for layer in range(d["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        tensors += _gqa_attention(d, layer, bias=False)
        tensors += [(f"{p}.self_attn.q_norm.weight", (hd,), "one"), (f"{p}.self_attn.k_norm.weight", (hd,), "one"),
                    (f"{p}.mlp.gate.weight", (d["num_experts"], h), "w")]
        for e in range(d["num_experts"]):
            tensors += _per_expert_mlp(f"{p}.mlp.experts.{e}", h, d["moe_intermediate_size"])
    return cfg, tensors


def _gpt_oss(d: dict, dtype: torch.dtype):
    cfg = _base_config(d, "gpt_oss", "GptOssForCausalLM", dtype)
    n = d["num_hidden_layers"]
    cfg.update(head_dim=d["head_dim"], num_local_experts=d["num_experts"], intermediate_size=d["moe_intermediate_size"],
               attention_bias=True, sliding_window=128, swiglu_limit=SWIGLU_LIMIT, hidden_act="silu",
               layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)],
               rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                                "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096})
    h, e, i = d["hidden_size"], d["num_experts"], d["moe_intermediate_size"]
    tensors = _common_tensors(d)
    for layer in range(n):
        p = f"model.layers.{layer}"
        tensors += _gqa_attention(d, layer, bias=True)
        tensors += [(f"{p}.self_attn.sinks", (d["num_attention_heads"],), "w"),
                    (f"{p}.mlp.router.weight", (e, h), "w"), (f"{p}.mlp.router.bias", (e,), "w"),
                    (f"{p}.mlp.experts.gate_up_proj", (e, h, 2 * i), "w"),
                    (f"{p}.mlp.experts.gate_up_proj_bias", (e, 2 * i), "w"),
                    (f"{p}.mlp.experts.down_proj", (e, i, h), "w"),
                    (f"{p}.mlp.experts.down_proj_bias", (e, h), "w")]
    return cfg, tensors


def _deepseek_v3(d: dict, dtype: torch.dtype):
    cfg = _base_config(d, "deepseek_v3", "DeepseekV3ForCausalLM", dtype)
    cfg["num_key_value_heads"] = d["num_attention_heads"]  # MLA: one latent shared by all heads
    cfg.update({k: d[k] for k in DEEPSEEK_DIMS})
    cfg.update(n_routed_experts=d["num_experts"], moe_intermediate_size=d["moe_intermediate_size"], n_group=1,
               topk_group=1, topk_method="noaux_tc", scoring_func="sigmoid", routed_scaling_factor=2.5,
               norm_topk_prob=True, moe_layer_freq=1, num_nextn_predict_layers=0, attention_bias=False,
               rope_interleave=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    h, heads = d["hidden_size"], d["num_attention_heads"]
    qk = d["qk_nope_head_dim"] + d["qk_rope_head_dim"]
    tensors = _common_tensors(d)
    for layer in range(d["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        a = f"{p}.self_attn"
        tensors += [(f"{a}.q_a_proj.weight", (d["q_lora_rank"], h), "w"),
                    (f"{a}.q_a_layernorm.weight", (d["q_lora_rank"],), "one"),
                    (f"{a}.q_b_proj.weight", (heads * qk, d["q_lora_rank"]), "w"),
                    (f"{a}.kv_a_proj_with_mqa.weight", (d["kv_lora_rank"] + d["qk_rope_head_dim"], h), "w"),
                    (f"{a}.kv_a_layernorm.weight", (d["kv_lora_rank"],), "one"),
                    (f"{a}.kv_b_proj.weight", (heads * (d["qk_nope_head_dim"] + d["v_head_dim"]), d["kv_lora_rank"]),
                     "w"),
                    (f"{a}.o_proj.weight", (h, heads * d["v_head_dim"]), "w")]
        tensors += _deepseek_style_mlp(d, layer)
    return cfg, tensors


def _deepseek_style_mlp(d: dict, layer: int) -> list:
    """The MLP of one DeepSeek-V3-style layer (also GLM-4.x MoE's): dense below first_k_dense_replace, else the
    sigmoid router with its score-correction bias, the shared expert and the routed experts."""
    p, h = f"model.layers.{layer}", d["hidden_size"]
    if layer < d["first_k_dense_replace"]:
        return _per_expert_mlp(f"{p}.mlp", h, d["intermediate_size"])
    tensors = [(f"{p}.mlp.gate.weight", (d["num_experts"], h), "w"),
               (f"{p}.mlp.gate.e_score_correction_bias", (d["num_experts"],), "zero")]
    tensors += _per_expert_mlp(f"{p}.mlp.shared_experts", h, d["moe_intermediate_size"] * d["n_shared_experts"])
    for e in range(d["num_experts"]):
        tensors += _per_expert_mlp(f"{p}.mlp.experts.{e}", h, d["moe_intermediate_size"])
    return tensors


def _glm4_moe(d: dict, dtype: torch.dtype):
    """GLM-4.5 / 4.6 / 4.7 MoE (Glm4MoeForCausalLM): GQA attention with q/k/v biases and partial rotary, layer 0
    dense (first_k_dense_replace), then sigmoid-routed experts with a score-correction bias and a shared expert:
    DeepSeek-V3's MoE block under Qwen-style attention. Names as the released checkpoints (zai-org/GLM-4.5-Air)."""
    cfg = _base_config(d, "glm4_moe", "Glm4MoeForCausalLM", dtype)
    cfg.update(head_dim=d["head_dim"], n_routed_experts=d["num_experts"],
               moe_intermediate_size=d["moe_intermediate_size"], intermediate_size=d["intermediate_size"],
               n_shared_experts=d["n_shared_experts"],
               first_k_dense_replace=d["first_k_dense_replace"], n_group=1, topk_group=1, norm_topk_prob=True,
               routed_scaling_factor=2.5, attention_bias=True, use_qk_norm=False, num_nextn_predict_layers=0,
               partial_rotary_factor=0.5, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                           "partial_rotary_factor": 0.5})
    tensors = _common_tensors(d)
    for layer in range(d["num_hidden_layers"]):
        tensors += [t for t in _gqa_attention(d, layer, bias=True) if not t[0].endswith("o_proj.bias")]
        tensors += _deepseek_style_mlp(d, layer)
    return cfg, tensors


_BUILDERS = {"qwen3_moe": _qwen3_moe, "gpt_oss": _gpt_oss, "deepseek_v3": _deepseek_v3, "glm4_moe": _glm4_moe}
# GLM-4 MoE: the DeepSeek-V3 MoE keys it shares (dense first layer, shared expert); no MLA
GLM4_DIMS = {"intermediate_size": 128, "n_shared_experts": 1, "first_k_dense_replace": 1}


def tiny_dims(arch: str, **overrides) -> dict:
    """The dims write_tiny_checkpoint uses for arch, with overrides applied (unknown keys are refused)."""
    if arch not in _BUILDERS:
        raise ValueError(f"unknown tiny arch {arch!r}; supported: {', '.join(ARCHS)}")
    extra = {"deepseek_v3": DEEPSEEK_DIMS, "glm4_moe": GLM4_DIMS}.get(arch, {})
    dims = {**TINY_DIMS, **extra}
    bad = sorted(set(overrides) - set(dims))
    if bad:
        raise ValueError(f"unknown dim override(s) {bad} for tiny {arch}; allowed: {sorted(dims)}")
    dims.update(overrides)
    return dims


def _materialise(shape: tuple[int, ...], kind: str, gen: torch.Generator, std: float, dtype: torch.dtype):
    if kind == "one":
        return torch.ones(shape, dtype=dtype)
    if kind == "zero":
        return torch.zeros(shape, dtype=dtype)
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * std).to(dtype)


def write_tiny_checkpoint(path: str | Path, arch: str = "qwen3_moe", seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                          init_std: float = DEFAULT_INIT_STD, **dim_overrides) -> Path:
    """Write config.json + model.safetensors of a tiny random MoE model in hub format; returns the directory.

    Same (arch, seed, dtype, init_std, dims) -> same bytes: tensors are drawn in a fixed order from one generator.
    """
    dims = tiny_dims(arch, **dim_overrides)
    cfg, spec = _BUILDERS[arch](dims, dtype)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: _materialise(shape, kind, gen, init_std, dtype) for name, shape, kind in spec}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out

"""A tiny random DeepSeek-V4 checkpoint in DeepSeek's own names and, by default, in the exact shipped format of
DeepSeek-V4-Flash (common/checkpoint/deepseek_v4.py): MXFP4 routed experts (int8 codes + float8_e8m0fnu scales),
FP8 block-quantized attention / shared-expert weights (float8_e4m3fn + e8m0 `.scale` per 128x128 block), bf16 /
fp32 elsewhere, config.json with DeepSeek's keys and its FP8 quantization_config. No hub, no transformers import.

Architecture features kept (transformers 5.19 DeepseekV4Config): hash-routed first layers (`num_hash_layers`, a
`tid2eid` table), top-k routed layers with a score-correction bias, one shared expert, `swiglu_limit` clamping,
hyper-connections (`hc_mult` residual streams), the three attention kinds (sliding window, compressed sparse with an
indexer, heavily compressed). tests/common/test_deepseek_v4_checkpoint.py loads the bf16 variant with
`DeepseekV4ForCausalLM.from_pretrained` and checks that no key is missing or unexpected.

Tensor dtypes follow what transformers' loader and vLLM 0.32's DeepSeek-V4 loader expect of the release: FP8 with
ue8m0 block scales for the linears vLLM builds with the quant_config (wq_a, wkv, wq_b, wo_a, wo_b, indexer.wq_b,
shared_experts.w1/w2/w3); bf16 for the compressor / indexer projections and weights_proj, the router, embeddings,
head and norms; fp32 for hyper-connection parameters, attention sinks, positional biases and the router bias;
int32 for tid2eid. The real release's exact per-tensor dtypes could not be read here (no hub): these are the
loaders' expectations, not a copy of its index.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..api import quantize
from ..layouts.deepseek_v4 import to_deepseek_v4
from .deepseek_v4 import SHIPPED_PROFILE, SHIPPED_QUANT_CONFIG, quantize_fp8_block

# hidden 128 / expert intermediate 64: multiples of 32 (MXFP4 blocks); heads * head_dim = 256 spans two FP8 blocks of
# 128 rows, q_lora_rank 64 a partial block. Layer 0 is hash-routed, 1 compressed-sparse (ratio 4, indexer), 2 heavily
# compressed (ratio 128, as released: transformers maps only 0 / 4 / 128 to layer types).
TINY_DS4 = {
    "vocab_size": 256, "hidden_size": 128, "moe_intermediate_size": 64, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 64, "qk_rope_head_dim": 16, "q_lora_rank": 64,
    "o_groups": 2, "o_lora_rank": 32, "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2,
    "num_hash_layers": 1, "compress_ratios": [0, 4, 128], "index_n_heads": 2, "index_head_dim": 32, "index_topk": 4,
    "sliding_window": 8, "hc_mult": 2, "hc_sinkhorn_iters": 3,
}
FP8_LINEARS = ("attn.wq_a", "attn.wkv", "attn.wq_b", "attn.wo_a", "attn.wo_b", "attn.indexer.wq_b",
               "ffn.shared_experts.w1", "ffn.shared_experts.w2", "ffn.shared_experts.w3")
DEFAULT_INIT_STD = 0.05  # as common.checkpoint.tiny: experts visibly move the logits, far from bf16 overflow


# DeepSeek-V4-Flash's YaRN rope scaling as vLLM 0.25 reads it (`rope_scaling` -> its DeepSeek-V4 scaling rotary
# embedding, whose fp32 cos/sin cache its fused inverse-RoPE kernel asserts; the "default" rope of a config without
# one builds a bf16 cache there)
FLASH_ROPE_SCALING = {"type": "yarn", "factor": 16.0, "original_max_position_embeddings": 65536, "beta_fast": 32.0,
                      "beta_slow": 1.0}


def tiny_config(d: dict, *, shipped: bool = True, rope_scaling: dict | None = None) -> dict:
    cfg = {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "dtype": "bfloat16",
        **{k: v for k, v in d.items()}, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        # topk_method: vLLM 0.32's DeepSeek-V4 registers the router's score-correction bias only for noaux_tc
        "scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc", "norm_topk_prob": True,
        "routed_scaling_factor": 1.5, "swiglu_limit": 10.0,
        "hc_eps": 1e-6, "rope_theta": 10000.0, "compress_rope_theta": 160000.0, "num_nextn_predict_layers": 0,
        "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1, "initializer_range": 0.02,
    }
    if rope_scaling is not None:
        cfg["rope_scaling"] = dict(rope_scaling)
    if shipped:
        cfg["expert_dtype"] = "fp4"
        cfg["quantization_config"] = dict(SHIPPED_QUANT_CONFIG)
    return cfg


def _attention(d: dict, p: str, ratio: int) -> list[tuple[str, tuple[int, ...], str, torch.dtype]]:
    h, hd, heads = d["hidden_size"], d["head_dim"], d["num_attention_heads"]
    bf, f32 = torch.bfloat16, torch.float32
    out = [(f"{p}.attn.attn_sink", (heads,), "w", f32), (f"{p}.attn.wq_a.weight", (d["q_lora_rank"], h), "w", bf),
           (f"{p}.attn.q_norm.weight", (d["q_lora_rank"],), "one", bf),
           (f"{p}.attn.wq_b.weight", (heads * hd, d["q_lora_rank"]), "w", bf),
           (f"{p}.attn.wkv.weight", (hd, h), "w", bf), (f"{p}.attn.kv_norm.weight", (hd,), "one", bf),
           (f"{p}.attn.wo_a.weight", (d["o_groups"] * d["o_lora_rank"], heads * hd // d["o_groups"]), "w", bf),
           (f"{p}.attn.wo_b.weight", (h, d["o_groups"] * d["o_lora_rank"]), "w", bf)]
    if ratio == 0:
        return out
    overlap = 2 if ratio == 4 else 1  # the compressed-sparse compressor keeps overlapping windows (2x width)
    c = f"{p}.attn.compressor"
    out += [(f"{c}.ape", (ratio, overlap * hd), "w", f32), (f"{c}.wkv.weight", (overlap * hd, h), "w", bf),
            (f"{c}.wgate.weight", (overlap * hd, h), "w", bf), (f"{c}.norm.weight", (hd,), "one", bf)]
    if ratio == 4:
        ihd, i = d["index_head_dim"], f"{p}.attn.indexer"
        out += [(f"{i}.compressor.ape", (ratio, 2 * ihd), "w", f32),
                (f"{i}.compressor.wkv.weight", (2 * ihd, h), "w", bf),
                (f"{i}.compressor.wgate.weight", (2 * ihd, h), "w", bf),
                (f"{i}.compressor.norm.weight", (ihd,), "one", bf),
                (f"{i}.wq_b.weight", (d["index_n_heads"] * ihd, d["q_lora_rank"]), "w", bf),
                (f"{i}.weights_proj.weight", (d["index_n_heads"], h), "w", bf)]
    return out


def tensor_specs(d: dict) -> list[tuple[str, tuple[int, ...], str, torch.dtype]]:
    """(DeepSeek name, shape, init kind, dtype) of every tensor, experts as bf16 [out, in] (quantized later)."""
    h, v, e, i, hc = d["hidden_size"], d["vocab_size"], d["n_routed_experts"], d["moe_intermediate_size"], d["hc_mult"]
    bf, f32 = torch.bfloat16, torch.float32
    out = [("embed.weight", (v, h), "w", bf)]
    mix = (2 + hc) * hc  # pre (hc) + post (hc) + comb (hc x hc) mixing weights of one hyper-connection
    for layer in range(d["num_hidden_layers"]):
        p = f"layers.{layer}"
        out += _attention(d, p, d["compress_ratios"][layer])
        out += [(f"{p}.attn_norm.weight", (h,), "one", bf), (f"{p}.ffn_norm.weight", (h,), "one", bf)]
        for site in ("attn", "ffn"):
            out += [(f"{p}.hc_{site}_fn", (mix, hc * h), "w", f32), (f"{p}.hc_{site}_base", (mix,), "zero", f32),
                    (f"{p}.hc_{site}_scale", (3,), "one", f32)]
        out.append((f"{p}.ffn.gate.weight", (e, h), "w", bf))
        if layer < d["num_hash_layers"]:
            out.append((f"{p}.ffn.gate.tid2eid", (v, d["num_experts_per_tok"]), "tid2eid", torch.int32))
        else:
            out.append((f"{p}.ffn.gate.bias", (e,), "w", f32))
        si = i * d["n_shared_experts"]
        out += [(f"{p}.ffn.shared_experts.w1.weight", (si, h), "w", bf),
                (f"{p}.ffn.shared_experts.w3.weight", (si, h), "w", bf),
                (f"{p}.ffn.shared_experts.w2.weight", (h, si), "w", bf)]
        for x in range(e):
            out += [(f"{p}.ffn.experts.{x}.w1.weight", (i, h), "expert", bf),
                    (f"{p}.ffn.experts.{x}.w3.weight", (i, h), "expert", bf),
                    (f"{p}.ffn.experts.{x}.w2.weight", (h, i), "expert", bf)]
    out += [("norm.weight", (h,), "one", bf), ("hc_head_fn", (hc, hc * h), "w", f32),
            ("hc_head_base", (hc,), "zero", f32), ("hc_head_scale", (1,), "one", f32), ("head.weight", (v, h), "w", bf)]
    return out


def _draw(shape, kind: str, dtype: torch.dtype, gen: torch.Generator, std: float, d: dict) -> torch.Tensor:
    if kind == "one":
        return torch.ones(shape, dtype=dtype)
    if kind == "zero":
        return torch.zeros(shape, dtype=dtype)
    if kind == "tid2eid":  # distinct experts per token, as a hash table holds
        return torch.stack([torch.randperm(d["n_routed_experts"], generator=gen)[:shape[1]]
                            for _ in range(shape[0])]).to(dtype)
    w = torch.randn(shape, generator=gen, dtype=torch.float32) * std
    if kind == "expert":
        _adversarial_rows(w, gen)
    return w.to(dtype)


def _adversarial_rows(w: torch.Tensor, gen: torch.Generator) -> None:
    """Blocks a quantizer meets rarely but a decoder must get right, kept small enough for a forward pass: an
    all-zero block, bf16 subnormals (scale at DeepSeek's floor), exact E2M1 midpoints (ties), a lone outlier."""
    k = w.shape[1]
    if w.shape[0] < 4 or k < 32:
        return
    w[0, :32] = 0.0
    w[1, :32] = 2.0 ** -130 * torch.arange(1, 33)
    w[2, :32] = torch.tensor([0.25, 0.75, 2.5, 5.0] * 8) * 2.0 ** -5
    w[2, 31] = 6.0 * 2.0 ** -5
    w[3, int(torch.randint(0, 32, (1,), generator=gen))] = 0.75


def write_tiny_deepseek_v4(path: str | Path, *, seed: int = 0, shipped: bool = True,
                           init_std: float = DEFAULT_INIT_STD, rope_scaling: dict | None = None,
                           **overrides) -> Path:
    """config.json + model.safetensors of a tiny DeepSeek-V4. shipped=True: the exact DeepSeek-V4-Flash format
    (experts quantized with profile deepseek_v4, FP8 block dense). shipped=False: every tensor bf16 (fp32 / int32
    where the release keeps them), no quantization_config: the source `mxfp4-rl quantize` converts.
    rope_scaling: written into config.json as given (FLASH_ROPE_SCALING: the release's YaRN, which vLLM's
    DeepSeek-V4 kernels need); default none (transformers' default rope).
    Same arguments -> same bytes (one generator, fixed order)."""
    d = {**TINY_DS4}
    bad = sorted(set(overrides) - set(d))
    if bad:
        raise ValueError(f"unknown tiny DeepSeek-V4 dim override(s) {bad}; allowed: {sorted(d)}")
    d.update(overrides)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape, kind, dtype in tensor_specs(d):
        t = _draw(shape, kind, dtype, gen, init_std, d)
        stem = name.removesuffix(".weight")
        if shipped and kind == "expert":
            tensors[name], tensors[f"{stem}.scale"] = to_deepseek_v4(quantize(t, profile=SHIPPED_PROFILE, name=name))
        elif shipped and stem.split(".", 2)[-1] in FP8_LINEARS:
            tensors[name], tensors[f"{stem}.scale"] = quantize_fp8_block(t)
        else:
            tensors[name] = t
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = tiny_config(d, shipped=shipped, rope_scaling=rope_scaling)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out

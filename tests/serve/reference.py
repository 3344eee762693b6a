"""Independent reference forward: the HF transformers model in fp32 with its routed experts replaced by given
weights (e.g. the codec's dequantization of a checkpoint's packed experts), and helpers to run engines in a
subprocess. Shared by the engine tests in tests/e2e."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from common import dequantize
from common.checkpoint import load_packed_experts

ROOT = Path(__file__).resolve().parents[2]
ENGINE_TIMEOUT_S = 300


def run_engine(spec: dict, out_dir: Path, timeout: int = ENGINE_TIMEOUT_S, env: dict | None = None):
    """Start one engine in a fresh process (tests/serve/engine_runner.py); returns (completed process, result dict
    or None, params dict or None)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_path = out_dir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-m", "tests.serve.engine_runner", str(spec_path), str(out_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    result = json.loads((out_dir / "result.json").read_text()) if proc.returncode == 0 else None
    params = None
    if proc.returncode == 0 and (out_dir / "params.safetensors").exists():
        from safetensors.torch import load_file

        params = load_file(str(out_dir / "params.safetensors"))
    return proc, result, params


def dequantized_experts(packed_dir: Path) -> dict[tuple[int, int, str], torch.Tensor]:
    """{(layer, expert, 'gate'|'up'|'down'): fp32 [N, K]} from an mxfp4_rl checkpoint, exact (codec dequantize)."""
    return {k: dequantize(q, torch.float32) for k, q in load_packed_experts(packed_dir).items()}


def hf_model_with_experts(bf16_dir: Path, experts: dict[tuple[int, int, str], torch.Tensor]):
    """transformers model in fp32 whose routed experts hold `experts`; everything else from the bf16 checkpoint."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(bf16_dir), dtype=torch.float32)
    model.eval()
    gpt_oss = model.config.model_type == "gpt_oss"
    with torch.no_grad():
        for (layer, e, proj), w in experts.items():
            mod = model.model.layers[layer].mlp.experts
            inter = w.shape[0] if proj != "down" else w.shape[1]
            if gpt_oss:  # transformers stores gpt-oss experts input-major with gate/up columns interleaved
                if proj == "down":
                    mod.down_proj[e].copy_(w.t())
                else:
                    mod.gate_up_proj[e][:, (0 if proj == "gate" else 1)::2].copy_(w.t())
            elif proj == "down":
                mod.down_proj[e].copy_(w)
            else:
                rows = slice(0, inter) if proj == "gate" else slice(inter, 2 * inter)
                mod.gate_up_proj[e][rows].copy_(w)
    return model


def reference_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """log_softmax [len(tokens), vocab] (fp32) of the distributions that predicted each generated token."""
    ids = torch.tensor([prompt + tokens[:-1]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[len(prompt) - 1:]


def max_logprob_error(result: dict, model) -> tuple[float, int]:
    """(max |engine - reference| over every returned top-k log-prob, number of greedy steps whose engine token
    is not the reference argmax)."""
    worst, flips = 0.0, 0
    for out in result["outputs"]:
        ref = reference_logprobs(model, out["prompt"], out["tokens"])
        for step, (tok, lps) in enumerate(zip(out["tokens"], out["logprobs"])):
            for t, lp in lps.items():
                worst = max(worst, abs(lp - float(ref[step, int(t)])))
            flips += int(int(ref[step].argmax()) != tok)
    return worst, flips


# Greedy log-probs of the engine (fp16 activations, the CPU engine dtype: see engine_runner) against the fp32
# reference. fp16 rounds with unit roundoff u = 2^-11 ~ 4.9e-4; each of the 2 layers rounds the residual stream
# about 10 times (norms, q/k/v/o, attention, router, experts, residual adds), and log-softmax at most doubles a logit
# error, so with |logits| of order 1 the expected error is ~ 2 * 20 * u ~ 0.02 nats in the worst case; measured
# 0.0015 (Qwen3-MoE) and 0.0037 (gpt-oss). A reference built with a different profile (ocp instead of flashinfer)
# moves them by 0.08 and 0.33, so the bound separates right bytes from wrong ones.
LOGPROB_TOL = 0.02


def packed_vllm_params(packed_dir: Path) -> dict[str, torch.Tensor]:
    """What the engine must hold for a checkpoint: vLLM's per-layer MoE params, w13 = [gate; up] rows."""
    by_layer: dict[int, dict[str, list]] = {}
    for (layer, e, proj), q in sorted(load_packed_experts(packed_dir).items()):
        d = by_layer.setdefault(layer, {})
        d.setdefault(proj, {})[e] = q
    out = {}
    for layer, d in by_layer.items():
        experts = sorted(d["down"])
        p = f"model.layers.{layer}.mlp.experts"
        for kind, suffix in (("codes", "weight"), ("scales", "weight_scale")):
            out[f"{p}.w13_{suffix}"] = torch.stack(
                [torch.cat([getattr(d["gate"][e], kind), getattr(d["up"][e], kind)]) for e in experts])
            out[f"{p}.w2_{suffix}"] = torch.stack([getattr(d["down"][e], kind) for e in experts])
    return out


def assert_same_bytes(engine: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    packed = {k: v for k, v in engine.items() if not k.endswith("bias")}
    assert sorted(packed) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(packed[k], v), f"engine parameter {k} differs from the checkpoint's bytes"

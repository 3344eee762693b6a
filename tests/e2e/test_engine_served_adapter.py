"""Issue 22, export: a learner's trained expert adapter saved as a PEFT adapter next to the MXFP4 base
(mxfp4_train.adapters.save_adapters) and named in the base's quantization_config (enable_expert_lora(...,
adapter=...)) is served by a plain engine start, unmerged: the engine's greedy log-probs equal the learner's with
its adapters (at the fp16 engine's tolerance, tests/serve/reference.py), and not the base's."""

from __future__ import annotations

import pytest
import torch

from common.checkpoint import quantize_checkpoint, write_tiny_checkpoint
from tests.serve.reference import LOGPROB_TOL, max_logprob_error, run_engine

pytestmark = pytest.mark.engine
PROFILE = "flashinfer"


def test_vllm_serves_base_plus_saved_adapter_as_the_learner_computes(tmp_path):
    from mxfp4_train import load_mxfp4_model
    from mxfp4_train.adapters import save_adapters
    from mxfp4_train.conversion import experts_modules
    from mxfp4_train.lora import LoRASpec
    from mxfp4_train.sync import enable_expert_lora

    src = write_tiny_checkpoint(tmp_path / "bf16", arch="qwen3_moe", seed=0)
    ckpt = quantize_checkpoint(src, tmp_path / "mxfp4", profile=PROFILE, progress=False)
    spec = LoRASpec(r=4, alpha=8.0)
    learner = load_mxfp4_model(ckpt, mode="lora", dtype=torch.float32, lora=spec)
    base = load_mxfp4_model(ckpt, mode="lora", dtype=torch.float32, lora=spec)  # B = 0: the base function
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a trained adapter: nonzero B on every expert of both projections
        for _, mod in experts_modules(learner):
            for lora in (mod.lora_gate_up, mod.lora_down):
                lora.B.copy_(torch.randn(lora.B.shape, generator=g) * 0.05)
    save_adapters(learner, ckpt / "adapter")
    cfg = enable_expert_lora(ckpt, spec, adapter=ckpt / "adapter")
    assert cfg.adapter == "adapter"  # recorded relative to the checkpoint: the directory moves as one
    prompts = [torch.randint(2, 256, (n,), generator=g).tolist() for n in (5, 12, 24)]
    spec_run = {"model": str(ckpt), "quantization": "mxfp4_rl", "prompts": prompts, "max_tokens": 8, "logprobs": 5}
    proc, result, _ = run_engine(spec_run, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-4000:]
    err, flips = max_logprob_error(result, learner.eval())
    assert err <= LOGPROB_TOL and flips == 0, (err, flips)
    assert max_logprob_error(result, base.eval())[0] > 5 * LOGPROB_TOL  # the adapter is what the engine serves

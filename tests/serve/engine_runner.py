"""Run one real vLLM engine in this process and write what it produced; tests call it in a subprocess.

usage: python -m tests.serve.engine_runner SPEC.json OUT_DIR
SPEC: {"model": dir, "quantization": "mxfp4_rl" | null, "prompts": [[ids...]], "max_tokens": n, "logprobs": k,
       "dump_params": bool, "dump_methods": bool}
OUT_DIR/result.json: {"outputs": [{"prompt": [...], "tokens": [...], "logprobs": [{token: logprob}, ...]}]}
OUT_DIR/params.safetensors: the engine's packed expert parameters (mxfp4_serve.introspect), when asked.
OUT_DIR/methods.json: {module name: class name of its quant_method} for every layer that has one, when asked.
An engine that fails to start exits non-zero with vLLM's traceback (the error message) on stderr.

The engine core runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so `llm.apply_model` reads the parameters
straight from the model. dtype float16: on CPUs that advertise AMX without granting it to the process, vLLM's CPU
attention picks its AMX kernel for bf16 and dies with SIGILL; fp16 takes the portable AVX-512 kernel.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

ENGINE_DTYPE = "float16"


def quant_methods(model) -> dict[str, str]:
    """{module name: type name of its quant_method}: which method vLLM gave each layer (runs in the worker)."""
    return {name: type(m.quant_method).__name__ for name, m in model.named_modules()
            if getattr(m, "quant_method", None) is not None}


def bias_sync(llm, spec: dict) -> dict:
    """Sync a learner whose expert biases moved (gpt-oss) and read back what the engine serves: the sync's own
    audit, and the engine's canonical biases against the learner's (deinterleaved, in the engine's dtype)."""
    import torch

    from common.layouts import gpt_oss as gpt_oss_layout
    from mxfp4_serve.introspect import packed_expert_params
    from mxfp4_train import load_mxfp4_model
    from mxfp4_train.conversion import experts_modules
    from mxfp4_train.sync import WeightSync

    model = load_mxfp4_model(spec["model"], mode="qat", dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, mod in experts_modules(model):
            mod.b13.add_(0.05 * torch.randn(mod.b13.shape, generator=g))
            mod.b2.add_(0.05 * torch.randn(mod.b2.shape, generator=g))
    ws = WeightSync(llm)
    report = ws.sync(model)
    ws.audit(model)
    (served,) = llm.apply_model(packed_expert_params)
    equal = True
    for prefix, mod in experts_modules(model):
        gate, up = gpt_oss_layout.deinterleave_rows(mod.b13.detach().unsqueeze(-1))
        want13 = torch.cat((gate, up), dim=-2).squeeze(-1).to(getattr(torch, ENGINE_DTYPE))
        want2 = mod.b2.detach().to(getattr(torch, ENGINE_DTYPE))
        equal &= torch.equal(served[f"{prefix}.w13_bias"], want13) and torch.equal(served[f"{prefix}.w2_bias"], want2)
    return {"kinds": sorted(set(report.kinds.values())), "version": report.engine_version, "biases_equal": equal}


def run(spec: dict, out_dir: Path) -> None:
    from safetensors.torch import save_file
    from vllm import LLM, SamplingParams

    from mxfp4_serve.introspect import packed_expert_params

    kwargs = dict(model=spec["model"], skip_tokenizer_init=True, gpu_memory_utilization=0.1, max_model_len=256,
                  max_num_seqs=4, enforce_eager=True, dtype=ENGINE_DTYPE, seed=0)
    if spec.get("quantization"):
        kwargs["quantization"] = spec["quantization"]
    if spec.get("bias_sync"):
        kwargs["worker_extension_cls"] = "mxfp4_serve.sync.worker.MXFP4SyncExtension"
    llm = LLM(**kwargs)
    result = {"outputs": []}
    if spec.get("prompts"):
        sp = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 4), logprobs=spec.get("logprobs", 5),
                            detokenize=False, ignore_eos=True)
        for out in llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]], sp, use_tqdm=False):
            c = out.outputs[0]
            lps = [{str(t): float(lp.logprob) for t, lp in step.items()} for step in (c.logprobs or [])]
            result["outputs"].append({"prompt": list(out.prompt_token_ids), "tokens": list(c.token_ids),
                                      "logprobs": lps})
    if spec.get("dump_params"):
        (params,) = llm.apply_model(packed_expert_params)
        save_file({k: v.contiguous() for k, v in params.items()}, str(out_dir / "params.safetensors"))
    if spec.get("bias_sync"):
        result["bias_sync"] = bias_sync(llm, spec)
    if spec.get("dump_methods"):
        (methods,) = llm.apply_model(quant_methods)
        (out_dir / "methods.json").write_text(json.dumps(methods))
    (out_dir / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    run(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))

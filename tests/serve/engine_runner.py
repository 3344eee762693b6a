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


def run(spec: dict, out_dir: Path) -> None:
    from safetensors.torch import save_file
    from vllm import LLM, SamplingParams

    from mxfp4_serve.introspect import packed_expert_params

    kwargs = dict(model=spec["model"], skip_tokenizer_init=True, gpu_memory_utilization=0.1, max_model_len=256,
                  max_num_seqs=4, enforce_eager=True, dtype=ENGINE_DTYPE, seed=0)
    if spec.get("quantization"):
        kwargs["quantization"] = spec["quantization"]
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
    if spec.get("dump_methods"):
        (methods,) = llm.apply_model(quant_methods)
        (out_dir / "methods.json").write_text(json.dumps(methods))
    (out_dir / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    run(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))

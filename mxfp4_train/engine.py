"""Drive a vLLM rollout engine through its public API only (`vllm.LLM`), in a child process.

The learner side never imports the engine plugin: `quantization="mxfp4_rl"` resolves through vLLM's plugin
entry point like any user's would. Each engine runs in its own spawned process so that two engines (bf16, MXFP4)
can run one after the other without sharing vLLM's process-global state, and so the parent can show progress
while an engine starts (about a minute on CPU).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import queue
import time
import traceback

import torch
from tqdm.auto import tqdm

from common.log import QUIET_VLLM
from common.moe import served_expert_params

log = logging.getLogger(__name__)

CPU_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}
# This child already isolates the engine, so vLLM runs its engine core in this process, and any worker process
# vLLM still starts is spawned, never forked. Why: `torch.cuda.is_available()` below marks the process as having
# touched CUDA (torch poisons fork there) without counting as "CUDA initialised" for vLLM, which then forked its
# engine core on GPU machines: "Cannot re-initialize CUDA in forked subprocess" (H100, vLLM 0.25).
CHILD_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
             "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}  # apply_model ships tensors back from workers


@dataclasses.dataclass
class Rollouts:
    """Sampled completions: token ids and the engine's log-prob of each sampled token (fp32, raw model logits)."""

    prompts: list[list[int]]
    completions: list[list[int]]
    logprobs: list[list[float]]
    served_params: dict[str, torch.Tensor] | None
    startup_s: float
    generate_s: float


def _shutdown(llm) -> None:
    # Without this the engine-core process outlives our child process (it is re-parented, not stopped).
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


def _child(q, ckpt: str, quantization: str | None, prompts, max_tokens: int, seed: int, temperature: float,
           read_params: bool, engine_kwargs: dict) -> None:
    llm = None
    try:
        if not torch.cuda.is_available():
            for k, v in CPU_ENV.items():
                os.environ.setdefault(k, v)
        for k, v in CHILD_ENV.items():
            os.environ.setdefault(k, v)
        for k, v in QUIET_VLLM.items():  # the demo's results on stdout stay readable (also when run as a library)
            os.environ.setdefault(k, v)
        q.put(("status", "importing vllm"))
        from vllm import LLM, SamplingParams

        t0 = time.monotonic()
        q.put(("status", "starting engine"))
        kwargs = dict(model=ckpt, quantization=quantization, dtype="bfloat16", skip_tokenizer_init=True, seed=seed,
                      gpu_memory_utilization=0.1, max_model_len=256, enforce_eager=True, max_num_seqs=16)
        llm = LLM(**{**kwargs, **engine_kwargs})
        startup = time.monotonic() - t0
        q.put(("status", "sampling"))
        sp = SamplingParams(temperature=temperature, max_tokens=max_tokens, logprobs=0, seed=seed, ignore_eos=True,
                            detokenize=False)
        t1 = time.monotonic()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        gen = time.monotonic() - t1
        comps, lps = [], []
        for o in outs:
            c = o.outputs[0]
            comps.append(list(c.token_ids))
            lps.append([float(d[t].logprob) for t, d in zip(c.token_ids, c.logprobs)])
        params = None
        if read_params:
            q.put(("status", "reading served expert bytes"))
            params = llm.apply_model(served_expert_params)[0]
        q.put(("result", Rollouts(prompts, comps, lps, params, startup, gen)))
    except BaseException:  # noqa: BLE001 - the parent re-raises with the child's traceback
        q.put(("error", traceback.format_exc()))
    finally:
        if llm is not None:
            _shutdown(llm)


def sample_rollouts(ckpt: str, prompts: list[list[int]], *, quantization: str | None, max_tokens: int, seed: int,
                    temperature: float = 1.0, read_params: bool = False, label: str = "engine",
                    timeout_s: float = 900, engine_kwargs: dict | None = None) -> Rollouts:
    """Start an engine on ckpt in a child process, sample one completion per prompt, return tokens + log-probs.
    engine_kwargs: extra `vllm.LLM` arguments, overriding ours (e.g. an attention backend)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_child, args=(q, str(ckpt), quantization, prompts, max_tokens, seed, temperature,
                                            read_params, dict(engine_kwargs or {})), daemon=False)
    proc.start()
    t0 = time.monotonic()
    bar = tqdm(total=None, desc=f"vLLM {label}", bar_format="{desc}{postfix} [{elapsed}]", postfix="spawning",
               disable=not log.isEnabledFor(logging.INFO))  # progress is INFO: --quiet hides it
    try:
        while True:
            try:
                kind, payload = q.get(timeout=1.0)
            except queue.Empty:
                bar.refresh()
                if not proc.is_alive():
                    raise RuntimeError(f"vLLM {label} process died (exit code {proc.exitcode}) without a result")
                if time.monotonic() - t0 > timeout_s:
                    raise TimeoutError(f"vLLM {label} did not finish within {timeout_s:.0f} s")
                continue
            if kind == "status":
                bar.set_postfix_str(payload)
            elif kind == "error":
                raise RuntimeError(f"vLLM {label} failed:\n{payload}")
            else:
                bar.set_postfix_str(f"done (startup {payload.startup_s:.0f} s, sampling {payload.generate_s:.1f} s)")
                return payload
    finally:
        bar.close()
        proc.join(timeout=60)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=10)

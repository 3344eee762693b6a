"""The non-expert parameters of a sync (attention, shared experts, router, norms, embeddings): staged, then loaded
through the engine model's own `load_weights`, atomically.

A learner that trains more than the routed experts sends those parameters under their checkpoint names (what
`load_weights` reads from a checkpoint, e.g. 'model.layers.0.self_attn.q_proj.weight') in the engine's dtype.
vLLM's loaders own the mapping into fused parameters ('qkv_proj', 'gate_up_proj') and the TP slicing, so the
engine reuses them rather than a second copy of that knowledge; what we add is:
- staging: each tensor's name must resolve to a parameter of the served model (through the model's
  packed_modules_mapping for fused ones), outside the MXFP4 experts, unquantized (a parameter a delegate method
  quantized, e.g. FP8, cannot take a float update) and of the tensor's dtype (no silent rounding); values finite;
  the received bytes hash to what the learner sent;
- commit: the parameters about to change are snapshot first; `load_weights` writes them in place (vLLM's weight
  loaders copy into the existing storage, so captured CUDA graphs stay valid); a load that fails or that does
  not report every target as loaded restores the snapshot.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from common.audit import dense_hash
from common.moe.wire import FULL_KEY, SyncError, SyncPayloadError, field

from . import reload

_FLOAT = (torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass
class StagedParam:
    name: str  # checkpoint name, as sent
    target: str  # the served model's parameter it lands in
    tensor: torch.Tensor
    hash: str
    base_version: int
    payload_bytes: int


class ParamTargets:
    """Which parameter of the served model a checkpoint tensor name is loaded into."""

    def __init__(self, model: nn.Module, expert_layers: list[str]) -> None:
        self.model = model
        self.params = dict(model.named_parameters())
        mapper = getattr(model, "hf_to_vllm_mapper", None)  # checkpoint -> model names (gpt-oss: self_attn -> attn)
        self.rename = getattr(mapper, "map_name", None) or getattr(mapper, "_map_name", None)
        mapping = getattr(model, "packed_modules_mapping", None) or {}
        self.fused = {sub: fused for fused, subs in mapping.items() for sub in subs if sub != fused}
        self.expert_prefixes = tuple(f"{n}." for n in expert_layers)

    def target(self, name: str) -> str:
        renamed = self.rename(name) if self.rename is not None else name
        parts = (renamed or name).split(".")
        candidates = [".".join(parts)] + [".".join(parts[:i] + [self.fused[p]] + parts[i + 1:])
                               for i, p in enumerate(parts) if p in self.fused]
        found = next((c for c in candidates if c in self.params), None)
        where = f"sync entry '{name}'"
        if found is None:
            raise SyncPayloadError(f"{where}: no parameter of the served model is loaded from a checkpoint tensor "
                                   f"of this name (tried {candidates}); send parameters under their checkpoint "
                                   f"names (as the model's config.json / safetensors name them)")
        if found.startswith(self.expert_prefixes):
            raise SyncPayloadError(f"{where}: routed-expert parameters are synced as packed MXFP4 entries, not as "
                                   f"'param' entries")
        return found

    def check(self, name: str, tensor: torch.Tensor) -> str:
        where = f"sync entry '{name}'"
        target = self.target(name)
        param = self.params[target]
        if param.dtype not in _FLOAT:
            raise SyncPayloadError(f"{where}: the engine holds '{target}' as {param.dtype} (quantized by the "
                                   f"checkpoint's delegate method); a float update cannot be served exactly. "
                                   f"Keep this parameter frozen in the learner")
        if param.numel() and tensor.dtype != param.dtype:  # (a repacked, emptied parameter keeps the loaded dtype)
            raise SyncPayloadError(f"{where}: expected dtype {param.dtype} (the engine's '{target}'), got "
                                   f"{tensor.dtype}; the learner casts to the engine's dtype so that both sides "
                                   f"know the bytes served")
        if not bool(torch.isfinite(tensor).all()):
            raise SyncPayloadError(f"{where}: holds NaN or Inf")
        return target


def stage_param(targets: ParamTargets, entry: dict, version: int) -> StagedParam:
    name = entry["name"]
    where = f"sync entry '{name}'"
    t = field(entry, "tensor", where, _FLOAT, None)
    target = targets.check(name, t)
    dev = targets.params[target].device
    t = t.to(dev)
    h = dense_hash("param", t)
    expected = (entry.get("hashes") or {}).get(FULL_KEY)
    if h != expected:
        raise SyncPayloadError(f"{where} (param): the received bytes hash to {h[:16]}... but the learner sent "
                               f"{str(expected)[:16]}...: corrupted payload; nothing was changed")
    return StagedParam(name, target, t, h, version, t.numel() * t.element_size())


def owner(model: nn.Module, target: str) -> tuple[str, nn.Module, str]:
    module_name, _, param_name = target.rpartition(".")
    return module_name, model.get_submodule(module_name), param_name


def load_params(targets: ParamTargets, staged: list[StagedParam]) -> list:
    """Load staged parameters through the model's load_weights; returns the undo list (callables; already run and
    re-raised if the load failed). Layers whose quant method repacked their weight go through vLLM's layerwise
    reload (reload.py); the others are written in place."""
    if not staged:
        return []
    names = sorted({s.target for s in staged})
    layers: dict[str, nn.Module] = {}
    reloaded: dict[str, nn.Module] = {}
    for target in names:
        module_name, layer, param_name = owner(targets.model, target)
        layers[module_name] = layer
        if reload.needs_reload(layer, param_name):
            reloaded[module_name] = layer
    snapshots = [reload.LayerSnapshot.take(layer) for layer in layers.values()]
    undo = [snap.restore for snap in snapshots]
    try:
        reload.prepare(list(reloaded.values()))
        loaded = targets.model.load_weights((s.name, s.tensor) for s in staged)
        reload.finish(reloaded)
        if loaded is not None:  # vLLM's loaders report the parameters they filled
            missed = sorted(set(names) - set(loaded))
            if missed:
                raise SyncError(f"sync commit: the model's load_weights did not load {missed[:4]} from the sent "
                                f"tensors; the previous values are restored")
    except BaseException:
        for restore_one in reversed(undo):
            restore_one()
        raise
    return undo

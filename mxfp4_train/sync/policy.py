"""What a sync carries besides the packed experts, so that the engine computes the learner's whole forward:

- expert biases (gpt-oss), canonical rows ([gate; up]), in the engine's bias dtype;
- the per-expert LoRA adapters, unmerged (fp32 factors), when the engine serves expert LoRA
  (quantization_config "expert_lora"); the engine's fixed scaling must equal the learner's;
- every non-expert parameter the learner changed (attention, shared experts, router, norms, embeddings), under its
  checkpoint name, in the engine's dtype; a dense LoRA adapter (LoRALinear) goes as its merged weight
  W + scaling * B A computed in fp32 and rounded once to the engine's dtype (the bf16/fp16 rounding of the merged
  weight is the only difference from the learner's unmerged forward: tests/e2e measures it).

"Changed" is tracked per parameter by its storage and in-place version counter (an optimizer step bumps it). The
first sync of a learner assumes it was loaded from the engine's checkpoint: it sends the dense adapters with a
nonzero B (and, with `trainable=True`, every parameter that requires grad: for a learner that trained before its
first sync); later syncs send every parameter whose version moved since the last successful sync.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from common.audit import dense_hash
from common.layouts import gpt_oss as gpt_oss_layout
from common.moe import params as P
from common.moe.activations import GateUpOrder
from common.moe.wire import (
    FULL_KEY,
    SyncError,
    bias_shard,
    lora_entry_name,
    lora_shard,
    shard_key,
)

from ..conversion import experts_modules
from ..lora import LoRALinear

PARAM_CHUNK_BYTES = 256 << 20  # one update_weights call carries at most this much of non-expert parameters
# One update_weights call carries whole MoE layers up to this many payload bytes (a larger layer goes alone). Each
# call is an engine RPC: on an H100 a colocated sync's stage cost about 4.5 ms per layer, packed or 1% delta alike,
# where the delta's kernels take 1 ms (bench/RESULTS.md, eighth round). The IPC send buffer and the engine's
# receive buffers grow to the largest call.
LAYER_BATCH_BYTES = 1 << 30


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise SyncError(f"sync: the engine reports an unknown dtype {name!r}")
    return dtype


def _deinterleave(t: torch.Tensor) -> torch.Tensor:
    """gpt-oss (gate, up) row pairs (dim -2) -> [gate rows; up rows] (the engine's canonical order)."""
    g, u = gpt_oss_layout.deinterleave_rows(t)
    return torch.cat((g, u), dim=-2)


def expert_extras(model: nn.Module) -> dict[str, dict]:
    """{entry name: {"kind": "bias", "tensor"} | {"kind": "lora", "a", "b", "scaling"}} of every experts block,
    in the engine's canonical row order (full tensors, learner dtypes)."""
    out = {}
    for prefix, mod in experts_modules(model):
        interleaved = mod.activation.gate_up is GateUpOrder.INTERLEAVED
        if mod.b13 is not None:
            b13 = mod.b13.detach()
            if interleaved:  # bias entries follow the rows they belong to
                b13 = _deinterleave(b13.unsqueeze(-1)).squeeze(-1)
            out[f"{prefix}.{P.W13_BIAS}"] = {"kind": "bias", "tensor": b13.contiguous()}
            out[f"{prefix}.{P.W2_BIAS}"] = {"kind": "bias", "tensor": mod.b2.detach().contiguous()}
        if mod.lora_gate_up is None:
            # no adapters in the learner's forward: rank-0 (empty) factors, so an engine serving expert LoRA clears
            # whatever an earlier learner left there (sent only to such an engine, client._extra_entries)
            e, h, i = mod.num_experts, mod.hidden_size, mod.intermediate_size
            for weight, (k, n) in ((P.W13, (h, 2 * i)), (P.W2, (i, h))):
                out[lora_entry_name(f"{prefix}.{weight}")] = {
                    "kind": "lora", "a": torch.zeros(e, 0, k), "b": torch.zeros(e, n, 0), "scaling": None}
        else:
            b13 = mod.lora_gate_up.B.detach()
            if interleaved:
                b13 = _deinterleave(b13)
            for weight, lora, b in ((P.W13, mod.lora_gate_up, b13), (P.W2, mod.lora_down, mod.lora_down.B.detach())):
                out[lora_entry_name(f"{prefix}.{weight}")] = {
                    "kind": "lora", "a": lora.A.detach().float().contiguous(), "b": b.float().contiguous(),
                    "scaling": lora.spec.scaling}
    return out


def extra_hashes(kind: str, entry: dict, weight: str, descriptors: list[dict | None]) -> dict[str, str]:
    """{shard key: dense hash} of what each engine rank must hold for a bias or adapter entry."""
    out = {}
    for d in descriptors:
        key = shard_key(d)
        if key not in out:
            parts = (bias_shard(entry["tensor"], d, weight),) if kind == "bias" else \
                lora_shard(entry["a"], entry["b"], d, weight)
            out[key] = dense_hash(kind, *parts)
    return out


def checkpoint_name(name: str) -> str:
    """A learner parameter's checkpoint name: PEFT-style wrappers ('q_proj.base_layer.weight') removed."""
    return name.replace(".base_layer.", ".")


def _owned_by_experts(model: nn.Module) -> set[int]:
    ids = set()
    for _, mod in experts_modules(model):
        ids |= {id(t) for t in mod.parameters()} | {id(t) for t in mod.buffers()}
    return ids


def _versions(model: nn.Module) -> dict[str, tuple[int, int, bool]]:
    """{parameter name: (storage pointer, in-place version, requires_grad)} outside the routed experts."""
    skip = _owned_by_experts(model)
    return {n: (p.data_ptr(), p._version, p.requires_grad) for n, p in model.named_parameters() if id(p) not in skip}


@dataclasses.dataclass
class ParamTracker:
    """The versions of a learner's non-expert parameters at its last successful sync (None before the first)."""

    last: dict[str, tuple[int, int, bool]] | None = None

    def changed(self, model: nn.Module, trainable: bool = False, current=None) -> tuple[dict[str, torch.Tensor], dict]:
        """({checkpoint name: tensor to send, learner dtype}, the versions to record once the sync succeeded).
        Dense adapters are resolved to their merged base weight. trainable: also every parameter that requires
        grad. current: current_params(model), when the caller has it already (it merges every dense adapter)."""
        now = _versions(model)
        if self.last is None:
            moved = {n for n, v in now.items() if v[2]} if trainable else set()
        else:
            moved = {n for n, v in now.items() if self.last.get(n, (None, None))[:2] != v[:2] or (trainable and v[2])}
        tensors, owners = current if current is not None else current_params(model)
        out = {}
        for checkpoint, own in owners.items():
            adapter = len(own) > 1
            first_active = adapter and self.last is None and bool(model.get_parameter(own[-1]).detach().ne(0).any())
            if first_active or any(n in moved for n in own):
                out[checkpoint] = tensors[checkpoint]
        return out, now


def current_params(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """({checkpoint name: the value the learner's forward uses}, {checkpoint name: the learner parameters it
    derives from}) for every parameter outside the routed experts; a dense adapter's weight is merged
    (W + scaling * B A in fp32), its owners end with its B."""
    skip = _owned_by_experts(model)
    tensors: dict[str, torch.Tensor] = {}
    owners: dict[str, list[str]] = {}
    covered = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, LoRALinear):
            continue
        with torch.no_grad():
            merged = mod.base_layer.weight.float() + mod.spec.scaling * (
                mod.lora_B.weight.float() @ mod.lora_A.weight.float())
        weight = checkpoint_name(f"{name}.base_layer.weight")
        tensors[weight] = merged
        owners[weight] = [f"{name}.base_layer.weight", f"{name}.lora_A.weight", f"{name}.lora_B.weight"]
        covered |= set(owners[weight])
    for n, p in model.named_parameters():
        if id(p) in skip or n in covered:
            continue
        tensors[checkpoint_name(n)] = p.detach()
        owners[checkpoint_name(n)] = [n]
    return tensors, owners


def whole_layers(changed: dict[str, torch.Tensor], current: dict[str, torch.Tensor],
                 fused: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """`changed` plus every other tensor of the same checkpoint modules and of the modules the engine fuses with
    them (fused: the engine's packed_modules_mapping, e.g. qkv_proj: [q_proj, k_proj, v_proj]): vLLM reprocesses a
    layer from all of its checkpoint tensors, so a sync sends whole layers."""
    groups = [set(subs) for subs in fused.values()]
    modules = set()
    for name in changed:
        module = name.rpartition(".")[0]
        parent, _, leaf = module.rpartition(".")
        modules.add(module)
        for group in groups:
            if leaf in group:
                modules |= {f"{parent}.{sibling}" if parent else sibling for sibling in group}
    out = dict(changed)
    for name, t in current.items():
        if name not in out and name.rpartition(".")[0] in modules:
            out[name] = t
    return out


def param_entries(tensors: dict[str, torch.Tensor], dtype_name: str) -> list[dict]:
    """'param' entries in the engine's dtype, each with the hash of the exact bytes sent."""
    dtype = _dtype(dtype_name)
    entries = []
    for name, t in tensors.items():
        t = t.to(dtype).contiguous()
        if not bool(torch.isfinite(t).all()):
            raise SyncError(f"sync refused: parameter '{name}' holds NaN/Inf in the engine's dtype {dtype} "
                            f"(overflow when rounding to {dtype}?)")
        entries.append({"name": name, "kind": "param", "tensor": t, "hashes": {FULL_KEY: dense_hash("param", t)}})
    return entries

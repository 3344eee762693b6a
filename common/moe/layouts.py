"""The byte layouts an engine backend keeps its MoE parameters in, as objects, and the record of one on a layer.

Every reader or writer of canonical bytes (the engine's introspection and sync, the learner's byte checks, audits)
goes through the layout recorded on the layer: it never tracks by hand whether a tensor was converted.

- `canonical`: the parameters as loaded (common/moe/params.py: codes [E, N, K/2], scales [E, N, K/32]).
- `kb_major`: hopper_triton's codes, K-block-major with pre-shuffled nibbles and scattered word bits
  (common/grouped_gemm/layout.py); scales and biases stay canonical.
- `flashinfer_trtllm`: FlashInfer's TRT-LLM-gen MoE layout (common/layouts/flashinfer_trtllm.py): gate/up rows
  interleaved and shuffled, scales swizzled 128x4, biases reordered like their rows.

A layout converts IN PLACE (same shapes, same storage: vLLM's layerwise reload and captured CUDA graphs keep
pointing at the parameters) and per expert (a refit touches some experts only). `record(layer, ...)` converts a
freshly loaded canonical layer and remembers the layout on it; `read_canonical` / `write_canonical` translate.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping

import torch

from .params import ALL_PARAMS, LORA_FACTORS, LORA_RANK, PACKED_WEIGHTS

RECORD_ATTR = "mxfp4_rl_experts"  # the ExpertsRecord of a layer served with mxfp4_rl


def layer_params(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The layer's MoE parameters present (ALL_PARAMS order), as their .data tensors."""
    return {n: getattr(layer, n).data for n in ALL_PARAMS if getattr(layer, n, None) is not None}


def copy_experts(dst: torch.Tensor, ids: torch.Tensor, values: torch.Tensor) -> None:
    """dst[ids[i]] = values[i] in place. On the CPU index_copy_ runs element by element (measured 20 ms for 16 MB
    against 1 ms for copy_ on 2 cores): there, all experts in order is one copy_ and any other set one copy_ per
    expert; on GPUs it is one index_copy_ launch."""
    if dst.device.type != "cpu":
        dst.index_copy_(0, ids, values)
    elif ids.numel() == dst.shape[0] and torch.equal(ids.cpu(), torch.arange(dst.shape[0])):
        dst.copy_(values)
    else:
        for i, e in enumerate(ids.tolist()):
            dst[e].copy_(values[i])


def _ids(experts: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if experts is None else torch.as_tensor(experts, dtype=torch.long).to(device)


class ExpertLayout(abc.ABC):
    """Canonical <-> stored bytes of a layer's MoE parameters, per expert, in place."""

    name: str = ""

    @abc.abstractmethod
    def to_layout(self, params: Mapping[str, torch.Tensor], experts: torch.Tensor | None = None) -> None:
        """Rewrite the canonical bytes of the given local experts (all when None) into this layout, in place."""

    @abc.abstractmethod
    def to_canonical(self, params: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
        """Parameter `name` (all local experts) in canonical bytes: a new tensor, or the parameter itself where this
        layout keeps it canonical (no copy on the hashing path; callers copy before mutating)."""

    def all_to_canonical(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every parameter in canonical bytes (as to_canonical; a layout whose parameters convert jointly overrides
        it to convert once)."""
        return {n: self.to_canonical(params, n) for n in params}

    def stored_form(self, name: str, values: torch.Tensor) -> torch.Tensor:
        """Canonical bytes of parameter `name` (any leading expert count) as this layout stores them, where it
        converts that parameter on its own (a sync writes the result directly: mxfp4_serve/sync/layers.py)."""
        raise NotImplementedError(f"layout {self.name!r} converts its parameters jointly, not '{name}' on its own")

    def write(self, params: Mapping[str, torch.Tensor], name: str, experts: torch.Tensor,
              values: torch.Tensor) -> None:
        """Set the canonical bytes of `name` for the given local experts, keeping the layout (the generic way:
        revert the touched experts, edit, convert them again)."""
        ids = _ids(experts, params[name].device)
        sliced = {n: p.index_select(0, ids) for n, p in params.items()}
        canonical = self.all_to_canonical(sliced)
        # a copy: to_layout converts in place, and the caller's values must stay as given
        canonical[name] = values.to(params[name].device, copy=True).reshape(canonical[name].shape)
        self.to_layout(canonical)
        for n, new in canonical.items():
            copy_experts(params[n], ids, new.to(params[n].dtype))


class Canonical(ExpertLayout):
    name = "canonical"

    def to_layout(self, params, experts=None) -> None:
        return None

    def to_canonical(self, params, name):
        return params[name]

    def stored_form(self, name, values):
        return values

    def write(self, params, name, experts, values) -> None:
        p = params[name]
        copy_experts(p, _ids(experts, p.device), values.to(p.device).reshape(-1, *p.shape[1:]))


class KbMajor(ExpertLayout):
    """Codes of w13/w2 kb-major (common/grouped_gemm/layout.py); everything else canonical."""

    name = "kb_major"

    def to_layout(self, params, experts=None) -> None:
        from ..grouped_gemm.layout import convert_in_place

        for n in PACKED_WEIGHTS:
            convert_in_place(params[n], to_kb=True, experts=experts, name=n)

    def to_canonical(self, params, name):
        from ..grouped_gemm.layout import from_kb_major, kb_major_view

        p = params[name]
        return from_kb_major(kb_major_view(p, name), name) if name in PACKED_WEIGHTS else p

    def stored_form(self, name, values):
        from ..grouped_gemm.layout import to_kb_major

        return to_kb_major(values, name).view(values.shape) if name in PACKED_WEIGHTS else values

    def write(self, params, name, experts, values) -> None:
        p = params[name]
        ids = _ids(experts, p.device)
        copy_experts(p, ids, self.stored_form(name, values.to(p.device).reshape(ids.numel(), *p.shape[1:])))


class FlashInferTrtllm(ExpertLayout):
    """All parameters in FlashInfer's TRT-LLM-gen layout (codes, swizzled scales, biases)."""

    name = "flashinfer_trtllm"

    def to_layout(self, params, experts=None) -> None:
        from ..layouts import flashinfer_trtllm as fi

        ids = _ids(experts, next(iter(params.values())).device)
        sliced = params if ids is None else {n: p.index_select(0, ids) for n, p in params.items()}
        converted = fi.convert_experts(sliced, None if ids is None else ids.tolist())
        for n, new in converted.items():
            dst = params[n]
            new = new.reshape(sliced[n].shape).to(dst.dtype)
            if ids is None:
                dst.copy_(new)
            else:
                dst.index_copy_(0, ids, new)

    def to_canonical(self, params, name):
        return self.all_to_canonical(params)[name]

    def all_to_canonical(self, params):
        from ..layouts import flashinfer_trtllm as fi

        # one revert for all: the shuffle and scale swizzle of a matrix are undone together
        return {n: t.reshape(params[n].shape) for n, t in fi.revert_experts(params).items()}


CANONICAL = Canonical()
KB_MAJOR = KbMajor()
FLASHINFER_TRTLLM = FlashInferTrtllm()
LAYOUTS: dict[str, ExpertLayout] = {x.name: x for x in (CANONICAL, KB_MAJOR, FLASHINFER_TRTLLM)}


def get_layout(name: str) -> ExpertLayout:
    if name not in LAYOUTS:
        raise ValueError(f"unknown MoE parameter layout {name!r}; known: {sorted(LAYOUTS)}")
    return LAYOUTS[name]


@dataclasses.dataclass(frozen=True)
class ExpertsRecord:
    """What a layer served with mxfp4_rl says about itself: its name as the learner's export names it
    (e.g. 'model.layers.0.mlp.experts'), the layout its parameters are in, and the codec profile."""

    layer_name: str
    layout: str = CANONICAL.name
    profile: str | None = None


def register_layer(layer: torch.nn.Module, layer_name: str, profile: str | None) -> None:
    """Mark a freshly created layer (canonical parameters) as served by mxfp4_rl."""
    setattr(layer, RECORD_ATTR, ExpertsRecord(layer_name, CANONICAL.name, profile))


def record_of(layer: torch.nn.Module) -> ExpertsRecord | None:
    rec = getattr(layer, RECORD_ATTR, None)
    return rec if isinstance(rec, ExpertsRecord) else None


def layout_of(layer: torch.nn.Module) -> ExpertLayout:
    rec = record_of(layer)
    return CANONICAL if rec is None else get_layout(rec.layout)


def convert_layer(layer: torch.nn.Module, layout: ExpertLayout) -> None:
    """Convert a canonical layer into `layout` in place and record it. Converting a layer whose bytes are
    already in another layout would scramble them: refused."""
    current = layout_of(layer)
    if current is not CANONICAL:
        raise RuntimeError(f"MoE layer '{_name(layer)}' already holds the {current.name!r} layout; converting "
                           f"again would scramble its bytes (write new canonical bytes with write_canonical)")
    bump_generation(layer)
    layout.to_layout(layer_params(layer))
    rec = record_of(layer) or ExpertsRecord(_name(layer))
    setattr(layer, RECORD_ATTR, dataclasses.replace(rec, layout=layout.name))


def mark_canonical(layer: torch.nn.Module) -> None:
    """Record that the layer's parameters hold canonical bytes again (vLLM's layerwise reload wrote them)."""
    bump_generation(layer)
    rec = record_of(layer)
    if rec is not None:
        setattr(layer, RECORD_ATTR, dataclasses.replace(rec, layout=CANONICAL.name))


def read_canonical(layer: torch.nn.Module, name: str) -> torch.Tensor:
    """One MoE parameter of the layer in canonical bytes, whatever layout it is served in (the live parameter
    where the layout keeps it canonical: copy before mutating)."""
    return layout_of(layer).to_canonical(layer_params(layer), name)


def write_canonical(layer: torch.nn.Module, name: str, experts: torch.Tensor, values: torch.Tensor) -> None:
    """Set the canonical bytes of `name` for the given local experts in place, in the layer's layout."""
    bump_generation(layer)
    layout_of(layer).write(layer_params(layer), name, experts, values)


GENERATION_ATTR = "_mxfp4_rl_generation"


def bump_generation(layer: torch.nn.Module) -> None:
    """Note that the layer's MoE bytes change (every writer in this codebase calls it: the checkpoint loader, layout
    conversions, sync writes), so hashes cached against an older generation are not trusted any more."""
    setattr(layer, GENERATION_ATTR, generation_of(layer) + 1)


def generation_of(layer: torch.nn.Module) -> int:
    return int(getattr(layer, GENERATION_ATTR, 0))


def _name(layer: torch.nn.Module) -> str:
    rec = record_of(layer)
    return rec.layer_name if rec is not None else type(layer).__name__


def served_expert_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{'<layer_name>.<param>': canonical CPU copy} for every MoE layer of the model served with mxfp4_rl, e.g.
    'model.layers.0.mlp.experts.w13_weight' (uint8 [E_local, 2I/tp, H/2], rows [w1; w3]). The engine's
    introspection and the learner's byte check both call this (through `LLM.apply_model`), so the two sides
    compare the same canonical bytes on every backend. A layer serving expert adapters adds its factors
    ('<layer_name>.w13_lora_a' ...) at their active rank."""
    out = {}
    for module in model.modules():
        rec = record_of(module)
        if rec is None:
            continue
        for name in layer_params(module):
            out[f"{rec.layer_name}.{name}"] = read_canonical(module, name).to("cpu", copy=True)
        rank = getattr(module, LORA_RANK, None)
        if isinstance(rank, torch.Tensor):  # expert adapters served unmerged: the factors at their active rank
            r = int(rank.item())
            for a_name, b_name in LORA_FACTORS.values():
                out[f"{rec.layer_name}.{a_name}"] = getattr(module, a_name)[:, :r].to("cpu", copy=True)
                out[f"{rec.layer_name}.{b_name}"] = getattr(module, b_name)[..., :r].to("cpu", copy=True)
    return out

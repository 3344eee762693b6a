"""Export the learner's expert bytes for the engine's refit, named as vLLM's MoE layers name their parameters.

For each converted experts block `P` (e.g. `model.layers.0.mlp.experts`, which is also vLLM's layer name for
Qwen3-MoE, DeepSeek-V3 and gpt-oss) it yields `P.w13_weight` uint8 [E, 2I, H/2] (rows [w1; w3] = [gate; up]),
`P.w13_weight_scale`, `P.w2_weight`, `P.w2_weight_scale` (and `P.w13_bias` / `P.w2_bias` for gpt-oss). The codes
and their scales share one audit hash: `common.audit.tensor_hash` of the MXFP4Tensor (codes + scales + shape +
profile) that the two parameters form, so the engine can hash what it serves and the two sides compare one string.
gpt-oss's interleaved gate/up rows are de-interleaved with `common.layouts` (vLLM and our engine plugin hold
[w1; w3] for every model).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch import nn

import common
from common.audit import tensor_hash
from common.layouts import gpt_oss as gpt_oss_layout
from common.layouts.vllm_moe import to_vllm_moe
from common.moe import params as P
from common.moe.activations import GateUpOrder

from .conversion import experts_modules
from .experts import MXFP4Experts


def _gate_up_down(mod: MXFP4Experts) -> tuple[common.MXFP4Tensor, common.MXFP4Tensor, common.MXFP4Tensor]:
    w13, w2 = mod.packed()
    if mod.activation.gate_up is GateUpOrder.INTERLEAVED:
        (gc, uc), (gs, us) = gpt_oss_layout.deinterleave_rows(w13.codes), gpt_oss_layout.deinterleave_rows(w13.scales)
    else:
        i = mod.intermediate_size
        gc, uc, gs, us = w13.codes[:, :i], w13.codes[:, i:], w13.scales[:, :i], w13.scales[:, i:]
    return (common.MXFP4Tensor(gc, gs, w13.profile), common.MXFP4Tensor(uc, us, w13.profile), w2)


def _bias_hash(t: torch.Tensor) -> str:
    h = hashlib.sha256(f"bias/{t.dtype}/{list(t.shape)}\0".encode())
    h.update(t.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def _bias_params(mod: MXFP4Experts) -> dict[str, torch.Tensor]:
    if mod.b13 is None:
        return {}
    b13 = mod.b13.detach()
    if mod.activation.gate_up is GateUpOrder.INTERLEAVED:  # bias entries follow the rows they belong to
        g, u = gpt_oss_layout.deinterleave_rows(b13.unsqueeze(-1))
        b13 = torch.cat((g, u), dim=-2).squeeze(-1)
    return {P.W13_BIAS: b13.contiguous(), P.W2_BIAS: mod.b2.detach().contiguous()}


def export_for_engine(model: nn.Module, hashed: bool = True) -> Iterator[tuple[str, torch.Tensor, str | None]]:
    """Yield (vLLM parameter name, tensor, audit hash) for every expert parameter the engine serves; hashed=False
    leaves the packed weights' hashes None (a caller that derives them otherwise: the sync's block deltas)."""
    blocks = experts_modules(model)
    if not blocks:
        raise ValueError("export_for_engine: the model has no MXFP4Experts (convert it first)")
    for prefix, mod in blocks:
        with torch.no_grad():
            params = to_vllm_moe(*_gate_up_down(mod))
        hashes = {w: tensor_hash(common.MXFP4Tensor(params[w], params[P.scale_name(w)], mod.profile)) if hashed
                  else None for w in P.PACKED_WEIGHTS}
        for name, t in params.items():
            yield f"{prefix}.{name}", t, hashes[name.removesuffix("_scale")]
        for name, t in _bias_params(mod).items():
            yield f"{prefix}.{name}", t, _bias_hash(t)


def export_hashes(model: nn.Module) -> dict[str, str]:
    """{vLLM parameter name: audit hash}; codes and scales of one weight carry the same hash."""
    return {name: h for name, _, h in export_for_engine(model)}


def engine_hashes(params: dict[str, torch.Tensor], profile: str) -> dict[str, str]:
    """The same hashes computed from parameters read back from an engine ({'P.w13_weight': uint8 tensor, ...})."""
    out = {}
    for name, t in params.items():
        if name.endswith(P.PACKED_WEIGHTS):
            q = common.MXFP4Tensor(t, params[P.scale_name(name)], profile)
            out[name] = out[P.scale_name(name)] = tensor_hash(q)
        elif name.endswith("_bias"):
            out[name] = _bias_hash(t)
    return out

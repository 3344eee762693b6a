"""gpt-oss expert tensors -> per-expert (shard, kind, tensor) pieces for ExpertWeightLoader.load_expert.

gpt-oss checkpoints fuse all experts of a layer into one tensor and interleave gate/up rows (row 2i = gate i,
row 2i+1 = up i). MXFP4 (`*_blocks` uint8 [E, N, K/32, 16] + `*_scales` uint8 [E, N, K/32]) and bf16 (hub
names: `gate_up_proj` [E, H, 2I] and `down_proj` [E, I, H], stored input-major) are both split here into one
expert's canonical [N, K] rows at a time, gate and up de-interleaved, so our w13 parameter is [w1; w3] as for every
other model. Only views and one expert's rows are touched: the bf16 expert stack is never built.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from common.layouts import gpt_oss
from common.moe.params import HF_PROJ_NAMES, VLLM_SHARD

# model.layers.L.mlp.experts.{gate_up_proj,down_proj}{_blocks,_scales,_bias,""}: fused, all experts
FUSED_TENSOR = re.compile(r"^(?P<layer>.*\.mlp\.experts)\.(?P<proj>gate_up_proj|down_proj)(?P<suffix>_blocks|_scales|_bias)?$")
# model.layers.L.mlp.experts.E.{gate,up,down}_proj.{weight,weight_scale}: our native format (biases stay fused)
NATIVE_TENSOR = re.compile(r"^(?P<layer>.*\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)"
                           r"\.(?P<suffix>weight|weight_scale)$")
_SHARD_OF = {HF_PROJ_NAMES[p]: VLLM_SHARD[p] for p in HF_PROJ_NAMES}


def parse_name(name: str) -> tuple[str, str, str, int | None] | None:
    """(layer prefix, projection, kind, expert or None when fused) for a gpt-oss expert tensor name, else None."""
    m = FUSED_TENSOR.match(name)
    if m is not None:
        kind = {"_blocks": "codes", "_scales": "scales", "_bias": "bias", None: "dense"}[m.group("suffix")]
        return m.group("layer"), m.group("proj"), kind, None
    m = NATIVE_TENSOR.match(name)
    if m is not None:
        kind = "scales" if m.group("suffix") == "weight_scale" else "codes"
        return m.group("layer"), m.group("proj"), kind, int(m.group("expert"))
    return None


def expert_pieces(proj: str, kind: str, expert: int | None, tensor: torch.Tensor, wanted: set[int],
                  name: str = "gpt-oss experts") -> Iterator[tuple[int, str, torch.Tensor]]:
    """(expert, shard, tensor) pieces of one checkpoint tensor, for this rank's experts only."""
    if expert is None:
        yield from split_experts(proj, kind, tensor, wanted, name)
    elif expert in wanted:
        # A float "weight" in a per-expert checkpoint is a bf16 projection (online mode); the loader decides.
        yield expert, _SHARD_OF[proj], tensor


def tensor_name(layer: str, expert: int, shard: str, kind: str) -> str:
    """Name of the fused checkpoint tensor (and expert/rows) a piece comes from, for error messages."""
    proj = "down_proj" if shard == "w2" else "gate_up_proj"
    suffix = {"codes": "_blocks", "scales": "_scales", "bias": "_bias", "dense": ""}[kind]
    rows = "" if shard == "w2" else (" gate rows" if shard == "w1" else " up rows")
    return f"{layer}.{proj}{suffix}[expert {expert}{rows}]"


def native_or_fused_name(layer: str, expert: int, shard: str, kind: str) -> str:
    """Native-format gpt-oss checkpoints: per-expert weights, fused biases."""
    if kind == "bias":
        return tensor_name(layer, expert, shard, kind)
    from .loader import native_tensor_name

    return native_tensor_name(layer, expert, shard, kind)


def _expert_rows(t: torch.Tensor, kind: str, name: str) -> torch.Tensor:
    """One expert's tensor as [N, ...] rows in output-major order (N = 2I interleaved for gate_up)."""
    if kind == "codes":
        return gpt_oss.blocks_to_codes(t, name)  # [N, K/32, 16] -> [N, K/2]: the same bytes
    if kind == "dense":
        return t.t()  # the hub stores bf16 experts input-major, [K, N]
    return t


def split_experts(proj: str, kind: str, fused: torch.Tensor, wanted: set[int] | None = None,
                  name: str = "gpt-oss experts") -> Iterator[tuple[int, str, torch.Tensor]]:
    """Yield (expert, shard, tensor [N, K/2 | K/32 | K] or [N]) from one fused gpt-oss tensor; experts not in
    `wanted` (other EP ranks) are skipped without being read."""
    for e in range(fused.shape[0]):
        if wanted is not None and e not in wanted:
            continue
        rows = _expert_rows(fused[e], kind, f"{name}[{e}]")
        if proj == "down_proj":
            yield e, "w2", rows.contiguous()
        elif kind == "bias":
            yield e, "w1", rows[0::2].contiguous()
            yield e, "w3", rows[1::2].contiguous()
        else:
            gate, up = gpt_oss.deinterleave_rows(rows, f"{name}[{e}]")
            yield e, "w1", gate
            yield e, "w3", up

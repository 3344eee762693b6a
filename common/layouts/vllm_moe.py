"""Canonical per-projection experts <-> vLLM's fused MoE parameters.

vLLM's MXFP4 MoE methods hold w13_weight uint8 [E, 2I, H/2] = [w1; w3] (all gate rows, then all up rows),
w13_weight_scale uint8 [E, 2I, H/32], w2_weight uint8 [E, H, I/2], w2_weight_scale uint8 [E, H, I/32]
(FusedMoE weight_loader: shard "w1" fills rows [0, I), "w3" rows [I, 2I)). gpt-oss checkpoints interleave gate/up
rows instead; `stacked_from_interleaved` / `interleaved_from_stacked` convert between the two row orders.
"""

from __future__ import annotations

import torch

from ..moe import params as P
from ..moe.params import PACKED_PARAMS
from ..tensor import MXFP4Tensor
from ._checks import expect_dtype, expect_even_rows, expect_rank, expect_shape
from .gpt_oss import deinterleave_rows, interleave_rows

PARAM_NAMES = PACKED_PARAMS  # the contract's names (common.moe.params)


def to_vllm_moe(gate: MXFP4Tensor, up: MXFP4Tensor, down: MXFP4Tensor) -> dict[str, torch.Tensor]:
    """gate, up [E, I, H] and down [E, H, I] -> the four vLLM MoE parameter tensors (new contiguous tensors)."""
    expect_rank(gate.codes, 3, "gate", "[E, I, H/2]")
    expect_shape(up.codes, tuple(gate.codes.shape), "up")
    e, i, h2 = gate.codes.shape
    expect_shape(down.codes, (e, h2 * 2, i // 2), "down")
    return {
        P.W13: torch.cat((gate.codes, up.codes), dim=-2),
        P.W13_SCALE: torch.cat((gate.scales, up.scales), dim=-2),
        P.W2: down.codes.contiguous(),
        P.W2_SCALE: down.scales.contiguous(),
    }


def from_vllm_moe(params: dict[str, torch.Tensor], profile: str) -> tuple[MXFP4Tensor, MXFP4Tensor, MXFP4Tensor]:
    """Inverse of to_vllm_moe: (gate, up, down) as canonical MXFP4Tensors."""
    missing = [n for n in PARAM_NAMES if n not in params]
    if missing:
        raise KeyError(f"vLLM MoE params lack {missing}; expected all of {PARAM_NAMES}")
    for n in PARAM_NAMES:
        expect_dtype(params[n], torch.uint8, n)
        expect_rank(params[n], 3, n, "[E, rows, bytes]")
    w13, s13 = params[P.W13], params[P.W13_SCALE]
    expect_even_rows(w13, P.W13)
    i = w13.shape[1] // 2
    gate = MXFP4Tensor(w13[:, :i].contiguous(), s13[:, :i].contiguous(), profile)
    up = MXFP4Tensor(w13[:, i:].contiguous(), s13[:, i:].contiguous(), profile)
    return gate, up, MXFP4Tensor(params[P.W2], params[P.W2_SCALE], profile)


def stacked_from_interleaved(x: torch.Tensor, name: str = "w13") -> torch.Tensor:
    """Rows (g0, u0, g1, u1, ...) -> (g0, g1, ..., u0, u1, ...) along dim 1 of [E, 2I, ...]."""
    gate, up = deinterleave_rows(x.movedim(1, -2), name)
    return torch.cat((gate, up), dim=-2).movedim(-2, 1).contiguous()


def interleaved_from_stacked(x: torch.Tensor, name: str = "w13") -> torch.Tensor:
    """Inverse of stacked_from_interleaved."""
    expect_even_rows(x.movedim(1, -2), name)
    i = x.shape[1] // 2
    return interleave_rows(x[:, :i].movedim(1, -2), x[:, i:].movedim(1, -2)).movedim(-2, 1).contiguous()

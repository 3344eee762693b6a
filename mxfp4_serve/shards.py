"""Shapes and tensor/expert-parallel shard arithmetic of one MoE layer's packed expert parameters.

vLLM's MoE parameters (docs/serve.md "Parameters, sharding, errors"): w13_weight uint8 [E, 2I, H/2] = [w1; w3] rows,
w13_weight_scale uint8 [E, 2I, H/32], w2_weight uint8 [E, H, I/2], w2_weight_scale uint8 [E, H, I/32], optional
biases w13_bias [E, 2I] and w2_bias [E, H]. Under TP, w1/w3 (column parallel) are split along their output rows N =
I, and w2 (row parallel) along its reduction axis K = I, i.e. (I/tp)/2 code bytes and (I/tp)/32 scale bytes per
rank, which is only possible when I/tp is a multiple of the 32-element block. Under EP each rank holds E_local whole
experts.
Pure torch: the unit tests drive it for TP=2 / EP=2 without an engine.
"""

from __future__ import annotations

import dataclasses

import torch

from common.constants import BLOCK_SIZE
from common.errors import ShapeError
from common.moe import params as moe_params

SHARDS = tuple(moe_params.SHARD_PROJ)  # vLLM's shard ids: w1 (gate), w3 (up), w2 (down)
KINDS = ("codes", "scales", "dense", "bias")  # packed codes, E8M0 scales, bf16 weight (online), bias


@dataclasses.dataclass(frozen=True)
class ExpertGeometry:
    """One MoE layer on one rank. hidden = H, intermediate = full I (all TP ranks), experts = global count."""

    layer_name: str
    hidden: int
    intermediate: int
    num_experts: int
    num_local_experts: int
    tp_rank: int = 0
    tp_size: int = 1

    def __post_init__(self) -> None:
        where = f"MoE layer '{self.layer_name}'"
        if self.hidden % BLOCK_SIZE:
            raise ShapeError(f"{where}: hidden size H = {self.hidden} (the K of w1/w3, gate_proj/up_proj) is not a "
                             f"multiple of the MXFP4 block size {BLOCK_SIZE}")
        if self.intermediate % self.tp_size:
            raise ShapeError(f"{where}: moe intermediate size {self.intermediate} does not split over "
                             f"tensor-parallel size {self.tp_size}")
        if self.intermediate_local % BLOCK_SIZE:
            what = ("moe intermediate size" if self.tp_size == 1
                    else f"moe intermediate size {self.intermediate} / TP {self.tp_size} =")
            raise ShapeError(f"{where}: {what} {self.intermediate_local} (the K of w2, down_proj) is not a multiple "
                             f"of the MXFP4 block size {BLOCK_SIZE}; a TP split must not break a 32-element block")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"{where}: tp_rank {self.tp_rank} outside [0, {self.tp_size})")

    @property
    def intermediate_local(self) -> int:
        return self.intermediate // self.tp_size

    def param_shapes(self, with_bias: bool = False) -> dict[str, tuple[int, ...]]:
        return moe_params.param_shapes(self.num_local_experts, self.hidden, self.intermediate_local, with_bias)

    def full_shape(self, shard: str, kind: str) -> tuple[int, ...]:
        """Shape of one expert's checkpoint tensor (all TP ranks) of this shard and kind."""
        n, k = (self.intermediate, self.hidden) if shard in ("w1", "w3") else (self.hidden, self.intermediate)
        return {"codes": (n, k // 2), "scales": (n, k // BLOCK_SIZE), "dense": (n, k), "bias": (n,)}[kind]

    def narrow(self, shard: str, kind: str, t: torch.Tensor) -> torch.Tensor:
        """This rank's slice of one expert's full checkpoint tensor (shape checked by the caller)."""
        if self.tp_size == 1:
            return t
        i = self.intermediate_local
        if shard in ("w1", "w3"):  # column parallel: rows [r*I/tp, (r+1)*I/tp) of every kind
            return t.narrow(0, self.tp_rank * i, i)
        if kind == "bias":  # w2 bias: the rank partial sums are all-reduced, so only rank 0 adds it
            return t if self.tp_rank == 0 else torch.zeros_like(t)
        per_rank = {"codes": i // 2, "scales": i // BLOCK_SIZE, "dense": i}[kind]
        return t.narrow(1, self.tp_rank * per_rank, per_rank)

    def destination(self, params: dict[str, torch.Tensor], local_expert: int, shard: str, kind: str) -> torch.Tensor:
        """The view of the layer parameter that this (expert, shard, kind) fills."""
        stem = "w2" if shard == "w2" else "w13"
        name = {"codes": f"{stem}_weight", "scales": f"{stem}_weight_scale", "bias": f"{stem}_bias"}[kind]
        dst = params[name][local_expert]
        if shard == "w2":
            return dst
        i = self.intermediate_local
        return dst.narrow(0, 0 if shard == "w1" else i, i)


def contiguous_expert_map(num_experts: int, ep_rank: int, ep_size: int) -> list[int]:
    """global -> local expert index (-1 elsewhere) for vLLM's default linear placement: rank r holds the
    contiguous block of ceil-free E/ep experts starting at r*E/ep (vLLM refuses E % ep != 0 for these models)."""
    if num_experts % ep_size:
        raise ValueError(f"{num_experts} experts do not split over expert-parallel size {ep_size}")
    per = num_experts // ep_size
    return [g - ep_rank * per if ep_rank * per <= g < (ep_rank + 1) * per else -1 for g in range(num_experts)]

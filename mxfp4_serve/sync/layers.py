"""The MoE layers a running engine serves with mxfp4_rl, seen as canonical packed weights that a sync may rewrite.

A layer is found by the `mxfp4_rl_loader` attribute our MoE method sets in create_weights; its ExpertWeightLoader
knows the geometry (TP rank, local experts) and the parameters. Reads and writes go through the backend:
- a backend that keeps the canonical layout (the default `MoEBackend.prepare`, e.g. the CPU reference) is read and
  written directly, in place;
- a backend whose `prepare` converts to its own layout must implement `read_canonical(layer, param_name)` and
  `write_experts(layer, param_name, local_experts, values)` (convert only the given experts, in place), or the sync
  is refused up front. Writing whole parameters with `copy_` (never `.data =` or `resize_`) keeps storage and
  shape, so captured CUDA graphs and vLLM's layerwise reload stay valid.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from common.audit import tensor_hash
from common.constants import BLOCK_SIZE
from common.tensor import MXFP4Tensor

from ..backends.base import MoEBackend, keeps_canonical
from ..loader import ExpertWeightLoader
from .wire import SyncError, shard_key

WEIGHTS = ("w13_weight", "w2_weight")  # each paired with its "<name>_scale"


@dataclasses.dataclass
class SyncedLayer:
    """One MoE layer of this rank: its loader (geometry, params), its backend and profile."""

    module: nn.Module
    loader: ExpertWeightLoader
    backend: MoEBackend | None

    @property
    def name(self) -> str:
        return self.loader.geometry.layer_name

    @property
    def profile(self) -> str:
        return self.loader.settings.profile

    def check_supported(self) -> None:
        if self.loader.has_bias:
            raise SyncError(f"MoE layer '{self.name}' has expert biases (gpt-oss); syncing biases is not supported "
                            f"yet by mxfp4_rl.sync/1")
        if not keeps_canonical(self.backend) and not (hasattr(self.backend, "read_canonical")
                                                       and hasattr(self.backend, "write_experts")):
            raise SyncError(f"MoE backend {self.backend.name!r} of layer '{self.name}' converts the packed weights "
                            f"in prepare() but implements no read_canonical/write_experts: in-place sync impossible")

    # ---- shard geometry ---------------------------------------------------------------------------------------------
    def full_shape(self, weight: str) -> tuple[int, int, int]:
        """Logical shape [E_global, N, K] of the whole (all ranks) weight."""
        g = self.loader.geometry
        return (g.num_experts, 2 * g.intermediate, g.hidden) if weight == "w13_weight" else \
            (g.num_experts, g.hidden, g.intermediate)

    def descriptor(self, weight: str) -> dict | None:
        """Which part of the full weight this rank holds: global experts, row ranges, [first, last) block; None for
        the whole tensor. w13 under TP: rows [r*i, (r+1)*i) of the gate half and of the up half; w2: blocks of K."""
        g = self.loader.geometry
        experts = [int(e) for e in self.loader.local_to_global]
        if g.tp_size == 1 and experts == list(range(g.num_experts)):
            return None
        i, r = g.intermediate_local, g.tp_rank
        if weight == "w13_weight":
            rows = [[r * i, (r + 1) * i], [g.intermediate + r * i, g.intermediate + (r + 1) * i]]
            blocks = [0, g.hidden // BLOCK_SIZE]
        else:
            rows = [[0, g.hidden]]
            blocks = [r * i // BLOCK_SIZE, (r + 1) * i // BLOCK_SIZE]
        return {"experts": experts, "rows": rows, "blocks": blocks}

    def key(self, weight: str) -> str:
        return shard_key(self.descriptor(weight))

    def local_shape(self, weight: str) -> tuple[int, int, int]:
        codes = self.loader.params[weight]
        return (codes.shape[0], codes.shape[1], codes.shape[2] * 2)

    # ---- canonical bytes ------------------------------------------------------------------------------------------
    def read(self, weight: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, scales) in the canonical layout: the live parameters for canonical backends (no copy)."""
        if keeps_canonical(self.backend):
            return self.loader.params[weight], self.loader.params[weight + "_scale"]
        return (self.backend.read_canonical(self.module, weight),
                self.backend.read_canonical(self.module, weight + "_scale"))

    def write(self, weight: str, experts: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> None:
        """Write canonical bytes of the given LOCAL experts in place (codes/scales hold those experts only)."""
        if experts.numel() == 0:
            return
        # scales first: a backend that refuses them (hopper_triton's one-multiply bound) leaves the layer unchanged
        for pname, values in ((weight + "_scale", scales), (weight, codes)):
            if keeps_canonical(self.backend):
                param = self.loader.params[pname]
                param.index_copy_(0, experts.to(param.device), values.to(param.device))
            else:
                self.backend.write_experts(self.module, pname, experts, values)

    def hash(self, weight: str) -> str:
        codes, scales = self.read(weight)
        return tensor_hash(MXFP4Tensor(codes, scales, self.profile))


def find_layers(model: nn.Module) -> dict[str, SyncedLayer]:
    """{layer name: SyncedLayer} for every MoE layer of the model served by mxfp4_rl (module order)."""
    out = {}
    for module in model.modules():
        loader = getattr(module, "mxfp4_rl_loader", None)
        if isinstance(loader, ExpertWeightLoader):
            method = getattr(module, "quant_method", None)
            backend = getattr(method, "backend", None)
            out[loader.geometry.layer_name] = SyncedLayer(module, loader, backend)
    return out

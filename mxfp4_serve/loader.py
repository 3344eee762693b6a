"""The weight loader of the MXFP4 MoE parameters: what vLLM calls as `param.weight_loader`.

One expert's tensor arrives at a time (vLLM streams the checkpoint). Packed codes and E8M0 scales are checked
(dtype, shape, scale bytes the profile reserves: common.checkpoint.validate.check_scale_bytes) and copied into this
rank's slice; in online mode a bf16 projection is sliced for TP and quantized with the codec right away, so the layer never holds the bf16 expert stack. Bytes are those of the
offline converter because quantization is per row along K in 32-blocks, and the TP slice never breaks a block
(shards.ExpertGeometry refuses such splits). Every (expert, shard, kind) written is recorded so that a checkpoint
missing a tensor fails at `check_complete` instead of serving uninitialised memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from common import quantize
from common.checkpoint.validate import check_decoded_range, check_scale_bytes
from common.errors import DTypeError, ShapeError
from common.moe import params as P
from common.moe.params import HF_PROJ_NAMES, SHARD_PROJ

from .settings import ServeSettings
from .shards import SHARDS, ExpertGeometry

# float8_e8m0fnu scale tensors (DeepSeek-V4 layout, torch views) carry the same byte as our uint8 scales.
_SCALE_DTYPES = tuple(d for d in (torch.uint8, getattr(torch, "float8_e8m0fnu", None)) if d is not None)
_CODE_DTYPES = (torch.uint8, torch.int8)  # DeepSeek-V4 stores the packed nibbles as int8
_DENSE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def native_tensor_name(layer_name: str, expert: int, shard: str, kind: str) -> str:
    """Checkpoint name of one expert tensor in the native / hub per-expert layout (for error messages)."""
    suffix = {"codes": "weight", "dense": "weight", "scales": "weight_scale", "bias": "bias"}[kind]
    return f"{layer_name}.{expert}.{HF_PROJ_NAMES[SHARD_PROJ[shard]]}.{suffix}"


class ExpertWeightLoader:
    """Loads one layer's experts into its packed parameters (w13_weight, w13_weight_scale, w2_weight, ...).

    to_local maps a global expert id to this rank's local index, or -1 (expert parallelism: not ours).
    tensor_name names a checkpoint tensor in errors; the gpt-oss path passes one that names its fused tensors.
    """

    def __init__(self, geometry: ExpertGeometry, settings: ServeSettings, params: Mapping[str, torch.Tensor],
                 to_local: Callable[[int], int], local_to_global: Sequence[int],
                 tensor_name: Callable[[str, int, str, str], str] = native_tensor_name) -> None:
        self.geometry = geometry
        self.settings = settings
        self.params = dict(params)
        self.to_local = to_local
        self.local_to_global = list(local_to_global)
        self.tensor_name = tensor_name
        self.has_bias = P.W13_BIAS in self.params
        self._kind_of = {id(p): name for name, p in self.params.items()}
        # loaded[e, s, k]: local expert e, shard SHARDS[s], k = 0 codes / 1 scales / 2 bias
        self.loaded = torch.zeros(geometry.num_local_experts, len(SHARDS), 3, dtype=torch.bool)
        self.writes = 0  # tensors written through this loader (a reload too): cached audit hashes check it

    # vLLM entry point ---------------------------------------------------------------------------------------------
    def __call__(self, param: torch.Tensor, loaded_weight: torch.Tensor, weight_name: str = "",
                 shard_id: str = "", expert_id: int = -1, return_success: bool = False, **_: object):
        """Signature of vLLM's MoE weight loaders (keyword call from RoutedExperts.load_weights)."""
        pname = self._kind_of.get(id(param))
        if pname is None:
            raise ValueError(f"MoE layer '{self.geometry.layer_name}': parameter for '{weight_name}' is not one of "
                             f"this layer's MXFP4 parameters {sorted(self.params)}")
        if shard_id not in SHARDS:
            raise ValueError(f"MoE layer '{self.geometry.layer_name}': shard id must be one of {SHARDS}, "
                             f"got {shard_id!r} for '{weight_name}'")
        if pname.endswith("bias"):
            kind = "bias"
        elif pname.endswith("scale"):
            kind = "scales"
        else:
            kind = "dense" if loaded_weight.is_floating_point() else "codes"
        ok = self.load_expert(int(expert_id), shard_id, kind, loaded_weight)
        return ok if return_success else None

    # the one loading path (the gpt-oss loader calls it directly) -------------------------------------------------
    def load_expert(self, expert: int, shard: str, kind: str, tensor: torch.Tensor) -> bool:
        """Write one expert's full (all-TP-ranks) checkpoint tensor; False when the expert lives on another rank."""
        local = self.to_local(expert)
        if local < 0:
            return False
        self.writes += 1
        name = self.tensor_name(self.geometry.layer_name, expert, shard, kind)
        if kind == "dense":
            self._load_dense(local, shard, tensor, name)
            return True
        tensor = self._check(tensor, shard, kind, name)
        part = self.geometry.narrow(shard, kind, tensor)
        if kind == "bias":
            if not self.has_bias:
                raise ShapeError(f"checkpoint tensor '{name}': the layer '{self.geometry.layer_name}' has no biases")
        self.geometry.destination(self.params, local, shard, kind).copy_(part)
        loaded = self.loaded[local, SHARDS.index(shard)]
        loaded[("codes", "scales", "bias").index(kind)] = True
        if kind != "bias" and bool(loaded[:2].all()):  # both halves in: no block may decode beyond bf16
            check_decoded_range(self.geometry.destination(self.params, local, shard, "codes"),
                                self.geometry.destination(self.params, local, shard, "scales"),
                                self.tensor_name(self.geometry.layer_name, expert, shard, "codes"))
        return True

    def _check(self, t: torch.Tensor, shard: str, kind: str, name: str) -> torch.Tensor:
        if self.settings.online and kind in ("codes", "scales"):
            raise DTypeError(f"checkpoint tensor '{name}': packed MXFP4 {kind} ({t.dtype}) in a checkpoint served "
                             f"in online mode (format 'bf16'); expected a floating-point weight to quantize")
        allowed = {"codes": _CODE_DTYPES, "scales": _SCALE_DTYPES, "bias": _DENSE_DTYPES}[kind]
        if t.dtype not in allowed:
            hint = " (bf16 experts need online mode: format 'bf16')" if kind == "codes" else ""
            raise DTypeError(f"checkpoint tensor '{name}': MXFP4 {kind} must have dtype "
                             f"{' or '.join(str(d) for d in allowed)}, got {t.dtype}{hint}")
        expected = self.geometry.full_shape(shard, kind)
        if tuple(t.shape) != expected:
            raise ShapeError(f"checkpoint tensor '{name}': expected {kind} of shape {expected} for "
                             f"{shard} of MoE layer '{self.geometry.layer_name}', got {tuple(t.shape)}")
        if kind == "bias":
            return t
        t = t.view(torch.uint8) if t.dtype != torch.uint8 else t
        if kind == "scales":  # NaN, the profile's Inf-block byte and unreachable bytes: as inspect and the learner
            check_scale_bytes(t, self.settings.profile, name)
        return t

    def _load_dense(self, local: int, shard: str, t: torch.Tensor, name: str) -> None:
        if not self.settings.online:
            raise DTypeError(f"checkpoint tensor '{name}': got a {t.dtype} weight, but the checkpoint's format "
                             f"'{self.settings.fmt}' stores packed uint8 MXFP4 codes (format 'bf16' quantizes at load)")
        if t.dtype not in _DENSE_DTYPES:
            raise DTypeError(f"checkpoint tensor '{name}': expected a float weight, got {t.dtype}")
        expected = self.geometry.full_shape(shard, "dense")
        if tuple(t.shape) != expected:
            raise ShapeError(f"checkpoint tensor '{name}': expected shape {expected}, got {tuple(t.shape)}")
        dst_codes = self.geometry.destination(self.params, local, shard, "codes")
        part = self.geometry.narrow(shard, "dense", t).to(dst_codes.device)
        q = quantize(part, profile=self.settings.profile, name=name)
        dst_codes.copy_(q.codes)
        self.geometry.destination(self.params, local, shard, "scales").copy_(q.scales)
        self.loaded[local, SHARDS.index(shard), :2] = True

    # completeness ----------------------------------------------------------------------------------------------------
    def missing(self) -> list[str]:
        """Checkpoint tensors that were never loaded (names as in the checkpoint), in expert order."""
        kinds = ("codes", "scales", "bias") if self.has_bias else ("codes", "scales")
        out = []
        for local, s, k in self.loaded[..., : len(kinds)].logical_not().nonzero().tolist():
            kind = kinds[k]
            if self.settings.online and kind == "codes":
                kind = "dense"
            elif self.settings.online and kind == "scales":
                continue  # written together with the codes
            out.append(self.tensor_name(self.geometry.layer_name, self.local_to_global[local], SHARDS[s], kind))
        return out

    def check_complete(self) -> None:
        missing = self.missing()
        if missing:
            shown = ", ".join(f"'{m}'" for m in missing[:6])
            more = f" and {len(missing) - 6} more" if len(missing) > 6 else ""
            raise ValueError(f"MoE layer '{self.geometry.layer_name}': {len(missing)} expert tensor(s) missing from "
                             f"the checkpoint: {shown}{more}. A native MXFP4 checkpoint has {{prefix}}.weight (uint8 "
                             f"[N, K/2]) and {{prefix}}.weight_scale (uint8 [N, K/32]) for every expert projection")

"""Stage, verify and commit a weight sync on one engine rank, atomically.

`stage(payload)` builds, for every entry, the complete canonical bytes this rank will serve (a full payload is
sliced to the rank's shard, dense weights are quantized with the engine's profile; expert biases and unmerged
expert adapters are sliced like their weights; non-expert parameters are kept for the model's own loader,
sync/params.py) and checks their audit hash against the learner's before keeping them. A block delta is kept as its
changed blocks where the layer's layout can write single blocks (canonical, kb-major: StagedBlocks, whose hash
comes from the served weight's fingerprint lanes updated with the changed words), else applied onto a copy of the
live bytes. Nothing served changes.
`commit(sync_id, names)` is one RPC, so vLLM runs it between two engine steps: it refuses unless every named entry
is staged against the version still served, then writes only the experts (or a delta's blocks) whose bytes differ,
in place, keeping their previous bytes until every write and the byte-for-byte read-back succeeded; any failure
restores them. On layout-writable layers (SyncedLayer.layout_writable) the stage converts the bytes to the served
form once, so the commit (inside the engine's pause) diffs, writes and reads back raw bytes. A sync
interrupted before commit (learner crash, failed stage, abort) therefore leaves the previous version whole.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from torch import nn

from common import moe, quantize
from common.audit import block_words, dense_hash, hash_of_lanes, mxfp4_lanes, same_bytes
from common.checkpoint.validate import check_scale_bytes, reserved_scale_low
from common.constants import BLOCK_SIZE, E8M0_NAN
from common.errors import CheckpointError
from common.fingerprint import moved_lanes, update_lanes_of
from common.moe import params as P
from common.moe.wire import (
    DENSE_DTYPES,
    FULL_KEY,
    PACKED_KINDS,
    PROTOCOL,
    SyncError,
    SyncPayloadError,
    SyncStateError,
    bias_shard,
    check_header,
    field,
    lora_shard,
)
from common.tensor import MXFP4Tensor

from .. import expert_lora
from .layers import WEIGHTS, SyncedLayer, find_layers
from .params import ParamTargets, StagedParam, load_params, stage_param


@dataclasses.dataclass
class Staged:
    layer: SyncedLayer
    weight: str
    codes: torch.Tensor | None  # canonical, this rank's shard, new contiguous storage (None: only `stored` kept)
    scales: torch.Tensor
    hash: str
    lanes: tuple[list[int], list[int]]  # fingerprint lanes of codes and scales (behind hash)
    base_version: int
    payload_bytes: int
    # the codes as the layer stores them (SyncedLayer.stored_form), converted once here, before the pause, so that
    # the commit diffs, writes and reads back raw bytes; None where the layer is written through its backend
    stored: torch.Tensor | None = None


@dataclasses.dataclass
class StagedBlocks:
    """A block delta staged sparsely (SyncedLayer.layout_writable layers): the changed local 32-blocks and their new
    canonical bytes. Its hash and lanes are those of the whole weight the blocks make, computed from the served
    weight's lanes and the changed words alone (common.fingerprint.update_lanes): a 1% delta costs about 1% of a
    full stage and commit, not a copy, a rehash and a rewrite of the whole weight."""

    layer: SyncedLayer
    weight: str
    blocks: torch.Tensor  # long [M, 3] local (expert, row, block), each once
    codes: torch.Tensor  # uint8 [M, 16] canonical
    scales: torch.Tensor  # uint8 [M]
    hash: str
    lanes: tuple[list[int], list[int]]
    base_version: int
    payload_bytes: int
    experts: int  # how many local experts the blocks touch


@dataclasses.dataclass
class StagedExtra:
    """A staged expert bias ("bias": tensors = (values,)) or adapter ("lora": tensors = (a, b)) of this rank."""

    kind: str
    layer: SyncedLayer
    name: str  # the layer parameter (bias) or packed weight (lora) it replaces
    tensors: tuple[torch.Tensor, ...]
    hash: str
    base_version: int
    payload_bytes: int


def _split_name(name: str) -> tuple[str, str]:
    layer, _, weight = name.rpartition(".")
    return layer, weight


def _shard_of(full: torch.Tensor, desc: dict | None, bytes_per_block: int) -> torch.Tensor:
    """The rank's part of a full [E, N, B*bytes_per_block] tensor (codes: 16 bytes per block, scales: 1)."""
    if desc is None:
        return full
    experts = torch.tensor(desc["experts"], dtype=torch.long, device=full.device)
    rows = torch.cat([torch.arange(a, b) for a, b in desc["rows"]]).to(full.device)
    b0, b1 = desc["blocks"]
    return full.index_select(0, experts).index_select(1, rows)[..., b0 * bytes_per_block:b1 * bytes_per_block]


def _experts_differ(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[E] bool: whether expert e's bytes differ; compared as 64-bit words where the rows allow (8x fewer elements
    than bytes: this runs over every served byte of a sync)."""
    a, b = a.contiguous(), b.contiguous()
    if a.shape[-1] % 8 == 0 and a.data_ptr() % 8 == 0 and b.data_ptr() % 8 == 0:
        a, b = a.view(torch.int64), b.view(torch.int64)
    return (a != b).flatten(1).any(1)


def _local_index(index: torch.Tensor, desc: dict | None, n_rows: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Global (expert, row, block) triples -> (mask of those in this shard, None for all of them, local triples)."""
    if desc is None:
        return None, index.long()
    dev = index.device
    g2l = torch.full((max(desc["experts"]) + 1 if desc["experts"] else 1,), -1, dtype=torch.long, device=dev)
    g2l[torch.tensor(desc["experts"], dtype=torch.long, device=dev)] = torch.arange(len(desc["experts"]), device=dev)
    rows = torch.cat([torch.arange(a, b, device=dev) for a, b in desc["rows"]])
    r2l = torch.full((n_rows,), -1, dtype=torch.long, device=dev)
    r2l[rows] = torch.arange(rows.numel(), device=dev)
    idx = index.long()
    e = torch.where(idx[:, 0] < g2l.numel(), g2l[idx[:, 0].clamp(max=g2l.numel() - 1)], -1)
    r = r2l[idx[:, 1]]
    b = idx[:, 2] - desc["blocks"][0]
    keep = (e >= 0) & (r >= 0) & (b >= 0) & (idx[:, 2] < desc["blocks"][1])
    return keep, torch.stack((e, r, b), dim=1)[keep]


class EngineSync:
    """The sync state of one engine rank (one per worker; the worker extension owns it)."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = find_layers(model)
        if not self.layers:
            raise SyncError("this engine serves no MoE layer with mxfp4_rl (quantization 'mxfp4_rl' not active?)")
        profiles = {layer.profile for layer in self.layers.values()}
        if len(profiles) != 1:
            raise SyncError(f"MoE layers of this engine use several profiles {sorted(profiles)}")
        (self.profile,) = profiles
        self.model = model
        self.targets = ParamTargets(model, list(self.layers))
        self.version = 0
        self.param_hashes: dict[str, str] = {}  # checkpoint name -> hash of the bytes last loaded by a sync
        self._staged: dict[str, dict[str, Staged | StagedBlocks | StagedExtra | StagedParam]] = {}
        self._committed: dict | None = None  # {"version", "hashes", "phases"} as the last commit read them back

    # ---- read-only ------------------------------------------------------------------------------------------------
    def hashes(self, known: dict[str, str] | None = None, fresh: bool = False) -> dict[str, str]:
        """The audit hash of everything served; `known`: hashes just read back (a commit's). Packed weights reuse
        the hash of their last read while nothing wrote the layer since (SyncedLayer.hash); `fresh` reads every
        weight again (the audit RPC)."""
        known = known or {}
        out = {}
        for n, layer in self.layers.items():
            for w in WEIGHTS:
                out[f"{n}.{w}"] = known.get(f"{n}.{w}") or layer.hash(w, fresh=fresh)
            for suffix in layer.extra_weights():
                out[f"{n}.{suffix}"] = known.get(f"{n}.{suffix}") or layer.extra_hash(suffix)
        out.update(self.param_hashes)
        return out

    def committed(self) -> dict:
        """{"version", "hashes", "phases"} of the last commit, its hashes read back when it wrote: what a learner
        verifies right after its commit without reading every weight again. Before any commit: the current hashes."""
        if self._committed is None or self._committed["version"] != self.version:
            return {"version": self.version, "hashes": self.hashes()}
        return self._committed

    def dtype(self) -> torch.dtype:
        """The dtype the engine serves its unquantized parameters in (the input embedding's)."""
        emb = getattr(self.model, "get_input_embeddings", None)
        weight = getattr(emb(), "weight", None) if callable(emb) else None
        if isinstance(weight, torch.Tensor):
            return weight.dtype
        # a model of MoE layers only (unit tests) has no float parameter: nothing a 'param' entry could update
        return next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)

    def info(self) -> dict:
        """What a learner needs before a sync: protocol, profile, version, the engine's dtype and expert-LoRA
        capacity, and per weight (packed, bias, adapter) its kind, shard and hash."""
        weights = {}
        lora = None
        for n, layer in self.layers.items():
            for w in WEIGHTS:
                weights[f"{n}.{w}"] = {"kind": "packed", "shape": list(layer.full_shape(w)),
                                       "descriptor": layer.descriptor(w), "key": layer.key(w), "hash": layer.hash(w)}
            for suffix, (kind, w) in layer.extra_weights().items():
                weights[f"{n}.{suffix}"] = {"kind": kind, "weight": f"{n}.{w}", "descriptor": layer.descriptor(w),
                                            "key": layer.key(w), "hash": layer.extra_hash(suffix)}
                if kind == "bias":
                    weights[f"{n}.{suffix}"]["dtype"] = str(layer.read_bias(suffix).dtype).removeprefix("torch.")
            cfg = expert_lora.config_of(layer.module)
            if cfg is not None:
                lora = cfg.as_dict()
        return {"protocol": PROTOCOL, "profile": self.profile, "version": self.version, "weights": weights,
                "dtype": str(self.dtype()).removeprefix("torch."), "expert_lora": lora,
                "params": dict(self.param_hashes),
                # checkpoint modules the engine fuses into one layer: a sync sends all of a group or none
                "fused": {k: list(v) for k, v in (getattr(self.model, "packed_modules_mapping", None) or {}).items()}}

    def read(self, name: str) -> dict:
        """Canonical codes/scales of one weight (CPU copies), for the learner's diff after a mismatch."""
        layer, weight = self._layer(name)
        codes, scales = layer.read(weight)
        return {"codes": codes.detach().cpu().clone(), "scales": scales.detach().cpu().clone(),
                "descriptor": layer.descriptor(weight), "profile": self.profile}

    def _layer(self, name: str) -> tuple[SyncedLayer, str]:
        layer_name, weight = _split_name(name)
        layer = self.layers.get(layer_name)
        if layer is None or weight not in WEIGHTS:
            raise SyncPayloadError(f"sync entry '{name}': no such MXFP4 expert weight in this engine; expected "
                                   f"'<layer>.w13_weight' or '<layer>.w2_weight' with layer one of "
                                   f"{list(self.layers)[:4]}{' ...' if len(self.layers) > 4 else ''}")
        return layer, weight

    # ---- stage ----------------------------------------------------------------------------------------------------
    def stage(self, payload: dict) -> dict:
        """Validate and stage payload entries (more than one stage call may build one sync)."""
        t0 = time.perf_counter()
        check_header(payload, self.profile)
        sync_id = str(payload["sync_id"])
        staged = {}
        for entry in payload["entries"]:
            kind = entry["kind"]
            if kind in PACKED_KINDS:
                s = self._stage_entry(entry)
            elif kind == "param":
                s = stage_param(self.targets, entry, self.version)
            else:
                s = self._stage_extra(entry)
            staged[entry["name"]] = s
        self._staged.setdefault(sync_id, {}).update(staged)
        return {"sync_id": sync_id, "staged": sorted(staged), "payload_bytes": sum(s.payload_bytes
                                                                                  for s in staged.values()),
                "seconds": time.perf_counter() - t0}

    def _expected(self, entry: dict, layer: SyncedLayer, weight: str, what: str = "hashes") -> str:
        table = entry.get(what)
        key = layer.key(weight)
        if not isinstance(table, dict) or key not in table:
            raise SyncPayloadError(f"sync entry '{entry['name']}': '{what}' has no hash for this rank's shard "
                                   f"{'(whole tensor)' if key == FULL_KEY else key}")
        return str(table[key])

    def _stage_entry(self, entry: dict) -> Staged:
        name = entry["name"]
        where = f"sync entry '{name}'"
        layer, weight = self._layer(name)
        e, n, k = layer.full_shape(weight)
        desc = layer.descriptor(weight)
        kind = entry["kind"]
        if kind == "packed":
            codes = field(entry, "codes", where, torch.uint8, (e, n, k // 2))
            scales = field(entry, "scales", where, torch.uint8, (e, n, k // BLOCK_SIZE))
            nbytes = codes.numel() + scales.numel()
            dev = layer.loader.params[weight].device
            codes = _shard_of(codes.to(dev), desc, BLOCK_SIZE // 2).contiguous()
            scales = _shard_of(scales.to(dev), desc, 1).contiguous()
        elif kind == "delta" and layer.layout_writable():
            return self._stage_blocks(entry, layer, weight, desc, n)
        elif kind == "delta":
            codes, scales, nbytes = self._apply_delta(entry, layer, weight, desc, n)
        else:
            w = field(entry, "weight", where, DENSE_DTYPES, (e, n, k))
            nbytes = w.numel() * w.element_size()
            dev = layer.loader.params[weight].device
            # quantization is per row along K in 32-blocks and shards never split a block: quantizing the shard
            # gives the shard of the full quantization
            q = quantize(_shard_of(w.to(dev), desc, BLOCK_SIZE), profile=self.profile, name=name)
            codes, scales = q.codes.contiguous(), q.scales.contiguous()
        if bool((scales == E8M0_NAN).any()):
            raise SyncPayloadError(f"sync entry '{name}': scale byte 0xFF (E8M0 NaN) in the payload")
        try:  # the scale bytes a checkpoint may not bring (common.checkpoint.validate): a sync may not either
            check_scale_bytes(scales, self.profile, name)
        except CheckpointError as exc:
            raise SyncPayloadError(f"sync entry '{name}': {exc}; nothing was changed") from None
        q = MXFP4Tensor(codes, scales, self.profile)
        lanes = mxfp4_lanes(q)
        h = hash_of_lanes(q.shape, q.profile, *lanes, codes.numel(), scales.numel())
        self._check_hash(entry, layer, weight, kind, h)
        stored = layer.stored_form(weight, codes) if layer.layout_writable() else None
        if stored is not None and stored is not codes:
            codes = None  # the stored form replaces the canonical copy: one staged copy of the policy, not two
        return Staged(layer, weight, codes, scales, h, lanes, self.version, nbytes, stored)

    def _check_hash(self, entry: dict, layer: SyncedLayer, weight: str, kind: str, h: str) -> None:
        expected = self._expected(entry, layer, weight)
        if h != expected:
            raise SyncPayloadError(f"sync entry '{entry['name']}' ({kind}): the staged bytes hash to {h[:16]}... but "
                                   f"the learner expects {expected[:16]}...: corrupted payload (or a delta computed "
                                   f"against other bytes); nothing was changed")

    def _stage_extra(self, entry: dict) -> StagedExtra:
        """An expert bias or an unmerged expert adapter: this rank's shard, checked, its hash compared."""
        name = entry["name"]
        where = f"sync entry '{name}'"
        layer_name, suffix = _split_name(name)
        layer = self.layers.get(layer_name)
        known = {} if layer is None else layer.extra_weights()
        if suffix not in known or known[suffix][0] != entry["kind"]:
            raise SyncPayloadError(f"{where} ({entry['kind']}): this engine has no such weight; it accepts "
                                   f"{sorted(known) or 'no bias or adapter entries'} for layer '{layer_name}'"
                                   + ("" if layer is not None else " (no MXFP4 MoE layer of that name)"))
        kind, weight = known[suffix]
        e, n, k = layer.full_shape(weight)
        desc = layer.descriptor(weight)
        if kind == "bias":
            live = layer.read_bias(suffix)
            t = field(entry, "tensor", where, live.dtype, (e, n))
            if not bool(torch.isfinite(t).all()):
                raise SyncPayloadError(f"{where}: holds NaN or Inf")
            tensors = (bias_shard(t.to(live.device), desc, weight),)
            nbytes = t.numel() * t.element_size()
        else:
            a = field(entry, "a", where, torch.float32, None)
            b = field(entry, "b", where, torch.float32, None)
            r = a.shape[1] if a.dim() == 3 else -1
            if tuple(a.shape) != (e, r, k) or tuple(b.shape) != (e, n, r):
                raise SyncPayloadError(f"{where}: LoRA factors must be a [{e}, r, {k}] and b [{e}, {n}, r], got "
                                       f"a {list(a.shape)} and b {list(b.shape)}")
            dev = getattr(layer.module, expert_lora.RANK_ATTR).device
            tensors = lora_shard(a.to(dev), b.to(dev), desc, weight)
            expert_lora.check_factors(layer.module, weight, *tensors, where)
            nbytes = a.numel() * 4 + b.numel() * 4
        h = dense_hash(kind, *tensors)
        expected = self._expected(entry, layer, weight)
        if h != expected:
            raise SyncPayloadError(f"sync entry '{name}' ({kind}): the staged bytes hash to {h[:16]}... but the "
                                   f"learner expects {expected[:16]}...: corrupted payload; nothing was changed")
        return StagedExtra(kind, layer, suffix if kind == "bias" else weight, tensors, h, self.version, nbytes)

    def _delta_fields(self, entry: dict, layer: SyncedLayer, weight: str, desc: dict | None, n_rows: int,
                      device: torch.device, in_kernel: bool = False):
        """(local blocks [M, 3] long, codes [M, 16], scales [M], payload bytes, outside) of a delta entry: its base
        checked against what is served, its fields' dtypes and shapes; the blocks of this rank's shard only, on
        `device`. `outside` is a device flag (0-dim bool) of an index outside the weight's blocks, for the caller
        to read with its own checks (_raise_outside): on a GPU every host read waits for the queue to drain. None
        where nothing is left to read: a shard's index was checked here (its mask reads the host anyway), and
        `in_kernel` leaves a whole weight's to the stage kernel (its local blocks are the global ones)."""
        name = entry["name"]
        where = f"sync entry '{name}'"
        base = self._expected(entry, layer, weight, "base_hashes")
        if layer.hash(weight) != base:
            raise SyncStateError(f"sync entry '{name}': delta computed against bytes {base[:16]}... but this engine "
                                 f"serves {layer.hash(weight)[:16]}...; send a full (packed) sync")
        index = field(entry, "index", where, (torch.int32, torch.int64), None)
        m = index.shape[0] if index.dim() == 2 else -1
        if index.dim() != 2 or index.shape[1] != 3:
            raise SyncPayloadError(f"sync entry '{name}': field 'index' must have shape [M, 3], got "
                                   f"{list(index.shape)}")
        cb = field(entry, "codes", where, torch.uint8, (m, BLOCK_SIZE // 2))
        sb = field(entry, "scales", where, torch.uint8, (m,))
        # the index, its checks and the scatter stay on the weight's device: a 1% delta of a 428 MB layer is 0.3 M
        # triples, which a round trip through the host made the slowest step of a GPU delta sync
        index, cb, sb = (t.to(device) for t in (index, cb, sb))
        nbytes = index.numel() * index.element_size() + cb.numel() + sb.numel()
        if desc is None and in_kernel:
            return index.long(), cb, sb, nbytes, None
        e, n, k = layer.full_shape(weight)
        bounds = torch.tensor([e, n, k // BLOCK_SIZE], device=device)
        outside = ((index < 0) | (index >= bounds)).any()
        if desc is None:  # the whole weight: no mask (a boolean index reads its count back to the host)
            return index.long(), cb, sb, nbytes, outside
        # a shard's mask is read back anyway, and an index outside the weight would index its maps out of range
        self._raise_outside(name, layer, weight, bool(outside))
        keep, local = _local_index(index, desc, n_rows)
        return local, cb[keep], sb[keep], nbytes, None

    @staticmethod
    def _raise_outside(name: str, layer: SyncedLayer, weight: str, outside: bool) -> None:
        if outside:
            e, n, k = layer.full_shape(weight)
            raise SyncPayloadError(f"sync entry '{name}': delta index outside the weight's blocks "
                                   f"{[e, n, k // BLOCK_SIZE]}")

    def _apply_delta(self, entry: dict, layer: SyncedLayer, weight: str, desc: dict | None, n_rows: int):
        codes, scales = (t.detach().clone() for t in layer.read(weight))
        local, cb, sb, nbytes, outside = self._delta_fields(entry, layer, weight, desc, n_rows, codes.device)
        self._raise_outside(entry["name"], layer, weight, outside is not None and bool(outside))
        ei, ri, bi = local.unbind(1)
        scales[ei, ri, bi] = sb
        blocks = codes.view(*codes.shape[:2], -1, BLOCK_SIZE // 2)
        blocks[ei, ri, bi] = cb
        return codes, scales, nbytes

    def _stage_blocks(self, entry: dict, layer: SyncedLayer, weight: str, desc: dict | None,
                      n_rows: int) -> StagedBlocks:
        in_kernel = layer.block_kernels(weight)
        local, cb, sb, nbytes, outside = self._delta_fields(entry, layer, weight, desc, n_rows,
                                                            layer.raw(weight)[1].device, in_kernel)
        stage = self._stage_lanes_kernel if in_kernel else self._stage_lanes_torch
        lanes, experts = stage(entry["name"], layer, weight, local, cb, sb, outside)
        e, n, k = layer.local_shape(weight)
        kb = k // BLOCK_SIZE
        h = hash_of_lanes((e, n, k), self.profile, *lanes, e * n * k // 2, e * n * kb)
        self._check_hash(entry, layer, weight, "delta", h)
        return StagedBlocks(layer, weight, local, cb.contiguous(), sb.contiguous(), h, lanes, self.version, nbytes,
                            experts)

    def _refuse_blocks(self, name: str, layer: SyncedLayer, weight: str, sb: torch.Tensor, outside: bool,
                       twice: bool, nan: bool, reserved: bool) -> None:
        """Raise for the first refusal found (one host read gave them all)."""
        self._raise_outside(name, layer, weight, outside)
        if twice:
            raise SyncPayloadError(f"sync entry '{name}': the delta names a block more than once; nothing was "
                                   f"changed")
        if nan:
            raise SyncPayloadError(f"sync entry '{name}': scale byte 0xFF (E8M0 NaN) in the payload")
        if reserved:
            try:
                check_scale_bytes(sb, self.profile, name)  # names the byte and where it is
            except CheckpointError as exc:
                raise SyncPayloadError(f"sync entry '{name}': {exc}; nothing was changed") from None

    def _stage_lanes_kernel(self, name: str, layer: SyncedLayer, weight: str, local: torch.Tensor, cb: torch.Tensor,
                            sb: torch.Tensor, outside: None) -> tuple[tuple[list[int], list[int]], int]:
        """(the new lanes, experts touched) in one pass over the delta and one host read (common.kernels.delta_stage:
        checks, old blocks read through the layout, lane moves, the scales' lanes). `outside` is None here: a
        whole weight's index is checked by the kernel, a shard's was by _delta_fields."""
        from common.kernels.delta_stage import stage_blocks

        live_codes, live_scales = layer.raw(weight)
        got = stage_blocks(local, cb, sb, live_codes, live_scales, kb_major=moe.layout_of(layer.module) is
                           moe.KB_MAJOR, reserved_low=reserved_scale_low(self.profile))
        self._refuse_blocks(name, layer, weight, sb, got.outside > 0, got.twice > 0, got.nan > 0, got.reserved > 0)
        return (moved_lanes(layer.lanes(weight)[0], got.code_moves), got.scale_lanes), got.experts

    def _stage_lanes_torch(self, name: str, layer: SyncedLayer, weight: str, local: torch.Tensor, cb: torch.Tensor,
                           sb: torch.Tensor, outside: torch.Tensor | None) -> tuple[tuple[list[int], list[int]], int]:
        """_stage_lanes_kernel in torch operations (CPU engines): two host reads."""
        e, n, k = layer.local_shape(weight)
        lin, code_words, scale_words = block_words(local, n, k // BLOCK_SIZE)
        # every refusal from one host read: an index outside the weight, a block named twice (sorted neighbours
        # equal), a NaN scale byte, a byte the profile reserves; with them the number of experts the delta touches,
        # which the commit reports
        order = lin.sort().values
        low = reserved_scale_low(self.profile)
        touched = torch.zeros(e, dtype=torch.bool, device=lin.device).index_fill_(0, local[:, 0], True)
        if outside is None:  # a shard's index, checked already
            outside = torch.zeros((), dtype=torch.bool, device=sb.device)
        flags = torch.stack((outside, (order[1:] == order[:-1]).any(), (sb == E8M0_NAN).any(), (sb >= low).any(),
                             touched.sum()))
        out, twice, nan, reserved, experts = flags.tolist()
        self._refuse_blocks(name, layer, weight, sb, out, twice, nan, reserved)
        code_lanes, scale_lanes = layer.lanes(weight)
        old_codes, _ = layer.read_blocks(weight, local)
        updates = [(code_lanes, code_words, old_codes.contiguous().view(torch.int64),
                    cb.contiguous().view(torch.int64))]
        if lin.numel():
            # several changed scale bytes may share a word (zero padded past the end, as words_of pads): the old
            # words read from the live scales, the new ones with the delta's bytes put in
            flat = layer.raw(weight)[1].reshape(-1)
            at = scale_words[:, None] * 8 + torch.arange(8, device=flat.device)
            old = torch.where(at < flat.numel(), flat[at.clamp(max=flat.numel() - 1)], 0).to(torch.uint8)
            new = old.clone()
            new[torch.searchsorted(scale_words, lin // 8), lin % 8] = sb
            updates.append((scale_lanes, scale_words, old.view(torch.int64), new.view(torch.int64)))
        code_lanes, *moved = update_lanes_of(updates)  # the second host read
        return (code_lanes, moved[0] if moved else scale_lanes), int(experts)

    # ---- commit / abort -------------------------------------------------------------------------------------------
    def abort(self, sync_id: str) -> dict:
        dropped = self._staged.pop(str(sync_id), {})
        return {"sync_id": str(sync_id), "dropped": sorted(dropped)}

    def commit(self, sync_id: str, names: list[str]) -> dict:
        """Write every staged entry of sync_id in place, or nothing. Returns the served hashes afterwards."""
        t0 = time.perf_counter()
        staged = self._staged.pop(str(sync_id), None)
        if staged is None:
            raise SyncStateError(f"commit of unknown sync {sync_id!r} (never staged, aborted or already committed)")
        missing = sorted(set(names) - set(staged))
        if missing:
            raise SyncStateError(f"commit of sync {sync_id!r} refused: entries {missing[:4]} were never staged "
                                 f"(interrupted transfer); the engine keeps serving version {self.version}")
        stale = [n for n, s in staged.items() if s.base_version != self.version]
        if stale:
            raise SyncStateError(f"commit of sync {sync_id!r} refused: {stale[:4]} were staged against version "
                                 f"{staged[stale[0]].base_version}, the engine now serves version {self.version}")
        self._check_lora_ranks(staged)
        phases = {"checks": time.perf_counter() - t0}
        changed_experts, read_back = self._write_all(staged, phases)
        self.version += 1
        t1 = time.perf_counter()
        self._committed = {"version": self.version, "hashes": self.hashes(known=read_back), "phases": phases}
        phases["served hashes"] = time.perf_counter() - t1
        return {"sync_id": str(sync_id), **self._committed, "changed_experts": changed_experts,
                "seconds": time.perf_counter() - t0}

    @staticmethod
    def _check_lora_ranks(staged: dict) -> None:
        """A layer's adapters share one active rank: both of its weights' adapters come together, at one rank."""
        by_layer: dict[str, dict[str, int]] = {}
        for s in staged.values():
            if isinstance(s, StagedExtra) and s.kind == "lora":
                by_layer.setdefault(s.layer.name, {})[s.name] = s.tensors[0].shape[1]
        for layer, ranks in by_layer.items():
            if set(ranks) != set(WEIGHTS) or len(set(ranks.values())) != 1:
                raise SyncPayloadError(f"sync of expert LoRA for layer '{layer}': expected the adapters of "
                                       f"{list(WEIGHTS)} at one rank, got {ranks}; nothing was changed")

    def _write_all(self, staged: dict, phases: dict[str, float]) -> tuple[dict[str, int], dict[str, str]]:
        """Write everything staged, then read each entry back and check it (packed weights byte for byte against
        the staged bytes, biases and adapters by hash); returns (experts changed per packed weight, {entry name:
        hash of what is served}). Any failure restores the previous values and re-raises.
        `phases` gets the seconds of each step."""
        undo: list = []  # callables restoring what was written, in write order
        changed, read_back = {}, {}
        try:
            t = time.perf_counter()
            for name, s in staged.items():
                if isinstance(s, Staged):
                    changed[name] = self._write_packed(s, undo)
                elif isinstance(s, StagedBlocks):
                    changed[name] = self._write_blocks(s, undo)
                elif isinstance(s, StagedExtra):
                    self._write_extra(s, undo)
            phases["write experts"] = time.perf_counter() - t
            t = time.perf_counter()
            params = [s for s in staged.values() if isinstance(s, StagedParam)]
            undo += load_params(self.targets, params)
            phases["load params"] = time.perf_counter() - t
            t = time.perf_counter()
            for name, s in staged.items():
                if isinstance(s, Staged):
                    # read back and compared with the staged bytes, whose hash the stage checked against the
                    # learner's: as strong as hashing what was read (stronger: equality, not a fingerprint)
                    ok = (s.layer.serves(s.weight, s.codes, s.scales, s.hash, s.lanes) if s.stored is None
                          else s.layer.serves_stored(s.weight, s.stored, s.scales, s.hash, s.lanes))
                    if not ok:
                        raise SyncError(f"sync commit: '{name}' reads back other bytes than were staged (backend "
                                        f"layout conversion is not a byte permutation?)")
                    read_back[name] = s.hash
                elif isinstance(s, StagedBlocks):
                    # the written blocks, read back through the layout and compared byte for byte; the others were
                    # not written (an indexed write touches its blocks only)
                    if not s.layer.holds_blocks(s.weight, s.blocks, s.codes, s.scales):
                        raise SyncError(f"sync commit: '{name}' reads back other bytes than were staged in the "
                                        f"delta's blocks (backend layout conversion is not a byte permutation?)")
                    s.layer.adopt(s.weight, s.hash, s.lanes)
                    read_back[name] = s.hash
                elif isinstance(s, StagedExtra):
                    read_back[name] = s.layer.extra_hash(_split_name(name)[1])
                    if read_back[name] != s.hash:
                        raise SyncError(f"sync commit: '{name}' reads back with another hash than staged")
            for s in params:
                self.param_hashes[s.name] = s.hash
            phases["read back + check"] = time.perf_counter() - t
        except BaseException as err:
            failed = []
            for restore_one in reversed(undo):
                try:
                    restore_one()
                except Exception as exc:  # noqa: BLE001 - keep restoring the others, report below
                    failed.append(str(exc))
            if failed:
                raise SyncError(f"sync commit failed ({err}) and restoring the previous values failed ({failed[:2]}): "
                                f"the engine state is unknown; send a full sync") from err
            raise
        return changed, read_back

    @staticmethod
    def _write_packed(s: Staged, undo: list) -> int:
        """Write the experts whose bytes differ, keeping the old ones for the undo. On the stored form where the
        stage converted it (s.stored: the live bytes diffed, kept and overwritten as they are stored, no conversion
        in the commit), else in canonical bytes through the backend's read and write."""
        if s.stored is not None:
            def read():
                return s.layer.raw(s.weight)

            def write(experts, codes, scales, canonical_codes=None):
                s.layer.write_stored(s.weight, experts, codes, scales, canonical_codes)
            new_codes = s.stored
        else:
            def read():
                return s.layer.read(s.weight)

            def write(experts, codes, scales, canonical_codes=None):
                s.layer.write(s.weight, experts, codes, scales)
            new_codes = s.codes
        codes, scales = read()
        diff = _experts_differ(codes, new_codes) | _experts_differ(scales, s.scales)
        experts = diff.nonzero().flatten()
        # index_select copies (the undo's values); advanced indexing took 10x longer on the CPU
        old_codes, old_scales = codes.index_select(0, experts), scales.index_select(0, experts)

        def restore() -> None:
            write(experts, old_codes, old_scales)
            now_codes, now_scales = read()  # a restore through a faulty layout must not pass silently
            if not (same_bytes(now_codes.index_select(0, experts), old_codes)
                    and same_bytes(now_scales.index_select(0, experts), old_scales)):
                raise SyncError(f"'{s.layer.name}.{s.weight}' does not read back its previous bytes after the restore")

        undo.append(restore)
        every = experts.numel() == codes.shape[0]  # a full sync: the staged tensors as they are

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t if every else t.index_select(0, experts)

        write(experts, pick(new_codes), pick(s.scales), pick(s.codes) if s.codes is not None else None)
        return int(experts.numel())

    @staticmethod
    def _write_blocks(s: StagedBlocks, undo: list) -> int:
        # nothing is written when the swap raises (the backend's value checks come first)
        old_codes, old_scales = s.layer.swap_blocks(s.weight, s.blocks, s.codes, s.scales)

        def restore() -> None:
            s.layer.swap_blocks(s.weight, s.blocks, old_codes, old_scales)
            if not s.layer.holds_blocks(s.weight, s.blocks, old_codes, old_scales):
                raise SyncError(f"'{s.layer.name}.{s.weight}' does not read back its previous bytes after the restore")

        undo.append(restore)
        return s.experts

    @staticmethod
    def _write_extra(s: StagedExtra, undo: list) -> None:
        if s.kind == "bias":
            old = s.layer.read_bias(s.name)
            undo.append(lambda: s.layer.write_bias(s.name, old))
            s.layer.write_bias(s.name, s.tensors[0])
            return
        module = s.layer.module
        old_rank = expert_lora.active_rank(module)
        a_name, b_name = P.LORA_FACTORS[s.name]
        old_a, old_b = getattr(module, a_name).clone(), getattr(module, b_name).clone()

        def back() -> None:
            getattr(module, a_name).copy_(old_a)
            getattr(module, b_name).copy_(old_b)
            expert_lora.set_rank(module, old_rank)

        undo.append(back)
        expert_lora.write(module, s.name, *s.tensors)
        expert_lora.set_rank(module, s.tensors[0].shape[1])


_STATE_ATTR = "_mxfp4_rl_engine_sync"


def engine_sync_of(model: nn.Module) -> EngineSync:
    """The one EngineSync of this worker's model, shared by the worker extension (collective_rpc) and the
    weight-transfer engine (vLLM's update_weights protocol), so both see the same version and staged updates."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        state = EngineSync(model)
        setattr(model, _STATE_ATTR, state)
    return state

"""`sync(engine, model)`: send the learner's expert bytes to a vLLM engine and prove it serves them.

Built on `export_for_engine` (the bytes the learner computes with, named as vLLM names them). Per weight it sends
the packed bytes (4.25 bits/param), only the changed 32-element blocks since the last sync (delta), or, in QAT mode
on request, the master weights for the engine to quantize with its profile (dense). The engine stages and verifies
everything, commits in one RPC while paused, and returns the hashes of what it serves; any difference raises
SyncMismatchError naming the weight, the expert, row and block of the first differing byte.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
import weakref

import torch
from torch import nn

from common.audit import diff
from common.moe import params as P
from common.moe.wire import (
    PROTOCOL,
    SyncError,
    SyncMismatchError,
    SyncProfileError,
    as_tensor,
    encode,
    payload_bytes,
    shard_key,
    shard_of,
)
from common.tensor import MXFP4Tensor

from ..conversion import experts_modules
from ..export import export_for_engine
from .delta import block_delta, choose_kind
from .engine import EngineHandle
from .wire import expected_hashes

MODES = ("packed", "dense")


# The learner's name of the contract's profile-mismatch error (kept for code written against it).
SyncProfileMismatch = SyncProfileError


@dataclasses.dataclass
class SyncReport:
    sync_id: str
    kinds: dict[str, str]  # weight -> "packed" | "delta" | "dense"
    payload_bytes: int  # tensor bytes sent
    packed_bytes: int  # what a full packed sync sends (4.25 bits/param)
    bf16_bytes: int  # what a bf16 sync sends (16 bits/param)
    seconds: float
    stage_seconds: float
    commit_seconds: float
    codes_flipped: int | None  # vs the previous sync; None on the first sync
    codes_total: int
    blocks_changed: int | None
    blocks_total: int
    scales_changed: int | None
    engine_version: int
    hashes: dict[str, str]  # weight -> learner hash (full tensor), equal to the engine's

    @property
    def code_flip_rate(self) -> float | None:
        return None if self.codes_flipped is None else self.codes_flipped / max(1, self.codes_total)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "code_flip_rate": self.code_flip_rate}


def learner_weights(model: nn.Module) -> tuple[str, dict[str, MXFP4Tensor]]:
    """(profile, {vLLM weight name: packed full weight}) of every MXFP4 experts block."""
    blocks = experts_modules(model)
    if any(m.b13 is not None for _, m in blocks):
        raise NotImplementedError("sync: expert biases (gpt-oss) are not supported by mxfp4_rl.sync/1 yet")
    tensors = {name: t for name, t, _ in export_for_engine(model)}
    profiles = {m.profile for _, m in blocks}
    if len(profiles) != 1:
        raise ValueError(f"sync: the model's experts use several profiles {sorted(profiles)}")
    (profile,) = profiles
    out = {n: MXFP4Tensor(t, tensors[n + "_scale"], profile) for n, t in tensors.items()
           if n.endswith((P.W13, P.W2))}
    return profile, out


def dense_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """QAT masters as the engine orders them ([E, 2I, H] rows [gate; up], [E, H, I])."""
    out = {}
    for prefix, mod in experts_modules(model):
        if mod.mode != "qat":
            raise ValueError(f"sync mode 'dense' needs QAT masters; '{prefix}' keeps packed bytes (mode "
                             f"{mod.mode!r}): re-quantizing their dequantized values need not give the same bytes")
        if mod.activation.kind != "glu":
            raise NotImplementedError(f"sync mode 'dense' for interleaved gate/up rows ('{prefix}')")
        out[f"{prefix}.w13_weight"], out[f"{prefix}.w2_weight"] = mod.w13.detach(), mod.w2.detach()
    return out


def _lora_factors(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name of a LoRA B factor: tensor} of every adapter in the model (per-expert and dense, PEFT names)."""
    out = {}
    for name, mod in model.named_modules():
        b = getattr(mod, "B", None) if hasattr(mod, "apply_expert") else getattr(getattr(mod, "lora_B", None),
                                                                              "weight", None)
        if isinstance(b, torch.Tensor):
            out[name] = b
    return out


def _unsynced_params(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{name: (storage pointer, in-place version)} of every parameter the payload does not carry: all but the experts'
    QAT masters and the LoRA factors (whose effect the adapter check covers). An optimizer step bumps the version."""
    synced = {id(t) for _, mod in experts_modules(model) for t in (getattr(mod, "w13", None), getattr(mod, "w2", None))
              if isinstance(t, torch.Tensor)}
    lora = {id(p) for name in _lora_factors(model) for p in model.get_submodule(name).parameters()}
    return {n: (p.data_ptr(), p._version) for n, p in model.named_parameters() if id(p) not in synced | lora}


class WeightSync:
    """Keeps the last-synced bytes per engine, for deltas. One instance per (learner, engine) pair."""

    def __init__(self, engine) -> None:
        self.engine = EngineHandle.of(engine)
        self.last: dict[str, MXFP4Tensor] = {}
        # per learner model (one WeightSync may serve several in turn): its non-expert parameters at its first sync
        self._unsynced: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _check_payload_is_the_forward(self, model: nn.Module) -> None:
        """Refuse a sync after which the engine would compute another function than the learner: an adapter with
        a nonzero B that the payload does not carry (merge it first, merge_lora), or a parameter outside the
        experts that changed since the first sync of this learner (the payload carries routed experts only)."""
        active = [n for n, b in _lora_factors(model).items() if bool(b.detach().ne(0).any())]
        if active:
            raise SyncError(f"sync refused: {len(active)} LoRA adapter(s) with nonzero B ({', '.join(active[:3])}"
                            f"{', ...' if len(active) > 3 else ''}) are part of the learner's forward but not of the "
                            f"sync payload, so the engine would keep serving the base; fold them in first "
                            f"(mxfp4_train.sync.merge_lora) or keep them at zero")
        now = _unsynced_params(model)
        first = self._unsynced.get(model)
        if first is None:
            self._unsynced[model] = now  # the first sync's learner is the engine's checkpoint outside the experts
            return
        changed = sorted(n for n, v in now.items() if first.get(n) != v)
        if changed:
            raise SyncError(f"sync refused: {len(changed)} parameter(s) outside the routed experts changed since the "
                            f"first sync ({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}); the payload "
                            f"carries routed experts only, so the engine would serve the old ones. Freeze them "
                            f"(requires_grad_(False)) or train experts only")

    def _info(self, profile: str, names: set[str]) -> list[dict]:
        infos = self.engine.rpc("mxfp4_sync_info")
        for rank, info in enumerate(infos):
            if info["profile"] != profile:
                raise SyncProfileError(
                    f"sync refused: the learner's experts use MXFP4 profile {profile!r}, the engine (rank {rank}) "
                    f"serves {info['profile']!r}; convert/load the learner with the engine checkpoint's profile")
            if set(info["weights"]) != names:
                only_l, only_e = sorted(names - set(info["weights"])), sorted(set(info["weights"]) - names)
                raise ValueError(f"sync: learner and engine expert weights differ: learner only {only_l[:4]}, "
                                 f"engine only {only_e[:4]}")
        return infos

    def _entry(self, name: str, q: MXFP4Tensor, descs: list, infos: list, dense, use_delta: bool, stats: dict):
        hashes = expected_hashes(q, descs)
        if dense is not None:
            return {"name": name, "kind": "dense", "weight": dense[name], "hashes": hashes}
        last = self.last.get(name) if use_delta else None
        if last is not None:
            base = expected_hashes(last, descs)
            if all(info["weights"][name]["hash"] == base[info["weights"][name]["key"]] for info in infos):
                d = block_delta(last, q)
                for k in ("codes_flipped", "scales_changed", "blocks_changed"):
                    stats[k] = (stats.get(k) or 0) + getattr(d, k)
                if choose_kind(d, q.nbytes) == "delta":
                    return {"name": name, "kind": "delta", "index": d.index, "codes": d.codes, "scales": d.scales,
                            "hashes": hashes, "base_hashes": base}
        return {"name": name, "kind": "packed", "codes": q.codes, "scales": q.scales, "hashes": hashes}

    def sync(self, model: nn.Module, *, mode: str = "packed", delta: bool = True) -> SyncReport:
        if mode not in MODES:
            raise ValueError(f"sync mode must be one of {MODES}, got {mode!r}")
        t0 = time.perf_counter()
        self._check_payload_is_the_forward(model)
        profile, weights = learner_weights(model)
        dense = dense_weights(model) if mode == "dense" else None
        infos = self._info(profile, set(weights))
        sync_id = uuid.uuid4().hex
        stats: dict = {}
        delta_ok = delta and bool(self.last) and all(n in self.last for n in weights)
        entries = []
        for name, q in weights.items():
            descs = [info["weights"][name]["descriptor"] for info in infos]
            entries.append(self._entry(name, q, descs, infos, dense, delta_ok, stats))
        stage_s = self._stage(sync_id, profile, entries)
        t1 = time.perf_counter()
        try:
            results = self._commit(sync_id, [e["name"] for e in entries])
        except BaseException:
            self._abort(sync_id)
            raise
        commit_s = time.perf_counter() - t1
        self._verify(weights, infos, results)
        self.last = {n: MXFP4Tensor(q.codes.detach().clone(), q.scales.detach().clone(), q.profile)
                     for n, q in weights.items()}
        n_codes = sum(q.shape.numel() for q in weights.values())
        return SyncReport(
            sync_id=sync_id, kinds={e["name"]: e["kind"] for e in entries},
            payload_bytes=sum(payload_bytes(e) for e in entries), packed_bytes=sum(q.nbytes for q in weights.values()),
            bf16_bytes=2 * n_codes, seconds=time.perf_counter() - t0, stage_seconds=stage_s, commit_seconds=commit_s,
            codes_flipped=stats.get("codes_flipped") if delta_ok else None, codes_total=n_codes,
            blocks_changed=stats.get("blocks_changed") if delta_ok else None,
            blocks_total=sum(q.scales.numel() for q in weights.values()),
            scales_changed=stats.get("scales_changed") if delta_ok else None,
            engine_version=int(results[0]["version"]),
            hashes={n: expected_hashes(q, [None])["full"] for n, q in weights.items()})

    def _stage(self, sync_id: str, profile: str, entries: list[dict]) -> float:
        """One stage call per MoE layer (bounded message size); an error aborts the whole sync."""
        t0 = time.perf_counter()
        try:
            for payload in payloads_by_layer(sync_id, profile, entries):
                self._send(payload)
        except BaseException:
            self._abort(sync_id)
            raise
        return time.perf_counter() - t0

    def _send(self, payload: dict) -> None:
        """Stage one layer's payload on every engine rank (here: pickled or blob tensors through collective_rpc)."""
        self.engine.rpc("mxfp4_sync_stage", encode(payload, self.engine.as_blobs))

    def _commit(self, sync_id: str, names: list[str]) -> list[dict]:
        """Make the staged sync served, between two engine steps, while no request is in flight; one result per
        engine rank with its `version` and audit `hashes`."""
        with self.engine.paused():
            return self.engine.rpc("mxfp4_sync_commit", sync_id, names)

    def _abort(self, sync_id: str) -> None:
        try:
            self.engine.rpc("mxfp4_sync_abort", sync_id)
        except Exception:  # noqa: BLE001 - the original error is the one to report
            pass

    def audit(self, model: nn.Module) -> None:
        """Check, without syncing, that the engine serves exactly the learner's bytes (raises SyncMismatchError)."""
        profile, weights = learner_weights(model)
        infos = self._info(profile, set(weights))
        self._verify(weights, infos, [{"hashes": h} for h in self.engine.rpc("mxfp4_sync_hashes")])

    def _verify(self, weights: dict[str, MXFP4Tensor], infos: list[dict], results: list[dict]) -> None:
        for rank, (info, res) in enumerate(zip(infos, results)):
            for name, q in weights.items():
                desc = info["weights"][name]["descriptor"]
                want = expected_hashes(q, [desc])[shard_key(desc)]
                if res["hashes"].get(name) != want:
                    raise SyncMismatchError(self._explain(name, rank, shard_of(q, desc)))

    def _explain(self, name: str, rank: int, want: MXFP4Tensor) -> str:
        got = self.engine.rpc("mxfp4_sync_read", name)[rank]
        served = MXFP4Tensor(as_tensor(got["codes"]), as_tensor(got["scales"]), got["profile"])
        return f"after sync the engine (rank {rank}) serves other bytes for '{name}': {diff(want, served)}"


def payloads_by_layer(sync_id: str, profile: str, entries: list[dict]) -> list[dict]:
    """The sync's entries as one payload per MoE layer (its w13 and w2), the unit one stage call carries."""
    by_layer: dict[str, list] = {}
    for e in entries:
        by_layer.setdefault(e["name"].rpartition(".")[0], []).append(e)
    return [{"protocol": PROTOCOL, "sync_id": sync_id, "profile": profile, "entries": group}
            for group in by_layer.values()]


def sync(engine, model: nn.Module, *, mode: str = "packed", delta: bool = True) -> SyncReport:
    """Sync `model`'s experts into `engine` (a vllm.LLM started with the MXFP4SyncExtension worker extension).

    The last-synced bytes are remembered on the engine object, so consecutive calls send deltas.
    """
    state = getattr(engine, "_mxfp4_rl_weight_sync", None)
    if state is None:
        state = WeightSync(engine)
        try:
            engine._mxfp4_rl_weight_sync = state
        except AttributeError:
            pass
    return state.sync(model, mode=mode, delta=delta)

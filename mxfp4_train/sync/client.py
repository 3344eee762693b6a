"""`sync(engine, model)`: send the learner's policy to a vLLM engine and prove it serves it.

Built on `export_for_engine` (the bytes the learner computes with, named as vLLM names them). Per packed expert
weight it sends the packed bytes (4.25 bits/param), only the changed 32-element blocks since the last sync (delta),
or, in QAT mode on request, the master weights for the engine to quantize with its profile (dense). Besides the
experts, one sync carries everything else the learner's forward uses (policy.py): expert biases, unmerged expert
adapters (engines serving expert LoRA), and the non-expert parameters the learner changed. The engine stages and
verifies everything, commits in one RPC while paused, and returns the hashes of what it serves; any difference
raises SyncMismatchError naming the weight, the expert, row and block of the first differing byte.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
import weakref

import torch
from torch import nn

from common.audit import block_lin, diff, hash_of_lanes, mxfp4_lanes
from common.constants import BLOCK_SIZE
from common.moe import params as P
from common.moe.wire import (
    FULL_KEY,
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
from .delta import block_delta, block_delta_and_lanes, choose_kind
from .engine import EngineHandle, Phases
from .policy import (
    LAYER_BATCH_BYTES,
    PARAM_CHUNK_BYTES,
    ParamTracker,
    current_params,
    expert_extras,
    extra_hashes,
    param_entries,
    whole_layers,
)
from .wire import expected_hashes

MODES = ("packed", "dense")


# The learner's name of the contract's profile-mismatch error (kept for code written against it).
SyncProfileMismatch = SyncProfileError


@dataclasses.dataclass
class SyncReport:
    sync_id: str
    kinds: dict[str, str]  # entry -> "packed" | "delta" | "dense" | "bias" | "lora" | "param"
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
    param_bytes: int = 0  # of payload_bytes: non-expert parameters
    phases: dict[str, float] = dataclasses.field(default_factory=dict)  # learner's wall seconds per phase
    engine_phases: dict[str, float] = dataclasses.field(default_factory=dict)  # rank 0's commit, seconds per phase

    @property
    def code_flip_rate(self) -> float | None:
        return None if self.codes_flipped is None else self.codes_flipped / max(1, self.codes_total)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "code_flip_rate": self.code_flip_rate}


def learner_weights(model: nn.Module) -> tuple[str, dict[str, MXFP4Tensor]]:
    """(profile, {vLLM weight name: packed full weight}) of every MXFP4 experts block."""
    profile, out, _ = learner_weights_and_hashes(model)
    return profile, out


def learner_weights_and_hashes(model: nn.Module, hashed: bool = True
                               ) -> tuple[str, dict[str, MXFP4Tensor], dict[str, str | None]]:
    """learner_weights plus each weight's whole-tensor audit hash, as the export computed it (hashed once);
    hashed=False: the hashes None, for a caller that derives them from its last sync (WeightSync)."""
    blocks = experts_modules(model)
    exported = {name: (t, h) for name, t, h in export_for_engine(model, hashed=hashed)}
    profiles = {m.profile for _, m in blocks}
    if len(profiles) != 1:
        raise ValueError(f"sync: the model's experts use several profiles {sorted(profiles)}")
    (profile,) = profiles
    names = [n for n in exported if n.endswith((P.W13, P.W2))]
    out = {n: MXFP4Tensor(exported[n][0], exported[n + "_scale"][0], profile) for n in names}
    return profile, out, {n: exported[n][1] for n in names}


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


def _expert_adapters(model: nn.Module) -> list[str]:
    """Names of the per-expert adapters with a nonzero B (part of the learner's forward)."""
    return [name for name, mod in experts_modules(model)
            if mod.lora_gate_up is not None and any(bool(lora.B.detach().ne(0).any())
                                                    for lora in (mod.lora_gate_up, mod.lora_down))]


def _descriptors(infos: list[dict], name: str) -> list[dict | None]:
    """Each engine rank's shard descriptor of weight `name` (its mxfp4_sync_info)."""
    return [info["weights"][name]["descriptor"] for info in infos]


def _expected(weights: dict[str, MXFP4Tensor], full: dict[str, str], infos: list[dict]) -> dict[str, dict[str, str]]:
    """{weight: {shard key: hash}} every engine rank must serve, the whole-tensor hash taken from the export's."""
    return {name: expected_hashes(q, _descriptors(infos, name), {FULL_KEY: full[name]}) for name, q in weights.items()}


class WeightSync:
    """Keeps the last-synced bytes per engine, for deltas. One instance per (learner, engine) pair."""

    def __init__(self, engine) -> None:
        self.engine = EngineHandle.of(engine)
        self.last: dict[str, MXFP4Tensor] = {}
        self.last_hashes: dict[str, dict[str, str]] = {}  # of self.last, per shard key: a delta's base, not re-hashed
        # fingerprint lanes of self.last (common.audit.mxfp4_lanes): the next sync hashes a weight from them and the
        # blocks its delta changed, instead of fingerprinting every weight again
        self.last_lanes: dict[str, tuple[list[int], list[int]]] = {}
        # per learner model (one WeightSync may serve several in turn): its non-expert parameters' versions at its
        # last successful sync, to send exactly those that changed
        self._params: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _check_payload_is_the_forward(self, model: nn.Module, info: dict) -> None:
        """Refuse a sync after which the engine would compute another function than the learner: expert adapters
        with a nonzero B on an engine that does not serve expert LoRA (merge them first, merge_lora, or start the
        engine with quantization_config "expert_lora"), or with another scaling than the engine's."""
        lora = info.get("expert_lora")
        if lora is None:
            active = _expert_adapters(model)
            if active:
                raise SyncError(f"sync refused: {len(active)} expert LoRA adapter(s) with nonzero B "
                                f"({', '.join(active[:3])}{', ...' if len(active) > 3 else ''}) are part of the "
                                f"learner's forward, but this engine serves no expert LoRA, so it would keep serving "
                                f"the base; start it from a checkpoint with quantization_config \"expert_lora\" "
                                f"(mxfp4_train.sync.enable_expert_lora), or fold them in (mxfp4_train.sync.merge_lora)")
            return
        for name, mod in experts_modules(model):
            spec = None if mod.lora_gate_up is None else mod.lora_gate_up.spec
            if spec is not None and (spec.r > lora["max_rank"] or spec.scaling != lora["scaling"]):
                raise SyncError(f"sync refused: '{name}' has LoRA rank {spec.r}, scaling {spec.scaling}, but the "
                                f"engine serves expert LoRA up to rank {lora['max_rank']} with scaling "
                                f"{lora['scaling']} (fixed at engine start); restart the engine with the learner's "
                                f"values (mxfp4_train.sync.enable_expert_lora)")

    @staticmethod
    def _diverged_params(tensors: dict[str, torch.Tensor], info: dict, sending: set[str]) -> list[dict]:
        """Entries for the parameters an earlier sync (maybe another learner's) loaded into the engine that this
        learner holds other values of (tensors: the learner's current_params): a fresh learner resets them instead
        of computing against a stale engine."""
        synced = {n: h for n, h in (info.get("params") or {}).items() if n not in sending}
        if not synced:
            return []
        unknown = sorted(set(synced) - set(tensors))
        if unknown:
            raise SyncError(f"sync refused: the engine serves synced values of {unknown[:3]}, which this learner does "
                            f"not have; restart the engine from the checkpoint or load a learner with them")
        entries = param_entries({n: tensors[n] for n in synced}, info["dtype"])
        return [e for e in entries if e["hashes"]["full"] != synced[e["name"]]]

    def _extra_entries(self, model: nn.Module, infos: list[dict]) -> list[dict]:
        """Bias and adapter entries, with each engine rank's expected hash."""
        wanted = {n for n, w in infos[0]["weights"].items() if w.get("kind") in ("bias", "lora")}
        extras = expert_extras(model)
        if infos[0].get("expert_lora") is None:
            extras = {n: e for n, e in extras.items() if e["kind"] != "lora"}
        missing = sorted(n for n, w in infos[0]["weights"].items() if w.get("kind") == "bias" and n not in extras)
        unknown = sorted(set(extras) - wanted)
        if missing or unknown:
            raise ValueError(f"sync: learner and engine expert biases/adapters differ: engine only {missing[:4]}, "
                             f"learner only {unknown[:4]}")
        entries = []
        for name, e in extras.items():
            w = infos[0]["weights"][name]
            weight = w["weight"].rpartition(".")[2]
            descs = _descriptors(infos, name)
            if e["kind"] == "bias":
                e = {**e, "tensor": e["tensor"].to(getattr(torch, w["dtype"])).contiguous()}
            entry = {"name": name, "kind": e["kind"], **{k: e[k] for k in ("tensor", "a", "b") if k in e}}
            entry["hashes"] = extra_hashes(e["kind"], entry, weight, descs)
            entries.append(entry)
        return entries

    def _info(self, profile: str, names: set[str]) -> list[dict]:
        infos = self.engine.rpc("mxfp4_sync_info")
        for rank, info in enumerate(infos):
            if info["profile"] != profile:
                raise SyncProfileError(
                    f"sync refused: the learner's experts use MXFP4 profile {profile!r}, the engine (rank {rank}) "
                    f"serves {info['profile']!r}; convert/load the learner with the engine checkpoint's profile")
            packed = {n for n, w in info["weights"].items() if w.get("kind", "packed") == "packed"}
            if packed != names:
                only_l, only_e = sorted(names - packed), sorted(packed - names)
                raise ValueError(f"sync: learner and engine expert weights differ: learner only {only_l[:4]}, "
                                 f"engine only {only_e[:4]}")
        return infos

    def _entry(self, name: str, q: MXFP4Tensor, hashes: dict[str, str], descs: list, infos: list, dense,
               use_delta: bool, stats: dict, deltas: dict):
        if dense is not None:
            return {"name": name, "kind": "dense", "weight": dense[name], "hashes": hashes}
        last = self.last.get(name) if use_delta else None
        if last is not None:
            base = expected_hashes(last, descs, self.last_hashes.get(name))
            if all(info["weights"][name]["hash"] == base[info["weights"][name]["key"]] for info in infos):
                d = deltas.get(name) or block_delta(last, q)
                for k in ("codes_flipped", "scales_changed", "blocks_changed"):
                    stats[k] = (stats.get(k) or 0) + getattr(d, k)
                if choose_kind(d, q.nbytes) == "delta":
                    return {"name": name, "kind": "delta", "index": d.index, "codes": d.codes, "scales": d.scales,
                            "hashes": hashes, "base_hashes": base}
        return {"name": name, "kind": "packed", "codes": q.codes, "scales": q.scales, "hashes": hashes}

    def sync(self, model: nn.Module, *, mode: str = "packed", delta: bool = True,
             trainable: bool = False) -> SyncReport:
        """Send the learner's policy: packed experts (delta when cheaper; mode="dense": QAT masters), expert biases
        and adapters, and every non-expert parameter changed since the last sync (trainable=True: also every one
        that requires grad, for a learner that trained before its first sync)."""
        if mode not in MODES:
            raise ValueError(f"sync mode must be one of {MODES}, got {mode!r}")
        t0 = time.perf_counter()
        phases = Phases()
        profile, weights, full = learner_weights_and_hashes(model, hashed=False)
        dense = dense_weights(model) if mode == "dense" else None
        delta_ok = delta and bool(self.last) and all(n in self.last for n in weights)
        lanes, deltas = {}, {}
        for name, q in weights.items():
            last, last_lanes = self.last.get(name), self.last_lanes.get(name)
            if delta_ok and dense is None and last is not None and last_lanes is not None:
                deltas[name], lanes[name] = block_delta_and_lanes(last, q, last_lanes)
            else:
                lanes[name] = mxfp4_lanes(q)
            full[name] = hash_of_lanes(q.shape, q.profile, *lanes[name], q.codes.numel(), q.scales.numel())
        phases.mark("learner export + hash")
        infos = self._info(profile, set(weights))
        phases.mark("engine info")
        self._check_payload_is_the_forward(model, infos[0])
        sync_id = uuid.uuid4().hex
        stats: dict = {}
        expect = _expected(weights, full, infos)
        entries = [self._entry(name, q, expect[name], _descriptors(infos, name), infos, dense, delta_ok, stats,
                               deltas) for name, q in weights.items()]
        entries += self._extra_entries(model, infos)
        tracker = self._params.setdefault(model, ParamTracker())
        current = current_params(model)  # merges each dense adapter once, for the three uses below
        changed, versions = tracker.changed(model, trainable, current)
        if changed:
            changed = whole_layers(changed, current[0], infos[0].get("fused") or {})
        params = param_entries(changed, infos[0]["dtype"])
        params += self._diverged_params(current[0], infos[0], set(changed))
        entries += params
        phases.mark("learner payload")
        stage_s = self._stage(sync_id, profile, entries)
        phases.mark("stage")
        t1 = time.perf_counter()
        try:
            results = self._commit(sync_id, [e["name"] for e in entries], phases)
        except BaseException:
            self._abort(sync_id)
            raise
        commit_s = time.perf_counter() - t1
        self._verify(expect, infos, results, [e for e in entries if e["kind"] in ("bias", "lora", "param")],
                     weights)
        self.last = self._kept(weights, {e["name"]: e for e in entries})
        self.last_lanes = lanes
        self.last_hashes = expect
        tracker.last = versions
        phases.mark("verify + keep")
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
            hashes=dict(full), param_bytes=sum(payload_bytes(e) for e in params),
            phases=phases.seconds, engine_phases=dict(results[0].get("phases") or {}))

    def _kept(self, weights: dict[str, MXFP4Tensor], entries: dict[str, dict]) -> dict[str, MXFP4Tensor]:
        """The bytes just synced, kept as the next delta's base: a weight sent as a delta updates its kept copy in
        place with the delta's blocks (its other blocks are equal by construction); any other weight is copied."""
        kept = {}
        for name, q in weights.items():
            e, last = entries.get(name, {}), self.last.get(name)
            if e.get("kind") == "delta" and last is not None:
                # one flat index (common.audit.block_lin): a three-index put is slow on a CPU
                at = block_lin(e["index"].to(last.codes.device), *last.scales.shape[1:])
                last.codes.view(-1, BLOCK_SIZE // 2).index_copy_(0, at, e["codes"].to(last.codes.device))
                last.scales.view(-1).index_copy_(0, at, e["scales"].to(last.scales.device))
                kept[name] = last
            else:
                kept[name] = MXFP4Tensor(q.codes.detach().clone(), q.scales.detach().clone(), q.profile)
        return kept

    def _stage(self, sync_id: str, profile: str, entries: list[dict]) -> float:
        """One stage call per batch of whole MoE layers (payloads_by_layer); an error aborts the whole sync."""
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

    def _commit(self, sync_id: str, names: list[str], phases: Phases) -> list[dict]:
        """Make the staged sync served, between two engine steps, while no request is in flight; one result per
        engine rank with its `version` and audit `hashes`."""
        with self.engine.paused(phases):
            return self.engine.rpc("mxfp4_sync_commit", sync_id, names)

    def _abort(self, sync_id: str) -> None:
        try:
            self.engine.rpc("mxfp4_sync_abort", sync_id)
        except Exception:  # noqa: BLE001 - the original error is the one to report
            pass

    def audit(self, model: nn.Module) -> None:
        """Check, without syncing, that the engine serves exactly the learner's experts, biases and adapters, and
        that every non-expert parameter a sync loaded still equals the learner's (raises SyncMismatchError)."""
        profile, weights, full = learner_weights_and_hashes(model)
        infos = self._info(profile, set(weights))
        extras = self._extra_entries(model, infos)
        synced = infos[0].get("params") or {}
        current = current_params(model)[0]
        params = param_entries({n: current[n] for n in synced if n in current}, infos[0]["dtype"])
        self._verify(_expected(weights, full, infos), infos, [{"hashes": h} for h in self.engine.rpc("mxfp4_sync_hashes")], extras + params,
                     weights)

    def _verify(self, expect: dict[str, dict[str, str]], infos: list[dict], results: list[dict],
                others: list[dict], weights: dict[str, MXFP4Tensor]) -> None:
        """Each rank's reported hashes against the learner's (expect: weight -> shard key -> hash)."""
        for rank, (info, res) in enumerate(zip(infos, results)):
            for name, q in weights.items():
                desc = info["weights"][name]["descriptor"]
                if res["hashes"].get(name) != expect[name][shard_key(desc)]:
                    raise SyncMismatchError(self._explain(name, rank, shard_of(q, desc)))
            for e in others:
                key = shard_key(info["weights"][e["name"]]["descriptor"]) if e["kind"] != "param" else "full"
                if res["hashes"].get(e["name"]) != e["hashes"][key]:
                    raise SyncMismatchError(f"after sync the engine (rank {rank}) reports another hash for "
                                            f"{e['kind']} '{e['name']}' than the learner sent: "
                                            f"{str(res['hashes'].get(e['name']))[:16]}... vs {e['hashes'][key][:16]}...")

    def _explain(self, name: str, rank: int, want: MXFP4Tensor) -> str:
        got = self.engine.rpc("mxfp4_sync_read", name)[rank]
        served = MXFP4Tensor(as_tensor(got["codes"]), as_tensor(got["scales"]), got["profile"])
        return f"after sync the engine (rank {rank}) serves other bytes for '{name}': {diff(want, served)}"


def payloads_by_layer(sync_id: str, profile: str, entries: list[dict],
                      max_bytes: int = LAYER_BATCH_BYTES) -> list[dict]:
    """The sync's entries as the units one stage call carries: whole MoE layers (w13 and w2, their biases and
    adapters), as many in a row as fit in max_bytes of payload (a larger layer alone; 0: one layer per call), then
    the non-expert parameters in chunks of at most PARAM_CHUNK_BYTES."""
    layers: dict[str, list] = {}
    params: list[list] = []
    size = 0
    for e in entries:
        if e["kind"] == "param":
            nbytes = payload_bytes(e)
            if not params or (size and size + nbytes > PARAM_CHUNK_BYTES):
                params.append([])
                size = 0
            size += nbytes
            params[-1].append(e)
        else:
            layers.setdefault(e["name"].rpartition(".")[0], []).append(e)
    calls: list[list] = []
    size = 0
    for group in layers.values():
        nbytes = sum(payload_bytes(e) for e in group)
        if not calls or (size and size + nbytes > max_bytes):
            calls.append([])
            size = 0
        size += nbytes
        calls[-1] += group
    return [{"protocol": PROTOCOL, "sync_id": sync_id, "profile": profile, "entries": group}
            for group in calls + params]


def sync(engine, model: nn.Module, *, mode: str = "packed", delta: bool = True,
         trainable: bool = False) -> SyncReport:
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
    return state.sync(model, mode=mode, delta=delta, trainable=trainable)

"""Engine side of the weight sync without an engine process: EngineSync and the worker extension on real MoE layers
built with the plugin's own loader (mxfp4_serve.loader) and backend. Covers staging, in-place commit, deltas, the
dense (engine-quantizes) path, TP/EP shards, and the fault cases: interrupted syncs, corrupted payloads, profile
mismatch, stale bases, and a failure in the middle of a commit (all checked with audit hashes)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import common
from common.audit import tensor_hash
from mxfp4_serve.backends import CPUReferenceBackend
from mxfp4_serve.loader import ExpertWeightLoader
from mxfp4_serve.settings import ServeSettings
from mxfp4_serve.shards import ExpertGeometry, contiguous_expert_map
from mxfp4_serve.sync import (
    PROTOCOL,
    EngineSync,
    MXFP4SyncExtension,
    SyncError,
    SyncPayloadError,
    SyncProfileError,
    SyncStateError,
)
from mxfp4_serve.sync.staging import StagedBlocks

PROFILE = "flashinfer"
E, H, I, LAYERS = 8, 128, 64, 2


class _Method:
    """What vLLM stores as layer.quant_method; the sync only reads its `backend`."""

    def __init__(self, backend):
        self.backend = backend


def dense_experts(seed: int, e: int = E, h: int = H, i: int = I, huge: float = 1e30) -> dict[tuple[int, str], torch.Tensor]:
    """bf16 [N, K] per (expert, shard) with adversarial blocks (zeros, ties, subnormals, large values). huge=3e38
    reaches the top of the range, where a block's scale 2^126 makes 6 * 2^126 overflow fp32 on dequantize."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for x in range(e):
        for shard, shape in (("w1", (i, h)), ("w3", (i, h)), ("w2", (h, i))):
            w = torch.randn(shape, generator=g) * 0.05
            w[0, :32] = 0.0
            w[1, :32] = torch.tensor([0.25, 0.75, 2.5, 5.0] * 8) * 2.0 ** -4
            w[1, 31] = 6.0 * 2.0 ** -4
            w[2, :32] = 2.0 ** -130 * torch.arange(1, 33)
            w[3, :32] = huge * torch.linspace(-1, 1, 32)
            out[x, shard] = w.to(torch.bfloat16)
    return out


def full_weights(dense: dict, e: int = E) -> dict[str, torch.Tensor]:
    """{'w13': [E, 2I, H] rows [w1; w3], 'w2': [E, H, I]} dense (the vLLM order)."""
    return {"w13": torch.stack([torch.cat([dense[x, "w1"], dense[x, "w3"]]) for x in range(e)]),
            "w2": torch.stack([dense[x, "w2"] for x in range(e)])}


def engine_model(seed: int = 0, *, tp_rank: int = 0, tp_size: int = 1, ep_rank: int = 0, ep_size: int = 1,
                 backend=None, profile: str = PROFILE) -> nn.Module:
    """LAYERS MoE layers whose parameters were filled by the plugin's ExpertWeightLoader from packed experts."""
    root = nn.Module()
    for L in range(LAYERS):
        to_local_list = contiguous_expert_map(E, ep_rank, ep_size)
        local_to_global = [g for g in range(E) if to_local_list[g] >= 0]
        geom = ExpertGeometry(f"model.layers.{L}.mlp.experts", H, I, E, len(local_to_global), tp_rank, tp_size)
        layer = nn.Module()
        params = {}
        for n, shape in geom.param_shapes().items():
            p = nn.Parameter(torch.zeros(shape, dtype=torch.uint8), requires_grad=False)
            layer.register_parameter(n, p)
            params[n] = p
        loader = ExpertWeightLoader(geom, ServeSettings(profile=profile), params, lambda g: to_local_list[g],
                                    local_to_global)
        for (x, shard), w in dense_experts(seed + L).items():
            q = common.quantize(w, profile=profile)
            loader.load_expert(x, shard, "codes", q.codes)
            loader.load_expert(x, shard, "scales", q.scales)
        loader.check_complete()
        layer.mxfp4_rl_loader = loader
        layer.quant_method = _Method(backend)
        root.add_module(f"layer{L}", layer)
    return root


class LocalEngine(MXFP4SyncExtension):
    """The worker extension with an in-process transport: collective_rpc calls the extension of each rank."""

    def __init__(self, *models: nn.Module) -> None:
        self.ranks = [_Rank(m) for m in models]

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        return [getattr(r, method)(*args, **(kwargs or {})) for r in self.ranks]


class _Rank(MXFP4SyncExtension):
    def __init__(self, model: nn.Module) -> None:
        self._model = model

    def get_model(self) -> nn.Module:
        return self._model


# ---- payload builders (written from the protocol text, independently of mxfp4_train.sync) ---------------------------
def packed_full(seed: int, profile: str = PROFILE) -> dict[str, common.MXFP4Tensor]:
    """{weight name: full packed [E, N, K]} of engine_model(seed)'s layers."""
    out = {}
    for L in range(LAYERS):
        fw = full_weights(dense_experts(seed + L))
        for w in ("w13", "w2"):
            out[f"model.layers.{L}.mlp.experts.{w}_weight"] = common.quantize(fw[w], profile=profile)
    return out


def payload(sync_id: str, entries: list[dict], profile: str = PROFILE) -> dict:
    return {"protocol": PROTOCOL, "sync_id": sync_id, "profile": profile, "entries": entries}


def packed_entry(name: str, q: common.MXFP4Tensor, key: str = "full", h: str | None = None) -> dict:
    return {"name": name, "kind": "packed", "codes": q.codes, "scales": q.scales,
            "hashes": {key: h or tensor_hash(q)}}


def served(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{layer.mxfp4_rl_loader.geometry.layer_name}.{n}": p.detach().clone()
            for layer in model.children() for n, p in layer.named_parameters()}


def full_sync(sync: EngineSync, target: dict[str, common.MXFP4Tensor], sync_id: str = "s1") -> dict:
    sync.stage(payload(sync_id, [packed_entry(n, q) for n, q in target.items()]))
    return sync.commit(sync_id, list(target))


# ---- tests ------------------------------------------------------------------------------------------------------------
def test_full_sync_writes_in_place_and_reports_hashes():
    model = engine_model(0, backend=CPUReferenceBackend())
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    sync = EngineSync(model)
    target = packed_full(seed=100)
    res = full_sync(sync, target)
    now = served(model)
    for name, q in target.items():
        assert torch.equal(now[name], q.codes) and torch.equal(now[name + "_scale"], q.scales)
        assert res["hashes"][name] == tensor_hash(q)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs  # same storage: CUDA graphs stay valid
    assert res["version"] == 1 and set(res["changed_experts"].values()) == {E}


def _delta_case(seed: int = 3) -> tuple[dict, list[dict]]:
    """(new packed weights, delta entries from packed_full(0) to them): ~1% of the blocks changed, among them codes
    only, scales only, blocks sharing one 8-byte word of the scales, and a run of 11 over two words."""
    base, new = packed_full(0), packed_full(0)
    g = torch.Generator().manual_seed(seed)
    entries = []
    for name, q in new.items():
        blocks = q.codes.view(E, q.codes.shape[1], -1, 16)
        pick = torch.rand(q.scales.shape, generator=g) < 0.01
        pick[0, 0, 0] = pick[E - 1, -1, -1] = True
        blocks[pick] ^= torch.randint(1, 256, (int(pick.sum()), 16), generator=g, dtype=torch.uint8)
        q.scales[0, 0, 0] = (int(q.scales[0, 0, 0]) + 1) % 254
        q.scales.view(-1)[9] = (int(q.scales.view(-1)[9]) + 2) % 254  # same scale word as byte 10, if picked
        run = q.scales.view(-1)[19:30]  # 11 consecutive blocks over two scale words: the sparse rehash's runs
        run.copy_((run.int() + 1) % 254)
        changed = ((blocks != base[name].codes.view(blocks.shape)).any(-1) | (q.scales != base[name].scales))
        idx = changed.nonzero().to(torch.int32)
        entries.append({"name": name, "kind": "delta", "index": idx, "codes": blocks[changed], "scales":
                        q.scales[changed], "hashes": {"full": tensor_hash(q)},
                        "base_hashes": {"full": tensor_hash(base[name])}})
    return new, entries


def _kb_major_model(seed: int = 0) -> nn.Module:
    """engine_model with hopper_triton's kb-major codes (prepared on the CPU: the layout's torch conversion)."""
    from mxfp4_serve.backends.hopper_triton import HopperTritonBackend

    backend = HopperTritonBackend()
    model = engine_model(seed, backend=backend)
    for layer in model.children():
        backend.prepare(layer)
    return model


MODELS = {"canonical": lambda: engine_model(0, backend=CPUReferenceBackend()), "kb_major": _kb_major_model}


@pytest.fixture(params=["torch", "kernel"])
def stage_kernel(request, monkeypatch):
    """A block delta staged and committed with torch operations (CPU engines) or with common.kernels.delta_stage
    and block_write (GPU engines; here under the Triton interpreter)."""
    from mxfp4_serve.sync import layers

    monkeypatch.setattr(layers, "BLOCK_KERNELS", "always" if request.param == "kernel" else "never")
    return request.param


@pytest.mark.parametrize("layout", sorted(MODELS))
def test_delta_and_full_leave_identical_bytes(layout, stage_kernel):
    """A block delta is staged as its blocks (no copy of the weight) and written block by block into the served
    layout; the bytes equal a full sync's, and its hashes, built from the served lanes and the changed words only,
    equal a fresh fingerprint of everything served."""
    new, entries = _delta_case()
    a, b = MODELS[layout](), MODELS[layout]()
    full_sync(EngineSync(a), new)
    sb = EngineSync(b)
    sb.stage(payload("d", entries))
    assert all(isinstance(s, StagedBlocks) for s in sb._staged["d"].values())
    res = sb.commit("d", [e["name"] for e in entries])
    sa, sbv = served(a), served(b)
    assert all(torch.equal(sa[k], sbv[k]) for k in sa)
    assert res["hashes"] == EngineSync(a).hashes() == sb.hashes(fresh=True)
    assert all(res["hashes"][n] == tensor_hash(q) for n, q in new.items())
    for e in entries:
        assert res["changed_experts"][e["name"]] == len(set(e["index"][:, 0].tolist()))
    # a second delta on top of the first: the lanes adopted at commit are the served ones
    newer, more = _delta_case(seed=4)
    for e in more:
        e["base_hashes"] = {"full": res["hashes"][e["name"]]}
        q = newer[e["name"]]
        blocks = q.codes.view(E, q.codes.shape[1], -1, 16)
        e["index"], e["codes"], e["scales"] = _delta_from(sb, e["name"], blocks, q.scales)
    sb.stage(payload("d2", more))
    res2 = sb.commit("d2", [e["name"] for e in more])
    assert res2["hashes"] == sb.hashes(fresh=True) and all(res2["hashes"][n] == tensor_hash(q)
                                                           for n, q in newer.items())


def _delta_from(sync: EngineSync, name: str, blocks: torch.Tensor, scales: torch.Tensor):
    """(index, codes, scales) of the blocks that differ between what `sync` serves for `name` and the targets."""
    live = sync.read(name)
    changed = (blocks != live["codes"].view(blocks.shape)).any(-1) | (scales != live["scales"])
    return changed.nonzero().to(torch.int32), blocks[changed], scales[changed]


@pytest.mark.parametrize("case, err, msg", [
    ("twice", SyncPayloadError, "names a block more than once"),
    ("nan", SyncPayloadError, r"scale byte 0xFF \(E8M0 NaN\)"),
    ("bytes", SyncPayloadError, "staged bytes hash to .* corrupted payload"),
    ("outside", SyncPayloadError, "delta index outside the weight's blocks"),
    ("negative", SyncPayloadError, "delta index outside the weight's blocks"),
    # 0xFE (2^127) is reserved by every profile (above the largest finite byte, or the Inf-block byte)
    ("reserved", SyncPayloadError, r"scale byte 0xFE \(.*reserves"),
])
def test_bad_block_delta_is_refused_before_anything_changes(case, err, msg, stage_kernel):
    _, entries = _delta_case()
    e = entries[1]
    if case == "twice":
        e["index"] = torch.cat([e["index"], e["index"][:1]])
        e["codes"] = torch.cat([e["codes"], e["codes"][:1]])
        e["scales"] = torch.cat([e["scales"], e["scales"][:1]])
    elif case == "nan":
        e["scales"] = e["scales"].clone()
        e["scales"][0] = 0xFF
    elif case == "reserved":
        e["scales"] = e["scales"].clone()
        e["scales"][-1] = 0xFE
    elif case == "bytes":
        e["codes"] = e["codes"].clone()
        e["codes"][0, 3] ^= 0x10
    else:
        e["index"] = e["index"].clone()
        e["index"][-1, 2 if case == "outside" else 0] = 10**6 if case == "outside" else -1
    model = MODELS["kb_major"]()
    sync = EngineSync(model)
    before, bytes_before = sync.hashes(), served(model)
    with pytest.raises(err, match=msg):
        sync.stage(payload("d", entries))
    assert sync.version == 0 and sync.hashes(fresh=True) == before
    assert all(torch.equal(v, bytes_before[k]) for k, v in served(model).items())


def test_block_delta_commit_failure_restores_the_blocks(monkeypatch, stage_kernel):
    """A write that fails after others succeeded (here the third weight's) restores every written block and the
    engine keeps serving the previous version, its hashes those of the bytes read afresh."""
    from mxfp4_serve.sync.layers import SyncedLayer

    _, entries = _delta_case()
    model = MODELS["kb_major"]()
    sync = EngineSync(model)
    before, bytes_before = sync.hashes(), served(model)
    sync.stage(payload("d", entries))
    real, calls = SyncedLayer.swap_blocks, []

    def flaky(self, weight, blocks, codes, scales):
        calls.append(weight)
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        return real(self, weight, blocks, codes, scales)

    monkeypatch.setattr(SyncedLayer, "swap_blocks", flaky)
    with pytest.raises(RuntimeError, match="injected failure"):
        sync.commit("d", [e["name"] for e in entries])
    assert sync.version == 0 and sync.hashes(fresh=True) == before == sync.hashes()
    assert all(torch.equal(v, bytes_before[k]) for k, v in served(model).items())


def test_block_delta_keeps_the_one_multiply_bound(stage_kernel):
    """hopper_triton's one-multiply layers refuse a block delta bringing a scale byte > 128, as a full sync."""
    new, entries = _delta_case()
    model = MODELS["kb_major"]()
    for layer in model.children():
        layer._mxfp4_rl_one_mul = True  # as prepare() sets it for a layer loaded with small scale bytes
    sync = EngineSync(model)
    before = served(model)
    e = entries[0]
    q = new[e["name"]]
    x, r, b = e["index"][1].tolist()
    q.scales[x, r, b] = 131
    e["scales"] = e["scales"].clone()
    e["scales"][1] = 131
    e["hashes"] = {"full": tensor_hash(q)}
    sync.stage(payload("d", [e]))
    with pytest.raises(SyncError, match=r"scale byte \d+ \(> 128.*Nothing was written"):
        sync.commit("d", [e["name"]])
    assert sync.version == 0 and all(torch.equal(v, before[k]) for k, v in served(model).items())


def test_dense_path_quantizes_with_the_engine_profile():
    model = engine_model(0)
    sync = EngineSync(model)
    dense = {}
    for L in range(LAYERS):
        fw = full_weights(dense_experts(200 + L, huge=3e38))
        for w in ("w13", "w2"):
            dense[f"model.layers.{L}.mlp.experts.{w}_weight"] = fw[w]
    entries = [{"name": n, "kind": "dense", "weight": w,
                "hashes": {"full": tensor_hash(common.quantize(w, profile=PROFILE))}} for n, w in dense.items()]
    sync.stage(payload("dense", entries))
    sync.commit("dense", list(dense))
    now = served(model)
    for n, w in dense.items():
        q = common.quantize(w, profile=PROFILE)
        assert torch.equal(now[n], q.codes) and torch.equal(now[n + "_scale"], q.scales)


def _ranks(split: str) -> list[nn.Module]:
    return [engine_model(0, **({"tp_rank": r, "tp_size": 2} if split == "tp" else {"ep_rank": r, "ep_size": 2}))
            for r in range(2)]


def _shard_hashes(infos: list[dict], name: str, q: common.MXFP4Tensor) -> dict[str, str]:
    """{shard key: the hash of that rank's part of q}, the part sliced from the full tensor by hand."""
    hashes = {}
    for info in infos:
        d = info["weights"][name]["descriptor"]
        rows = torch.cat([torch.arange(a, b) for a, b in d["rows"]])
        b0, b1 = d["blocks"]
        part = common.MXFP4Tensor(q.codes[d["experts"]][:, rows][..., b0 * 16:b1 * 16].contiguous(),
                                  q.scales[d["experts"]][:, rows][..., b0:b1].contiguous(), PROFILE)
        hashes[info["weights"][name]["key"]] = tensor_hash(part)
    return hashes


@pytest.mark.parametrize("split", ["tp", "ep"])
def test_sharded_ranks_take_their_blocks_of_a_delta(split, stage_kernel):
    """Each rank of a TP or EP engine keeps the delta's blocks of its shard (local expert, row and block), its hash
    the learner's hash of that shard; the bytes equal those of a full sync of the same weights."""
    new, entries = _delta_case()
    base = packed_full(0)
    ranks, full = _ranks(split), _ranks(split)
    eng, ref = LocalEngine(*ranks), LocalEngine(*full)
    infos = eng.collective_rpc("mxfp4_sync_info")
    for e in entries:
        e["hashes"] = _shard_hashes(infos, e["name"], new[e["name"]])
        e["base_hashes"] = _shard_hashes(infos, e["name"], base[e["name"]])
    eng.collective_rpc("mxfp4_sync_stage", args=(payload("d", entries),))
    eng.collective_rpc("mxfp4_sync_commit", args=("d", list(new)))
    ref.collective_rpc("mxfp4_sync_stage", args=(payload("s", [
        {"name": n, "kind": "packed", "codes": q.codes, "scales": q.scales, "hashes": _shard_hashes(infos, n, q)}
        for n, q in new.items()]),))
    ref.collective_rpc("mxfp4_sync_commit", args=("s", list(new)))
    for got, want in zip(ranks, full, strict=True):
        assert all(torch.equal(v, served(want)[k]) for k, v in served(got).items())
    assert eng.collective_rpc("mxfp4_sync_hashes") == ref.collective_rpc("mxfp4_sync_hashes")


@pytest.mark.parametrize("split", ["tp", "ep"])
def test_sharded_ranks_keep_their_part(split):
    ranks = _ranks(split)
    target = packed_full(seed=100)
    eng = LocalEngine(*ranks)
    infos = eng.collective_rpc("mxfp4_sync_info")
    entries = [{"name": name, "kind": "packed", "codes": q.codes, "scales": q.scales,
                "hashes": _shard_hashes(infos, name, q)} for name, q in target.items()]
    eng.collective_rpc("mxfp4_sync_stage", args=(payload("s", entries),))
    eng.collective_rpc("mxfp4_sync_commit", args=("s", list(target)))
    ref = engine_model(0)
    full_sync(EngineSync(ref), target)  # the TP1/EP1 result, re-assembled from the two ranks below
    r0, r1, whole = served(ranks[0]), served(ranks[1]), served(ref)
    for k, v in whole.items():
        if split == "ep":
            assert torch.equal(torch.cat([r0[k], r1[k]]), v)
        elif "w13" in k:  # rows: [gate r0, up r0] and [gate r1, up r1]
            i = v.shape[1] // 2
            g0, u0 = r0[k].split(i // 2, 1)
            g1, u1 = r1[k].split(i // 2, 1)
            assert torch.equal(torch.cat([g0, g1, u0, u1], 1), v)
        else:
            assert torch.equal(torch.cat([r0[k], r1[k]], 2), v)


def _corrupt(case: str, q: common.MXFP4Tensor, name: str) -> dict:
    e = packed_entry(name, q)
    if case == "flipped nibble":
        e["codes"] = q.codes.clone()
        e["codes"][2, 3, 4] ^= 0x10
    elif case == "dtype":
        e["codes"] = q.codes.to(torch.int16)
    elif case == "shape":
        e["scales"] = q.scales[..., :-1]
    elif case == "nan scale":
        e["scales"] = q.scales.clone()
        e["scales"][1, 1, 1] = 0xFF
    elif case == "inf-block scale":  # the flashinfer profile's Inf-block byte: a checkpoint may not bring it either
        e["scales"] = q.scales.clone()
        e["scales"][2, 0, 1] = 0xFE
    elif case == "truncated blob":
        e["codes"] = {"dtype": "uint8", "shape": list(q.codes.shape), "data": q.codes.numpy().tobytes()[:-5]}
    return e


@pytest.mark.parametrize("case,msg", [
    ("flipped nibble", r"staged bytes hash to .* corrupted payload"),
    ("dtype", r"field 'codes' must have dtype torch.uint8, got torch.int16"),
    ("shape", r"field 'scales' must have shape \[8, 128, 4\], got \[8, 128, 3\]"),
    ("nan scale", r"scale byte 0xFF"),
    ("inf-block scale", r"scale byte 0xFE .* which profile 'flashinfer' reserves.*nothing was changed"),
    ("truncated blob", r"blob holds \d+ bytes, expected 65536 .*truncated or corrupted"),
])
def test_corrupted_payload_is_refused_naming_the_parameter(case, msg):
    model = engine_model(0)
    sync = EngineSync(model)
    before = sync.hashes()
    name = "model.layers.1.mlp.experts.w13_weight"
    target = packed_full(seed=100)
    good = packed_entry("model.layers.0.mlp.experts.w2_weight", target["model.layers.0.mlp.experts.w2_weight"])
    with pytest.raises(SyncPayloadError, match=rf"sync entry '{name}'.*{msg}"):
        sync.stage(payload("bad", [good, _corrupt(case, target[name], name)]))
    with pytest.raises(SyncStateError, match="unknown sync 'bad'"):
        sync.commit("bad", [good["name"]])  # the good entry staged in the same call was not kept either
    assert sync.hashes() == before


def test_profile_mismatch_is_refused():
    sync = EngineSync(engine_model(0))
    target = packed_full(seed=100, profile="ocp")
    with pytest.raises(SyncProfileError, match=r"profile 'ocp' but this engine serves profile 'flashinfer'"):
        sync.stage(payload("p", [packed_entry(n, q) for n, q in target.items()], profile="ocp"))


def test_interrupted_sync_keeps_the_previous_version():
    sync = EngineSync(engine_model(0))
    before = sync.hashes()
    target = packed_full(seed=100)
    names = list(target)
    sync.stage(payload("i", [packed_entry(names[0], target[names[0]])]))  # the learner died after one entry
    with pytest.raises(SyncStateError, match=r"were never staged \(interrupted transfer\)"):
        sync.commit("i", names)
    assert sync.hashes() == before
    sync.stage(payload("j", [packed_entry(n, q) for n, q in target.items()]))
    assert sync.abort("j")["dropped"] == sorted(names)
    assert sync.hashes() == before and sync.version == 0


def test_stale_stage_and_stale_delta_base_are_refused():
    sync = EngineSync(engine_model(0))
    t1, t2 = packed_full(seed=100), packed_full(seed=200)
    sync.stage(payload("a", [packed_entry(n, q) for n, q in t1.items()]))
    sync.stage(payload("b", [packed_entry(n, q) for n, q in t2.items()]))
    sync.commit("a", list(t1))
    with pytest.raises(SyncStateError, match="staged against version 0, the engine now serves version 1"):
        sync.commit("b", list(t2))
    name = next(iter(t1))
    delta = {"name": name, "kind": "delta", "index": torch.zeros(0, 3, dtype=torch.int32),
             "codes": torch.zeros(0, 16, dtype=torch.uint8), "scales": torch.zeros(0, dtype=torch.uint8),
             "hashes": {"full": tensor_hash(t2[name])}, "base_hashes": {"full": tensor_hash(t2[name])}}
    with pytest.raises(SyncStateError, match="delta computed against bytes .* send a full"):
        sync.stage(payload("c", [delta]))


class _FailingBackend(CPUReferenceBackend):
    """A backend with its own layout hooks whose write number `fail_at` fails once (a transient fault mid-commit)."""

    name = "failing_test_backend"
    layout_writes = False  # its write_experts does more than the layout's write

    def __init__(self, fail_at: int) -> None:
        self.calls, self.fail_at = 0, fail_at

    def prepare(self, layer):
        pass

    def read_canonical(self, layer, pname):
        return getattr(layer, pname)

    def write_experts(self, layer, pname, experts, values):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("injected failure in the middle of a commit")
        getattr(layer, pname).index_copy_(0, experts, values)


def test_failure_in_the_middle_of_commit_restores_the_previous_version():
    backend = _FailingBackend(fail_at=6)  # 4 params per layer: fails inside the second layer
    model = engine_model(0, backend=backend)
    sync = EngineSync(model)
    before, bytes_before = sync.hashes(), served(model)
    target = packed_full(seed=100)
    with pytest.raises(RuntimeError, match="injected failure"):
        full_sync(sync, target)
    assert sync.hashes() == before and sync.version == 0
    assert all(torch.equal(v, bytes_before[k]) for k, v in served(model).items())
    full_sync(sync, target, "again")
    assert sync.hashes() == {n: tensor_hash(q) for n, q in target.items()}


class _LossyBackend(CPUReferenceBackend):
    """A backend whose layout write is not a byte permutation: one bit of one expert's codes is lost (the kind of bug
    a layout conversion can have), in the second layer's w2 only; `times` writes of it are lossy."""

    name = "lossy_test_backend"
    layout_writes = False  # its write_experts does more than the layout's write

    def __init__(self, times: int) -> None:
        self.times = times

    def prepare(self, layer):
        pass

    def read_canonical(self, layer, pname):
        return getattr(layer, pname)

    def write_experts(self, layer, pname, experts, values):
        common.moe.write_canonical(layer, pname, experts, values)
        if pname == "w2_weight" and ".layers.1." in layer.mxfp4_rl_loader.geometry.layer_name and self.times > 0:
            self.times -= 1
            getattr(layer, pname).data[int(experts[0]), 0, 0] ^= 0x04


def test_commit_checks_what_the_layout_serves_byte_for_byte():
    """The commit reads every written weight back through the backend's layout and compares it with the staged
    bytes: a write that serves other bytes is refused, the previous version restored, and no hash is reported."""
    model = engine_model(0, backend=_LossyBackend(times=1))
    sync = EngineSync(model)
    before, bytes_before = sync.hashes(), served(model)
    with pytest.raises(SyncError, match=r"w2_weight' reads back other bytes than were staged"):
        full_sync(sync, packed_full(seed=100))
    assert sync.version == 0 and sync.hashes() == before
    assert all(torch.equal(v, bytes_before[k]) for k, v in served(model).items())
    assert LocalEngine(model).collective_rpc("mxfp4_sync_hashes")[0] == before


def test_a_restore_that_does_not_restore_says_the_state_is_unknown():
    """When the restore goes through the same faulty layout, the engine does not claim the previous version."""
    model = engine_model(0, backend=_LossyBackend(times=2))
    sync = EngineSync(model)
    with pytest.raises(SyncError, match=r"restoring the previous values failed .*does not read back its previous "
                                        r"bytes.*the engine state is unknown; send a full sync"):
        full_sync(sync, packed_full(seed=100))


def test_blobs_and_payload_files_carry_the_same_bytes(tmp_path):
    from common.moe.wire import FILE_METADATA_KEY
    from common.moe.wire import blob as _blob

    target = packed_full(seed=100)
    entries = [{**packed_entry(n, q), "codes": _blob(q.codes), "scales": _blob(q.scales)} for n, q in target.items()]
    eng = LocalEngine(engine_model(0))
    eng.collective_rpc("mxfp4_sync_stage", args=(payload("blob", entries),))
    res = eng.collective_rpc("mxfp4_sync_commit", args=("blob", list(target)))[0]
    assert res["hashes"] == {n: tensor_hash(q) for n, q in target.items()}
    # the file form, for the HTTP dev endpoint (string arguments only)
    import json

    from safetensors.torch import save_file

    t2 = packed_full(seed=300)
    header = payload("file", [{"name": n, "kind": "packed", "hashes": {"full": tensor_hash(q)}} for n, q in t2.items()])
    tensors = {}
    for i, q in enumerate(t2.values()):
        tensors[f"{i}/codes"], tensors[f"{i}/scales"] = q.codes, q.scales
    save_file(tensors, str(tmp_path / "p.safetensors"), metadata={FILE_METADATA_KEY: json.dumps(header)})
    eng.collective_rpc("mxfp4_sync_stage_file", args=(str(tmp_path / "p.safetensors"),))
    res = eng.collective_rpc("mxfp4_sync_commit", args=("file", list(t2)))[0]
    assert res["hashes"] == {n: tensor_hash(q) for n, q in t2.items()}


def test_engine_without_mxfp4_layers_is_refused():
    with pytest.raises(SyncError, match="serves no MoE layer with mxfp4_rl"):
        EngineSync(nn.Linear(4, 4))


def test_served_hashes_are_reused_until_something_writes_the_layer(monkeypatch):
    """info() and the delta base check reuse each weight's last read-back hash (a hopper_triton read converts a whole
    kb-major tensor); a sync write, a write through common.moe, or a checkpoint load through the plugin's loader makes
    the next hash a fresh read; the audit RPC always reads again, so it sees even a write that bypassed all three."""
    from mxfp4_serve.sync.layers import SyncedLayer

    reads = []
    real_read = SyncedLayer.read
    monkeypatch.setattr(SyncedLayer, "read", lambda self, w: reads.append((self.name, w)) or real_read(self, w))
    model = engine_model(0)
    sync = EngineSync(model)
    first = sync.hashes()
    assert len(reads) == 2 * LAYERS
    reads.clear()
    assert sync.info()["weights"].keys() >= first.keys() and not reads  # every hash reused
    name = next(iter(first))
    layer = sync.layers[name.rpartition(".")[0]]
    codes = layer.module.w13_weight.data
    # through common.moe (every backend's canonical write): that weight's layer is read again
    common.moe.write_canonical(layer.module, "w13_weight", torch.tensor([0]), codes[:1] ^ 0x11)
    after_write = sync.hashes()
    assert after_write[name] != first[name] and {r[0] for r in reads} == {layer.name}
    reads.clear()
    # through the loader (vLLM reloading the checkpoint's expert 0): read again, back to the first bytes
    for shard in ("w1", "w3"):
        layer.loader.load_expert(0, shard, "codes", common.quantize(dense_experts(0)[0, shard], profile=PROFILE).codes)
    assert sync.hashes()[name] == first[name]
    # a write behind everyone's back: the cached hashes cannot know, the audit's fresh read does
    codes[1, 0, 0] ^= 0x01
    assert sync.hashes()[name] == first[name]
    assert LocalEngine(model).collective_rpc("mxfp4_sync_hashes")[0][name] != first[name]


@pytest.mark.parametrize("layout", sorted(MODELS))
def test_direct_writes_of_the_served_form(layout, monkeypatch):
    """A full sync into a layout-writable layer converts the staged bytes to the served form at the stage and diffs,
    writes and reads back raw bytes at the commit: the served bytes equal a canonical engine's converted, the hashes
    a fresh fingerprint's. A write that fails midway, and one that loses a bit, are both undone."""
    from common.grouped_gemm.layout import to_kb_major
    from mxfp4_serve.sync.layers import SyncedLayer

    target = packed_full(seed=100)
    model = MODELS[layout]()
    sync = EngineSync(model)
    sync.stage(payload("s", [packed_entry(n, q) for n, q in target.items()]))
    assert all(s.stored is not None for s in sync._staged["s"].values())
    res = sync.commit("s", list(target))
    now = served(model)
    for name, q in target.items():
        want = to_kb_major(q.codes).view(q.codes.shape) if layout == "kb_major" else q.codes
        assert torch.equal(now[name], want) and torch.equal(now[name + "_scale"], q.scales)
    assert res["hashes"] == sync.hashes(fresh=True) == {n: tensor_hash(q) for n, q in target.items()}

    real, calls = SyncedLayer.write_stored, []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        return real(self, *args, **kwargs)

    lost = []

    def lossy(self, weight, experts, codes, scales, canonical_codes=None):
        real(self, weight, experts, codes, scales, canonical_codes)
        if weight == "w2_weight" and not lost:  # the first write of a w2 loses a bit, the restore does not
            lost.append(1)
            self.raw(weight)[0][int(experts[0]), 0, 0] ^= 0x04

    for fault, msg in ((failing, "injected failure"), (lossy, "w2_weight' reads back other bytes")):
        before, bytes_before = sync.hashes(fresh=True), served(model)
        monkeypatch.setattr(SyncedLayer, "write_stored", fault)
        again = packed_full(seed=200)
        sync.stage(payload("t", [packed_entry(n, q) for n, q in again.items()]))
        with pytest.raises((RuntimeError, SyncError), match=msg):
            sync.commit("t", list(again))
        monkeypatch.setattr(SyncedLayer, "write_stored", real)
        assert sync.version == 1 and sync.hashes(fresh=True) == before == sync.hashes()
        assert all(torch.equal(v, bytes_before[k]) for k, v in served(model).items())

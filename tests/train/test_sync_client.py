"""Learner side of the weight sync against the real engine-side extension (in-process transport, no vLLM):
full then delta syncs, delta == full bytes, code-flip accounting against common.audit, the dense (QAT) path, the
LoRA merge, profile mismatch and the audit that names the first differing block."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import common
from common.audit import diff
from common.errors import ShapeError
from mxfp4_serve.sync import EngineSync
from mxfp4_train.experts import MXFP4Experts
from mxfp4_train.lora import LoRASpec
from mxfp4_train.sync import (
    SyncMismatchError,
    SyncProfileMismatch,
    WeightSync,
    block_delta,
    merge_lora,
    sync,
)
from mxfp4_train.sync.client import learner_weights
from tests.serve.test_sync_engine import (
    LAYERS,
    PROFILE,
    E,
    H,
    I,
    LocalEngine,
    dense_experts,
    engine_model,
    full_weights,
    served,
)
from tests.train.helpers import glu_activation


def learner(seed: int = 0, mode: str = "lora", profile: str = PROFILE, huge: float = 1e30) -> nn.Module:
    """Layers named like vLLM's (model.layers.L.mlp.experts) holding the same experts as engine_model(seed)
    (huge: the adversarial large row; a forward pass needs it small enough not to overflow)."""
    root = nn.Module()
    root.model = nn.Module()
    root.model.layers = nn.ModuleList()
    for L in range(LAYERS):
        blk = nn.Module()
        blk.mlp = nn.Module()
        m = MXFP4Experts(mode=mode, profile=profile, activation=glu_activation(), num_experts=E, hidden_size=H,
                         intermediate_size=I)
        fw = full_weights(dense_experts(seed + L, huge=huge))
        if mode == "lora":
            m.load_packed(common.quantize(fw["w13"], profile=profile), common.quantize(fw["w2"], profile=profile))
            m.add_lora(LoRASpec(r=4, alpha=8))
        else:
            m.load_master(fw["w13"], fw["w2"])
        blk.mlp.experts = m
        root.model.layers.append(blk)
    return root


def _experts(model):
    return [m for m in model.modules() if isinstance(m, MXFP4Experts)]


def _perturb_lora(model, experts=(2, 5), std=0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in _experts(model):
        with torch.no_grad():
            for e in experts:
                m.lora_gate_up.B[e].normal_(0, std, generator=g)
                m.lora_down.B[e].normal_(0, std, generator=g)


def _assert_engine_holds(model, eng_model):
    _, weights = learner_weights(model)
    now = served(eng_model)
    for n, q in weights.items():
        assert torch.equal(now[n], q.codes) and torch.equal(now[n + "_scale"], q.scales), n


def test_first_sync_full_then_delta_with_flip_accounting():
    eng_model = engine_model(0)
    eng = LocalEngine(eng_model)
    model = learner(0)
    first = sync(eng, model)
    assert set(first.kinds.values()) == {"packed"} and first.codes_flipped is None
    _, before = learner_weights(model)
    before = {n: common.MXFP4Tensor(q.codes.clone(), q.scales.clone(), q.profile) for n, q in before.items()}
    _perturb_lora(model)
    assert merge_lora(model).experts_changed == 2 * LAYERS
    rep = sync(eng, model)
    _assert_engine_holds(model, eng_model)
    _, after = learner_weights(model)
    diffs = [diff(before[n], after[n]) for n in after]
    assert set(rep.kinds.values()) == {"delta"}
    assert rep.codes_flipped == sum(d.codes_flipped for d in diffs) > 0
    assert rep.blocks_changed == sum(d.blocks_differing for d in diffs)
    assert rep.payload_bytes == rep.blocks_changed * 29 < rep.packed_bytes  # 12 index + 16 code + 1 scale bytes
    assert rep.packed_bytes * 128 == rep.bf16_bytes * 34


def test_delta_and_full_sync_leave_identical_bytes():
    a_model, b_model = engine_model(0), engine_model(0)
    a, b = WeightSync(LocalEngine(a_model)), WeightSync(LocalEngine(b_model))
    model = learner(0)
    a.sync(model), b.sync(model)
    _perturb_lora(model, experts=(1,))
    merge_lora(model)
    ra, rb = a.sync(model, delta=False), b.sync(model)
    assert set(ra.kinds.values()) == {"packed"} and set(rb.kinds.values()) == {"delta"}
    assert ra.hashes == rb.hashes
    sa, sb = served(a_model), served(b_model)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_consecutive_deltas_keep_the_learner_bytes_as_their_base():
    """A delta sync updates the learner's kept copy of the last-synced bytes with the delta's blocks in place (the
    next delta's base): after two deltas in a row the kept bytes equal the learner's, bit for bit, and the engine
    serves them."""
    eng_model = engine_model(0)
    ws = WeightSync(LocalEngine(eng_model))
    model = learner(0)
    ws.sync(model)
    for experts in ((1,), (0, 2)):
        _perturb_lora(model, experts=experts)
        merge_lora(model)
        rep = ws.sync(model)
        assert set(rep.kinds.values()) == {"delta"}
        _, now = learner_weights(model)
        for name, q in now.items():
            assert torch.equal(ws.last[name].codes, q.codes) and torch.equal(ws.last[name].scales, q.scales), name
        _assert_engine_holds(model, eng_model)


def test_block_delta_sweeps_every_nibble_and_scale():
    g = torch.Generator().manual_seed(0)
    old = common.MXFP4Tensor(torch.randint(0, 256, (2, 4, 64), generator=g, dtype=torch.uint8),
                             torch.randint(0, 255, (2, 4, 4), generator=g, dtype=torch.uint8), PROFILE)
    new = common.MXFP4Tensor(old.codes.clone(), old.scales.clone(), PROFILE)
    new.codes[0, 0, 0] ^= 0x0F  # low nibble of block 0
    new.codes[1, 3, 63] ^= 0xF0  # high nibble of the very last byte
    new.scales[0, 2, 1] ^= 0x01  # scale only
    d = block_delta(old, new)
    assert d.index.tolist() == [[0, 0, 0], [0, 2, 1], [1, 3, 3]]
    assert d.codes_flipped == 2 and d.scales_changed == 1 and d.blocks_total == 32
    rebuilt = old.codes.clone().view(2, 4, 4, 16)
    rebuilt[tuple(d.index.long().t())] = d.codes
    assert torch.equal(rebuilt.view(2, 4, 64), new.codes)
    with pytest.raises(ValueError, match="profiles 'flashinfer' and 'ocp'"):
        block_delta(old, common.MXFP4Tensor(new.codes, new.scales, "ocp"))


def test_block_delta_counts_what_the_audit_diff_counts():
    """The delta counts flips over the changed blocks only; on random changes (whole bytes, single nibbles, scales,
    +0/-0) its numbers equal common.audit.diff's over the whole tensor, and a shape change is refused."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    old = common.MXFP4Tensor(torch.randint(0, 256, (3, 8, 128), generator=g, dtype=torch.uint8),
                             torch.randint(0, 255, (3, 8, 8), generator=g, dtype=torch.uint8), PROFILE)
    codes, scales = old.codes.clone(), old.scales.clone()
    pick = torch.rand(codes.shape, generator=g) < 0.01
    codes[pick] ^= torch.randint(1, 256, (int(pick.sum()),), generator=g, dtype=torch.uint8)
    codes[0, 0, :16] ^= 0x08  # one block of sign-of-zero style flips, low nibbles only
    spick = torch.rand(scales.shape, generator=g) < 0.05
    scales[spick] ^= 0x01
    new = common.MXFP4Tensor(codes, scales, PROFILE)
    d, want = block_delta(old, new), diff(old, new)
    assert (d.codes_flipped, d.scales_changed, d.blocks_changed) == (want.codes_flipped, want.scales_changed,
                                                                     want.blocks_differing)
    with pytest.raises(ShapeError, match="shapes differ"):
        block_delta(old, common.MXFP4Tensor(codes[:2], scales[:2], PROFILE))


def test_merge_makes_the_adapter_a_bitwise_no_op():
    model = learner(0, huge=1.0)
    _perturb_lora(model)
    x = torch.randn(16, H, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, E, (16, 2), generator=torch.Generator().manual_seed(2))
    w = torch.full((16, 2), 0.5)
    m = _experts(model)[0]
    w13, w2 = m.dequantized(torch.float32)
    before13, before2 = m.w13_codes.clone(), m.w2_codes.clone()
    delta13, delta2 = m.lora_gate_up.delta_weight(), m.lora_down.delta_weight()
    merge_lora(model)
    assert float(m.lora_gate_up.B.detach().abs().max()) == 0.0
    # the documented rule (fp32 sum, then the codec) for the experts with an adapter; the others keep their bytes
    # (re-quantizing dequantized bytes may pick another scale for the same values: it is not byte-idempotent)
    for name, (codes, scales, dense, d) in {"w13": (m.w13_codes, m.w13_scales, w13, delta13),
                                        "w2": (m.w2_codes, m.w2_scales, w2, delta2)}.items():
        for e in (2, 5):
            want = common.quantize(dense[e] + d[e], profile=PROFILE)
            assert torch.equal(codes[e], want.codes) and torch.equal(scales[e], want.scales), (name, e)
    assert torch.equal(m.w13_codes[0], before13[0]) and torch.equal(m.w2_codes[7], before2[7])
    plain = MXFP4Experts(mode="lora", profile=PROFILE, activation=glu_activation(), num_experts=E, hidden_size=H,
                         intermediate_size=I)
    plain.load_packed(*m.packed())
    assert torch.equal(m(x, ids, w), plain(x, ids, w))


def test_dense_path_from_qat_masters():
    eng_model = engine_model(0)
    model = learner(0, mode="qat")
    rep = sync(LocalEngine(eng_model), model, mode="dense")
    assert set(rep.kinds.values()) == {"dense"} and rep.payload_bytes == rep.bf16_bytes  # bf16 masters
    _assert_engine_holds(model, eng_model)
    with pytest.raises(ValueError, match="needs QAT masters"):
        sync(LocalEngine(engine_model(0)), learner(0), mode="dense")


def test_profile_mismatch_is_refused_before_sending():
    eng_model = engine_model(0)
    before = EngineSync(eng_model).hashes()
    with pytest.raises(SyncProfileMismatch, match=r"learner's experts use MXFP4 profile 'ocp', the engine \(rank 0\) "
                                                   r"serves 'flashinfer'"):
        sync(LocalEngine(eng_model), learner(0, profile="ocp"))
    assert EngineSync(eng_model).hashes() == before


def test_audit_names_the_first_differing_block():
    eng_model = engine_model(0)
    ws = WeightSync(LocalEngine(eng_model))
    model = learner(0)
    ws.sync(model)
    ws.audit(model)  # in sync: no error
    eng_model.layer1.w2_weight.data[5, 3, 16 + 1] ^= 0x01  # expert 5, row 3, block 1 changed behind our back
    with pytest.raises(SyncMismatchError, match=r"'model.layers.1.mlp.experts.w2_weight'.*1/\d+ blocks differ.*"
                                                r"first difference at expert 5, row 3, block 1"):
        ws.audit(model)


def test_sync_refuses_what_the_engine_cannot_serve():
    # A sync may not report success while the learner's forward uses an adapter or a non-expert parameter the engine
    # does not serve (the engine would compute another function): expert adapters on an engine without expert LoRA,
    # a changed parameter the engine's model does not have.
    from common.moe.wire import SyncError, SyncPayloadError

    eng_model = engine_model(0)
    model = learner(0, mode="lora")
    ws = WeightSync(LocalEngine(eng_model))
    ws.sync(model)  # zero B: the adapter is the identity, the sync is complete
    _perturb_lora(model)
    before = served(eng_model)
    with pytest.raises(SyncError, match=r"2 expert LoRA adapter\(s\) with nonzero B \(model\.layers\.0\.mlp\.experts, "
                                        r".*serves no expert LoRA.*enable_expert_lora.*merge_lora"):
        ws.sync(model)
    assert all(torch.equal(v, before[k]) for k, v in served(eng_model).items())
    merge_lora(model)
    ws.sync(model)
    _assert_engine_holds(model, eng_model)
    # a parameter outside the experts that trains after the first sync is sent; this engine's model has no such
    # parameter, so the sync is refused naming it, before anything changes
    model.model.norm = nn.LayerNorm(4)
    model.model.norm.requires_grad_(False)
    ws2 = WeightSync(LocalEngine(eng_model))
    ws2.sync(model)  # frozen and unchanged: nothing to send
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    before = served(eng_model)
    with pytest.raises(SyncPayloadError, match=r"sync entry 'model\.norm\.weight': no parameter of the served model"):
        ws2.sync(model)
    assert all(torch.equal(v, before[k]) for k, v in served(eng_model).items())


def test_connect_names_what_the_engine_lacks():
    from mxfp4_train.sync import connect

    class NoTransfer:
        def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
            return []

    with pytest.raises(TypeError, match=r"connect: the engine has no init_weight_transfer_engine\(\); vLLM >= 0.25 with "
                                        r"weight_transfer_config=\{'backend': 'mxfp4_rl'\} is needed"):
        connect(NoTransfer())

    class NoExtension(NoTransfer):
        def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
            raise AttributeError(f"Worker has no attribute '{method}'")

        init_weight_transfer_engine = start_weight_update = update_weights = finish_weight_update = None

    with pytest.raises(TypeError, match=r"does not answer mxfp4_sync_info.*worker_extension_cls='mxfp4_serve\.sync"):
        connect(NoExtension())


def test_stage_calls_carry_whole_layers_up_to_the_batch_budget():
    """payloads_by_layer: consecutive whole layers per stage call while their bytes fit the budget (a larger layer
    goes alone, 0 sends one layer per call), every entry once and in order, the parameters after the layers in
    their own chunks."""
    from mxfp4_train.sync.client import payloads_by_layer
    from mxfp4_train.sync.policy import LAYER_BATCH_BYTES, PARAM_CHUNK_BYTES

    def packed(layer: int, weight: str, nbytes: int) -> dict:
        return {"name": f"model.layers.{layer}.mlp.experts.{weight}", "kind": "packed",
                "codes": torch.zeros(nbytes - 8, dtype=torch.uint8), "scales": torch.zeros(8, dtype=torch.uint8)}

    sizes = [300, 500, 200, 900, 100]  # bytes of each layer's two weights together
    entries = [packed(i, w, n // 2) for i, n in enumerate(sizes) for w in ("w13_weight", "w2_weight")]
    params = [{"name": f"model.layers.{i}.self_attn.q_proj.weight", "kind": "param",
               "values": torch.zeros(PARAM_CHUNK_BYTES // 2 + 1, dtype=torch.uint8)} for i in range(3)]

    def layers_of(calls: list[dict]) -> list[list[int]]:
        return [sorted({int(e["name"].split(".")[2]) for e in c["entries"]}) for c in calls]

    calls = payloads_by_layer("s", PROFILE, entries + params, max_bytes=800)
    assert layers_of(calls[:3]) == [[0, 1], [2], [3]] and layers_of(calls[3:4]) == [[4]]  # 900 > 800: alone
    assert [len(c["entries"]) for c in calls[4:]] == [1, 1, 1]  # each parameter past half a chunk: its own
    assert [e["name"] for c in calls for e in c["entries"]] == [e["name"] for e in entries + params]
    assert all(c["sync_id"] == "s" and c["profile"] == PROFILE for c in calls)
    assert layers_of(payloads_by_layer("s", PROFILE, entries, max_bytes=0)) == [[i] for i in range(5)]
    assert layers_of(payloads_by_layer("s", PROFILE, entries)) == [list(range(5))]  # the default: 2 KB in one
    assert LAYER_BATCH_BYTES >= 2 * 428_000_000  # two DeepSeek-V4-Flash layers (428 MB packed each) per call

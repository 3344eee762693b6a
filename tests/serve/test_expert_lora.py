"""Expert LoRA served unmerged (mxfp4_serve.expert_lora): the reference backend against float64 math, zero adapters
bitwise the base, hopper_triton against the reference (Triton interpreter on CPU, natively on a GPU), the learner's
forward against the engine's, and the refusals of factors a layer cannot serve."""

from __future__ import annotations

import pytest
import torch

from common import dequantize, quantize
from common.moe import params as P
from common.moe.quant_config import ExpertLoRAConfig, expert_lora_config
from common.moe.wire import SyncPayloadError
from mxfp4_serve import expert_lora
from mxfp4_serve.backends import ActivationSpec, CPUReferenceBackend

T, H, I, E, TOPK, R_MAX = 37, 128, 64, 8, 2, 8
PROFILE = "flashinfer"
SCALING = 2.0


def _layer(seed: int, rank: int | None, with_bias: bool = False):
    """A layer with packed experts and (rank given) adapters of that rank in max-rank buffers; float64 copies."""
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Module()
    w13 = quantize(torch.randn(E, 2 * I, H, generator=g) * 0.1, profile=PROFILE)
    w2 = quantize(torch.randn(E, H, I, generator=g) * 0.1, profile=PROFILE)
    for name, t in ((P.W13, w13.codes), (P.W13_SCALE, w13.scales), (P.W2, w2.codes), (P.W2_SCALE, w2.scales)):
        layer.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
    if with_bias:
        layer.w13_bias = torch.nn.Parameter(torch.randn(E, 2 * I, generator=g) * 0.1, requires_grad=False)
        layer.w2_bias = torch.nn.Parameter(torch.randn(E, H, generator=g) * 0.1, requires_grad=False)
    factors = None
    if rank is not None:
        expert_lora.add_buffers(layer, E, H, I, ExpertLoRAConfig(R_MAX, SCALING))
        factors = {}
        for weight, (k, n) in ((P.W13, (H, 2 * I)), (P.W2, (I, H))):
            a = torch.randn(E, rank, k, generator=g) / k ** 0.5
            b = torch.randn(E, n, rank, generator=g) * 0.05
            expert_lora.check_factors(layer, weight, a, b, weight)
            expert_lora.write(layer, weight, a, b)
            factors[weight] = (a.double(), b.double())
        expert_lora.set_rank(layer, rank)
    return layer, dequantize(w13, torch.float64), dequantize(w2, torch.float64), factors


def _routing(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    x[0] = 0.0  # a zero token: its adapter term is exactly zero too
    logits = torch.randn(T, E, generator=g)
    w, ids = torch.softmax(logits, -1).topk(TOPK, dim=-1)
    return x, w / w.sum(-1, keepdim=True), ids


def _float64(x, w, ids, w13, w2, factors, b13=None, b2=None):
    out = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for j in range(TOPK):
            e = int(ids[t, j])
            xt = x[t].double()
            h = w13[e] @ xt + (0 if b13 is None else b13[e].double())
            if factors:
                a, b = factors[P.W13]
                h = h + SCALING * (b[e] @ (a[e] @ xt))
            act = torch.nn.functional.silu(h[:I]) * h[I:]
            y = w2[e] @ act + (0 if b2 is None else b2[e].double())
            if factors:
                a, b = factors[P.W2]
                y = y + SCALING * (b[e] @ (a[e] @ act))
            out[t] += w[t, j].double() * y
    return out


@pytest.mark.parametrize("rank", [3, R_MAX])  # below max (zero-padded buffers) and at max
def test_reference_with_adapters_matches_float64(rank):
    spec = ActivationSpec("silu")
    layer, w13, w2, factors = _layer(seed=rank, rank=rank, with_bias=True)
    x, w, ids = _routing()
    got = CPUReferenceBackend().apply(layer, x, w, ids, spec, None)
    ref = _float64(x, w, ids, w13, w2, factors, layer.w13_bias, layer.w2_bias)
    base = _float64(x, w, ids, w13, w2, None, layer.w13_bias, layer.w2_bias)
    # fp32 sums of <= 128 terms: ~1e-5 of the largest output (test_backends' argument); 1e-4 leaves 10x headroom,
    # and the adapters move the output by far more than that (checked, so the bound can tell them apart)
    assert (got.double() - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert (ref - base).abs().max() > 100 * 1e-4 * ref.abs().max()


def test_zero_adapters_are_bitwise_the_base():
    spec = ActivationSpec("silu")
    plain, _, _, _ = _layer(seed=5, rank=None)
    with_lora, _, _, _ = _layer(seed=5, rank=None)
    expert_lora.add_buffers(with_lora, E, H, I, ExpertLoRAConfig(R_MAX, SCALING))
    x, w, ids = _routing()
    base = CPUReferenceBackend().apply(plain, x, w, ids, spec, None)
    assert torch.equal(CPUReferenceBackend().apply(with_lora, x, w, ids, spec, None), base)  # rank 0: no term
    expert_lora.set_rank(with_lora, R_MAX)  # rank set, factors zero: the terms add exact zeros
    assert torch.equal(CPUReferenceBackend().apply(with_lora, x, w, ids, spec, None), base)


def test_engine_reference_equals_the_learner_forward():
    """The learner's experts (mxfp4_train reference path, LoRA mode) and the engine's reference backend compute the
    same function from the same packed bytes and factors: equal within fp32 reassociation of the dequantized
    matmul (the learner dequantizes per expert as the engine does; measured max relative difference ~1e-7)."""
    from mxfp4_train.experts import MXFP4Experts
    from mxfp4_train.grouped import Activation
    from mxfp4_train.lora import LoRASpec

    rank = 4
    layer, _, _, _ = _layer(seed=7, rank=rank)
    mod = MXFP4Experts(mode="lora", profile=PROFILE, activation=Activation("glu", torch.nn.functional.silu),
                       num_experts=E, hidden_size=H, intermediate_size=I, backend="reference")
    mod.load_packed(*quantize_pair(layer))
    mod.add_lora(LoRASpec(r=rank, alpha=SCALING * rank))
    with torch.no_grad():
        for lora, weight in ((mod.lora_gate_up, P.W13), (mod.lora_down, P.W2)):
            a, b = expert_lora.read(layer, weight)
            lora.A.copy_(a)
            lora.B.copy_(b)
    x, w, ids = _routing()
    learner = mod(x, ids, w)
    engine = CPUReferenceBackend().apply(layer, x, w, ids, ActivationSpec("silu"), None)
    assert (learner - engine).abs().max() <= 1e-5 * engine.abs().max()


def quantize_pair(layer):
    from common.tensor import MXFP4Tensor

    return (MXFP4Tensor(layer.w13_weight.data, layer.w13_weight_scale.data, PROFILE),
            MXFP4Tensor(layer.w2_weight.data, layer.w2_weight_scale.data, PROFILE))


def test_hopper_triton_with_adapters_computes_the_reference_function():
    # the learner's Triton kernels (interpreter on CPU): bf16 inputs, factors and outputs, so a few 2^-8 relative
    # error (test_backends' argument); the adapters move the output by > 10x that bound
    from mxfp4_serve.backends.hopper_triton import HopperTritonBackend

    device = "cuda" if torch.cuda.is_available() else "cpu"
    spec = ActivationSpec("silu")
    layer, w13, w2, _ = _layer(seed=11, rank=R_MAX)
    layer = layer.to(device)
    x, w, ids = (t.to(device) for t in _routing())
    x = x.to(torch.bfloat16)
    ref = CPUReferenceBackend().apply(layer, x.float(), w, ids, spec, None).float()
    base = torch.from_numpy(_float64(x.float().cpu(), w.cpu(), ids.cpu(), w13, w2, None).numpy()).float()
    backend = HopperTritonBackend()
    backend.prepare(layer)
    got = backend.apply(layer, x, w, ids, spec, None).float()
    rel = (got - ref).norm() / ref.norm()
    assert rel < 2.5e-2, rel
    assert (ref.cpu() - base).norm() / ref.norm() > 10 * 2.5e-2


def _assert_kernel_copies_match(layer):
    """Each bf16 kernel copy holds its fp32 buffer rounded by torch (the per-call cast it replaces) and zero rank
    columns up to kernel_rank (the per-call padding)."""
    for a_name, b_name in P.LORA_FACTORS.values():
        for name, dim in ((a_name, 1), (b_name, 2)):
            fp32, copy = getattr(layer, name), getattr(layer, name + expert_lora.KERNEL_SUFFIX)
            assert copy.dtype == torch.bfloat16 and copy.shape[dim] == expert_lora.kernel_rank(R_MAX)
            assert torch.equal(copy.narrow(dim, 0, R_MAX), fp32.to(torch.bfloat16))
            assert not copy.narrow(dim, R_MAX, copy.shape[dim] - R_MAX).any()


def test_kernel_copies_follow_every_write():
    """write + set_rank (a sync, load_adapter) and a direct copy into the fp32 buffers + set_rank (the sync's undo)
    both leave the kernels' bf16 copies equal to the fp32 buffers; hopper_triton reads the copies."""
    from mxfp4_serve.backends.hopper_triton import HopperTritonBackend

    assert [expert_lora.kernel_rank(r) for r in (1, 8, 16, 17, 24, 64)] == [16, 16, 16, 32, 32, 64]
    layer, _, _, _ = _layer(seed=13, rank=3)
    _assert_kernel_copies_match(layer)
    assert bool(getattr(layer, P.W13_LORA_A + expert_lora.KERNEL_SUFFIX).any())
    old = getattr(layer, P.W2_LORA_B).clone()
    expert_lora.write(layer, P.W2, torch.randn(E, 5, I), torch.randn(E, H, 5))
    expert_lora.set_rank(layer, 5)
    _assert_kernel_copies_match(layer)
    getattr(layer, P.W2_LORA_B).copy_(old)  # the sync's undo: fp32 buffers restored, then the old rank
    expert_lora.set_rank(layer, 3)
    _assert_kernel_copies_match(layer)
    served = HopperTritonBackend._lora(layer)
    assert all(a is b for a, b in zip(served[:4], expert_lora.factors(layer).kernel)) and served[4] == SCALING


def test_bad_factors_are_refused_naming_the_layer():
    layer, _, _, _ = _layer(seed=3, rank=2)
    good_a, good_b = torch.zeros(E, 2, H), torch.zeros(E, 2 * I, 2)
    where = "sync entry 'model.layers.0.mlp.experts.w13_lora'"
    with pytest.raises(SyncPayloadError, match="w13_lora.*rank 9 exceeds the engine's expert_lora max_rank 8"):
        expert_lora.check_factors(layer, P.W13, torch.zeros(E, 9, H), torch.zeros(E, 2 * I, 9), where)
    with pytest.raises(SyncPayloadError, match="must be float32.*got torch.bfloat16"):
        expert_lora.check_factors(layer, P.W13, good_a.bfloat16(), good_b, where)
    with pytest.raises(SyncPayloadError, match=r"must be a \[8, 2, 128\] and b \[8, 128, 2\]"):
        expert_lora.check_factors(layer, P.W13, good_a, torch.zeros(E, 2 * I + 1, 2), where)
    bad = good_b.clone()
    bad[3, 5, 1] = float("nan")
    with pytest.raises(SyncPayloadError, match="'b' holds NaN or Inf"):
        expert_lora.check_factors(layer, P.W13, good_a, bad, where)
    plain, _, _, _ = _layer(seed=3, rank=None)
    with pytest.raises(SyncPayloadError, match="serves no expert LoRA"):
        expert_lora.check_factors(plain, P.W13, good_a, good_b, where)


@pytest.mark.parametrize("value, match", [({"max_rank": 0, "scaling": 1.0}, "max_rank must be an int"),
                                          ({"max_rank": 8, "scaling": float("nan")}, "scaling must be a finite"),
                                          ({"max_rank": 8}, "must be")])
def test_bad_expert_lora_config_is_refused(value, match):
    with pytest.raises(ValueError, match=match):
        expert_lora_config({"expert_lora": value})


def test_sm100_backend_refuses_expert_lora_with_the_reason():
    from mxfp4_serve.backends.sm100_flashinfer import SM100FlashInferBackend

    assert not SM100FlashInferBackend.serves_lora
    assert "activation in one kernel" in SM100FlashInferBackend.lora_refusal


def test_peft_layout_round_trips_the_learners_adapter():
    """common.moe.params.from_peft (the engine's reader) inverts the learner's PEFT writer bit for bit."""
    from common.moe.params import from_peft
    from mxfp4_train.lora import ExpertLoRA, LoRASpec

    lora = ExpertLoRA(E, H, 2 * I, LoRASpec(r=3, alpha=6.0))
    with torch.no_grad():
        lora.B.copy_(torch.randn(lora.B.shape))
    a, b = from_peft(*lora.to_peft(), E)
    assert torch.equal(a, lora.A.detach()) and torch.equal(b, lora.B.detach())


def test_expert_lora_config_names_an_adapter():
    cfg = expert_lora_config({"expert_lora": {"max_rank": 8, "scaling": 2.0, "adapter": "adapter"}})
    assert cfg.adapter == "adapter" and cfg.as_dict()["adapter"] == "adapter"
    with pytest.raises(ValueError, match="'adapter' must be a directory path"):
        expert_lora_config({"expert_lora": {"max_rank": 8, "scaling": 2.0, "adapter": 3}})


def test_moe_method_takes_the_clamped_silu_from_the_config():
    """DeepSeek-V4's experts: vLLM's "silu" with the layer's swiglu_limit is the contract's silu_clamp with the
    model's limit (every backend computes it); an activation outside the contract, or one a backend does not
    compute, is refused at engine start naming it."""
    from types import SimpleNamespace

    from mxfp4_serve import compat
    from mxfp4_serve.backends import CPUReferenceBackend
    from mxfp4_serve.backends.hopper_triton import HopperTritonBackend
    from mxfp4_serve.moe_method import check_activation

    spec = compat.activation_spec(SimpleNamespace(activation="silu", swiglu_limit=10.0))
    assert (spec.name, spec.limit, spec.kernel_limit) == ("silu_clamp", 10.0, 10.0)
    assert compat.activation_spec(SimpleNamespace(activation="silu", swiglu_limit=None)).name == "silu"
    assert compat.activation_spec(SimpleNamespace(activation="swigluoai", swiglu_limit=None)).limit == 7.0
    for backend in (CPUReferenceBackend(), HopperTritonBackend()):
        check_activation(SimpleNamespace(activation="silu", swiglu_limit=10.0), backend)
    with pytest.raises(NotImplementedError, match=r"'hopper_triton' cannot compute.*alpha 1.5, limit 7.0"):
        check_activation(SimpleNamespace(activation="swigluoai", swiglu_alpha=1.5), HopperTritonBackend())
    with pytest.raises(ValueError, match=r"unsupported MoE activation 'gelu'"):
        check_activation(SimpleNamespace(activation="gelu"), CPUReferenceBackend())
    with pytest.raises(NotImplementedError, match=r"silu MoE with swiglu_alpha=None, swiglu_beta=1.0"):
        compat.activation_spec(SimpleNamespace(activation="silu", swiglu_limit=10.0, swiglu_beta=1.0))
    with pytest.raises(ValueError, match=r"finite positive.*got -1.0"):
        compat.activation_spec(SimpleNamespace(activation="silu", swiglu_limit=-1.0))

"""MXFP4Experts (packed + per-expert LoRA): forward and gradients against a float64 dense reference, and the
memory promise: autograd keeps only packed bytes and activations, never a widened expert stack."""

from __future__ import annotations

import pytest
import torch

from mxfp4_train.grouped import Activation

from .helpers import packed_experts, rel_err, routing

E, H, I, T, K = 4, 64, 32, 24, 2


def _act64(kind: str, gu: torch.Tensor) -> torch.Tensor:
    # Written out independently of grouped.Activation so the test does not trust the code under test.
    if kind == "glu":
        g, u = gu.chunk(2, dim=-1)
        return g * torch.sigmoid(g) * u
    g, u = gu[..., ::2].clamp(max=7.0), gu[..., 1::2].clamp(-7.0, 7.0)
    return (u + 1) * g * torch.sigmoid(1.702 * g)


def _reference64(mod, x, ids, w, lora64):
    """Every expert on every token in float64 with the dequantized weights, then the routed combination."""
    w13, w2 = (t.double() for t in mod.dequantized(torch.float32))
    a13, b13, a2, b2 = lora64
    s13, s2 = mod.lora_gate_up.spec.scaling, mod.lora_down.spec.scaling
    gu = torch.einsum("th,enh->etn", x, w13) + s13 * torch.einsum("th,erh,enr->etn", x, a13, b13)
    if mod.b13 is not None:
        gu = gu + mod.b13.double()[:, None, :]
    h = _act64(mod.activation.kind, gu)
    y = torch.einsum("eti,ehi->eth", h, w2) + s2 * torch.einsum("eti,eri,ehr->eth", h, a2, b2)
    if mod.b2 is not None:
        y = y + mod.b2.double()[:, None, :]
    picked = y[ids, torch.arange(x.shape[0])[:, None]]  # [T, K, H]
    return (picked * w.double()[..., None]).sum(1)


def _preact_max(mod, x):
    w13, _ = mod.dequantized(torch.float32)
    return torch.einsum("th,enh->etn", x.detach().float(), w13).abs().max().item()


def _grads(mod, x, ids, w, g):
    out = mod(x, ids, w)
    (out.float() * g).sum().backward()
    return out, x.grad, [p.grad for p in (mod.lora_gate_up.A, mod.lora_gate_up.B, mod.lora_down.A, mod.lora_down.B)]


ACTS = {"glu": lambda: Activation("glu", act_fn=torch.nn.functional.silu),
        "clamp_swiglu": lambda: Activation("clamp_swiglu", alpha=1.702, limit=7.0)}


@pytest.mark.parametrize("kind", ["glu", "clamp_swiglu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grads_match_float64_reference(kind, dtype):
    gen = torch.Generator().manual_seed(7)
    # In fp32 the clamp_swiglu case uses large weights and inputs so that pre-activations cross the limit 7 and the
    # clamp branch is exercised. Not in bf16: a bf16 rounding that moves a value across the limit flips its derivative
    # between 0 and O(1), which no rounding-error bound covers.
    big = kind == "clamp_swiglu" and dtype == torch.float32
    mod = packed_experts(E, H, I, activation=ACTS[kind](), bias=kind == "clamp_swiglu", seed=3,
                         scale=0.5 if big else 0.05)
    x = (torch.randn(T, H, generator=gen) * (4.0 if big else 1.0)).to(dtype).requires_grad_()
    ids, w = routing(T, E, K, gen)
    g = torch.randn(T, H, generator=gen)
    out, gx, glora = _grads(mod, x, ids, w.to(dtype), g)

    x64 = x.detach().double().requires_grad_()
    lora64 = [p.detach().double().requires_grad_() for p in (mod.lora_gate_up.A, mod.lora_gate_up.B,
                                                             mod.lora_down.A, mod.lora_down.B)]
    ref = _reference64(mod, x64, ids, w.to(dtype), lora64)
    (ref * g.double()).sum().backward()
    if big:
        assert _preact_max(mod, x) > 7.0
    # Bounds (norm-wise relative error). fp32: unit roundoff u = 2^-24 ~ 6e-8; every value passes ~10 roundings in
    # sequence (GEMM accumulations over K <= 64 in blocks, LoRA, activation, routing sum), so ~10u = 6e-7 typical and
    # 1e-5 is a safe ceiling (measured 2e-7 .. 4e-7). bf16 (the activation dtype): u = 2^-9 ~ 2e-3; the same ~10
    # roundings give ~2e-2 at worst (measured 4e-3 .. 6e-3). Both bounds still catch a wrong gradient (a missing LoRA
    # term, a wrong transpose or an expert mix-up is O(1)).
    bound = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(out, ref) < bound
    assert rel_err(gx, x64.grad) < bound
    for got, leaf in zip(glora, lora64):
        assert got.dtype == torch.float32  # fp32 masters receive fp32 grads
        assert rel_err(got, leaf.grad) < bound


def test_packed_weights_get_no_gradient_and_stay_uint8():
    mod = packed_experts(E, H, I)
    assert {n for n, p in mod.named_parameters()} == {"lora_gate_up.A", "lora_gate_up.B", "lora_down.A",
                                                       "lora_down.B"}
    assert all(b.dtype == torch.uint8 for n, b in mod.named_buffers() if "codes" in n or "scales" in n)
    # 4.25 bits per expert weight: 4 bits of code + 8 bits of scale per 32 elements
    bits = 8 * sum(b.numel() for n, b in mod.named_buffers() if "codes" in n or "scales" in n)
    assert bits / (E * (2 * I * H + H * I)) == 4.25


def _saved_tensors_during_backward(mod, x, ids, w):
    seen = []

    def pack(t):
        seen.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = mod(x, ids, w)
    out.float().sum().backward()
    return seen


def test_autograd_saves_no_widened_expert_weights():
    gen = torch.Generator().manual_seed(1)
    mod = packed_experts(E, H, I)
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16).requires_grad_()
    ids, w = routing(T, E, K, gen)
    seen = _saved_tensors_during_backward(mod, x, ids, w.to(torch.bfloat16))
    weight_shapes = {(2 * I, H), (H, I), (E, 2 * I, H), (E, H, I), (H, 2 * I), (I, H)}
    floats = [t for t in seen if t.is_floating_point() and t.dim() >= 2]
    assert not [tuple(t.shape) for t in floats if tuple(t.shape[-2:]) in weight_shapes], "a dequantized weight is saved"
    # the packed bytes saved are views of the resident buffers (no copy, not even of the uint8 codes)
    bufs = [(b.untyped_storage().data_ptr()) for b in (mod.w13_codes, mod.w13_scales, mod.w2_codes, mod.w2_scales)]
    packed = [t for t in seen if t.dtype == torch.uint8]
    assert packed and all(t.untyped_storage().data_ptr() in bufs for t in packed)
    total_float = sum(t.numel() * t.element_size() for t in floats)
    assert total_float < E * (2 * I * H + H * I) * 2  # less than one bf16 copy of the expert stack


def test_saved_tensor_probe_does_see_weights_in_qat_mode():
    # The probe above must be able to fail: in QAT mode F.linear saves the fake-quantized bf16 weight of each expert.
    from mxfp4_train.experts import MXFP4Experts

    gen = torch.Generator().manual_seed(2)
    mod = MXFP4Experts(mode="qat", profile="flashinfer", activation=ACTS["glu"](), num_experts=E, hidden_size=H,
                       intermediate_size=I)
    mod.load_master(torch.randn(E, 2 * I, H, generator=gen).bfloat16(), torch.randn(E, H, I, generator=gen).bfloat16())
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16).requires_grad_()
    ids, w = routing(T, E, K, gen)
    seen = _saved_tensors_during_backward(mod, x, ids, w.to(torch.bfloat16))
    assert any(tuple(t.shape) == (2 * I, H) and t.is_floating_point() for t in seen)


def test_lora_dropout_only_in_training():
    gen = torch.Generator().manual_seed(4)
    from mxfp4_train.lora import LoRASpec

    mod = packed_experts(E, H, I, lora_r=0)
    mod.add_lora(LoRASpec(r=4, alpha=8, dropout=0.5))
    with torch.no_grad():
        mod.lora_gate_up.B.normal_(0, 0.1, generator=gen)
    x = torch.randn(T, H, generator=gen)
    ids, w = routing(T, E, K, gen)
    mod.eval()
    a, b = mod(x, ids, w), mod(x, ids, w)
    assert torch.equal(a, b)
    mod.train()
    assert not torch.equal(mod(x, ids, w), a)

"""Fake-QAT: forward values are the codec's dequantize(quantize(w)) bit for bit; backward is the identity on w."""

from __future__ import annotations

import pytest
import torch

import common
from mxfp4_train.experts import MXFP4Experts
from mxfp4_train.weights import fake_quant_act_mxfp8, fake_quant_ste

from .helpers import PROFILE, adversarial_weights, glu_activation, routing

E, H, I, T, K = 4, 64, 32, 16, 2


@pytest.mark.parametrize("profile", ["flashinfer", "ocp", "even"])
def test_fake_quant_forward_is_codec_roundtrip_bitwise(profile):
    gen = torch.Generator().manual_seed(0)
    w = adversarial_weights(E, 2 * I, H, gen)
    expected = common.dequantize(common.quantize(w, profile=profile), dtype=torch.bfloat16)
    got = fake_quant_ste(w, profile)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
    assert not torch.equal(got, w)  # the quantizer did change the values (the test would notice a no-op)


def test_fake_quant_backward_is_identity():
    gen = torch.Generator().manual_seed(1)
    w = adversarial_weights(E, 2 * I, H, gen).requires_grad_()
    g = torch.randn(E, 2 * I, H, generator=gen).to(torch.bfloat16)
    fake_quant_ste(w, PROFILE).backward(g)
    assert torch.equal(w.grad, g)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_qat_refuses_nonfinite_master_naming_the_expert(bad):
    gen = torch.Generator().manual_seed(5)
    mod = _qat_module(gen)
    with torch.no_grad():
        mod.w13[2, 5, 40] = bad
    ids = torch.full((T, K), 2)
    ids[:, 1] = 3
    with pytest.raises(common.NonFiniteError, match=r"w13 \(gate_up\) master, expert\[2\]"):
        mod(torch.randn(T, H).bfloat16(), ids, torch.full((T, K), 0.5).bfloat16())


def _qat_module(gen):
    mod = MXFP4Experts(mode="qat", profile=PROFILE, activation=glu_activation(), num_experts=E, hidden_size=H,
                       intermediate_size=I)
    mod.load_master(adversarial_weights(E, 2 * I, H, gen, max_magnitude=False),
                    adversarial_weights(E, H, I, gen, max_magnitude=False))
    return mod


def test_qat_experts_compute_with_exactly_the_served_bytes():
    """A QAT module and a packed module built from the QAT module's own export give identical outputs."""
    gen = torch.Generator().manual_seed(2)
    qat = _qat_module(gen)
    w13, w2 = qat.packed()
    served = MXFP4Experts(mode="lora", profile=PROFILE, activation=glu_activation(), num_experts=E, hidden_size=H,
                          intermediate_size=I)
    served.load_packed(w13, w2)
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16)
    ids, w = routing(T, E, K, gen)
    w = w.to(torch.bfloat16)
    assert torch.equal(qat(x, ids, w), served(x, ids, w))


def test_qat_master_gradient_is_the_gradient_wrt_the_quantized_weight():
    gen = torch.Generator().manual_seed(3)
    qat = _qat_module(gen)
    x = torch.randn(T, H, generator=gen).to(torch.float32)
    ids, w = routing(T, E, K, gen)
    qat.float()  # fp32 so that both sides run the same GEMMs without bf16 re-rounding of the masters
    g = torch.randn(T, H, generator=gen)
    (qat(x, ids, w) * g).sum().backward()
    # reference: the fake-quantized weights as leaves, used in the same module in packed form is not differentiable;
    # so rebuild a QAT module whose masters are already on the grid (fake quant is then the identity on the values)
    w13q = common.fake_quant(qat.w13.detach(), profile=PROFILE)
    w2q = common.fake_quant(qat.w2.detach(), profile=PROFILE)
    ref = MXFP4Experts(mode="qat", profile=PROFILE, activation=glu_activation(), num_experts=E, hidden_size=H,
                       intermediate_size=I).float()
    ref.load_master(w13q, w2q)
    (ref(x, ids, w) * g).sum().backward()
    assert torch.equal(qat.w13.grad, ref.w13.grad) and torch.equal(qat.w2.grad, ref.w2.grad)
    assert qat.w13.grad.abs().sum() > 0


def test_w4a8_activation_fake_quant_matches_codec_mxfp8():
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(T, H, generator=gen) * 3).to(torch.bfloat16).requires_grad_()
    e, s = common.quantize_mxfp8(x.detach(), profile=PROFILE)
    y = fake_quant_act_mxfp8(x, PROFILE)
    assert torch.equal(y, common.dequantize_mxfp8(e, s, torch.bfloat16))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    # and a W4A8 experts module differs from the W4A16 one (activation quantization is really applied)
    mod = _qat_module(gen)
    ids, w = routing(T, E, K, gen)
    a = mod(x.detach(), ids, w.bfloat16())
    mod.act_quant = "mxfp8"
    assert not torch.equal(mod(x.detach(), ids, w.bfloat16()), a)

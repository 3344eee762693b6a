"""Shared builders for the learner tests: random experts with adversarial blocks, float64 references."""

from __future__ import annotations

import torch

import common
from mxfp4_train.experts import MXFP4Experts
from mxfp4_train.grouped import Activation

PROFILE = "flashinfer"


def adversarial_weights(e: int, n: int, k: int, gen: torch.Generator, dtype=torch.bfloat16,
                        max_magnitude: bool = True) -> torch.Tensor:
    """Random weights [e, n, k] with some blocks made hard for the quantizer: all zero, exact E2M1 ties
    (0.25, 2.5, 5.0 times a power of two), maximum bf16 magnitude, bf16 subnormals."""
    w = torch.randn(e, n, k, generator=gen) * 0.05
    w[0, 0, :32] = 0.0
    w[0, 1, :32] = torch.tensor([0.25, 0.75, 2.5, 5.0] * 8) * 2.0 ** -4  # midpoints of the E2M1 grid: ties
    w[0, 1, 31] = 6.0 * 2.0 ** -4  # pins the block scale so the values above are exact ties
    if max_magnitude:  # off for weights that go through a forward pass (bf16 max would overflow the GEMM)
        w[-1, -1, -32:] = torch.finfo(torch.bfloat16).max * torch.linspace(-1, 1, 32)
    w[-1, -2, :32] = 2.0 ** -130 * torch.arange(1, 33)  # bf16 subnormals
    return w.to(dtype)


def glu_activation() -> Activation:
    return Activation("glu", act_fn=torch.nn.functional.silu)


def packed_experts(e=4, h=64, i=32, *, activation=None, bias=False, seed=0, lora_r=4, random_b=True,
                   scale=0.05) -> MXFP4Experts:
    gen = torch.Generator().manual_seed(seed)
    act = activation or glu_activation()
    mod = MXFP4Experts(mode="lora", profile=PROFILE, activation=act, num_experts=e, hidden_size=h,
                       intermediate_size=i, has_bias=bias)
    w13 = (torch.randn(e, 2 * i, h, generator=gen) * scale).to(torch.bfloat16)
    w2 = (torch.randn(e, h, i, generator=gen) * scale).to(torch.bfloat16)
    mod.load_packed(common.quantize(w13, profile=PROFILE), common.quantize(w2, profile=PROFILE))
    if bias:
        mod.load_bias((torch.randn(e, 2 * i, generator=gen) * 0.1).to(torch.bfloat16),
                      (torch.randn(e, h, generator=gen) * 0.1).to(torch.bfloat16))
    if lora_r:
        from mxfp4_train.lora import LoRASpec

        torch.manual_seed(seed)
        mod.add_lora(LoRASpec(r=lora_r, alpha=2 * lora_r))
        if random_b:  # a zero B would hide every bug in the B-side gradient
            with torch.no_grad():
                mod.lora_gate_up.B.normal_(0, 0.05, generator=gen)
                mod.lora_down.B.normal_(0, 0.05, generator=gen)
    return mod


def routing(t: int, e: int, k: int, gen: torch.Generator):
    logits = torch.randn(t, e, generator=gen)
    w, ids = torch.topk(torch.softmax(logits, -1), k, dim=-1)
    return ids, w / w.sum(-1, keepdim=True)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm-wise relative error ||a - ref|| / ||ref|| in float64."""
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-300)).item()

"""Fake-QAT of the routed-expert MLP on the fused path: masters quantized by the codec's kernel, the MXFP4 grouped
GEMMs for forward and dX, and the straight-through weight gradient as a grouped GEMM of dy^T x.

    W13q, W2q = quantize(W13), quantize(W2)        (the bytes common.quantize gives: what the engine will serve)
    pre = xq W13q^T (+ b13);  a = act(pre);  y = aq W2q^T (+ b2)

with xq, aq the MXFP8 fake quant of x and a when act_profile is set (W4A8), else x and a. The backward is the
straight-through estimator of mxfp4_train/weights.py::FakeQuantSTE, whose backward is the identity (no clipping,
no mask): the gradient of the fake-quantized weight goes unchanged to its master, dW2_e = dy_e^T aq_e and
dW13_e = dpre_e^T xq_e (the GEMMs' own inputs), and the activation fake quant passes dx and da through unchanged.
The masters' bf16 dequantization is never built: the GEMMs dequantize the packed tiles in registers, exactly
(E2M1 value times a power of two is a bf16 value), and autograd saves the packed bytes (4.25 bits a weight), the
sorted rows and the pre-activation.
"""

from __future__ import annotations

import torch

from ..kernels import quantize_mxfp4_triton, quantize_mxfp8_triton
from ..profiles import Profile, get_profile
from ..reference import check_finite, dequantize_mxfp8
from .ops import grouped_mm_mxfp4, grouped_mm_mxfp4_dx, grouped_mm_mxfp4_gated
from .wgrad import expert_wgrad


def _suspect(scales: torch.Tensor, prof: Profile) -> torch.Tensor:
    """A 0-dim bool on the device: whether any block got the profile's Inf or NaN scale byte. A block holding NaN
    or Inf always gets one of the two, so False proves the input finite without reading it again."""
    return ((scales == prof.inf_scale) | (scales == prof.nan_scale)).any()


def raise_if_nonfinite(checked: list[tuple[torch.Tensor, torch.Tensor, str]], prof: Profile) -> None:
    """common.quantize's nonfinite="raise" at the cost of one read of the scales: (tensor, its scales, its name)
    triples; one host sync for all of them, and the full check (which names the first bad block) only where a
    scale byte says a block may hold NaN/Inf (a finite block can reach those bytes too: then nothing is raised)."""
    if not checked:
        return
    if bool(torch.stack([_suspect(s, prof) for _, s, _ in checked]).any()):
        for t, _, name in checked:
            check_finite(t, name)


def quantize_master(w: torch.Tensor, prof: Profile) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of a master [E, N, K]: the codec's Triton kernel, the bytes of common.quantize(w, prof)
    (tests/common/test_kernels.py); the non-finite check is the caller's (raise_if_nonfinite)."""
    return quantize_mxfp4_triton(w.detach(), prof)


def fake_quant_rows_mxfp8(x: torch.Tensor, prof: Profile, name: str) -> torch.Tensor:
    """common.fake_quant_mxfp8(x, profile, name) (nonfinite="raise") of activation rows [M, K]: the codec's Triton
    quantizer, then the reference's exact dequantization into x's dtype (elementwise torch, any device)."""
    elems, scales = quantize_mxfp8_triton(x, prof)
    raise_if_nonfinite([(x, scales, name)], prof)
    return dequantize_mxfp8(elems, scales, x.dtype, name=name, allow_nan_scale=True)


class MXFP4QATGroupedMLP(torch.autograd.Function):
    """apply(x [M, H] bf16 sorted rows, offsets int32 [E+1], w13 master [E, 2I, H], w2 master [E, H, I], profile,
    activation, gate_up, b13 [E, 2I] | None, b2 [E, H] | None, act_profile | None, names (w13's, w2's),
    wgrad_backend) -> y [M, H] bf16. Masters in bf16 or fp32; their gradients come back in their dtype,
    accumulated in fp32 and rounded once (wgrad.py). gate_up, activation: as grouped_mm_mxfp4_gated."""

    @staticmethod
    def forward(ctx, x, offsets, w13, w2, profile, activation, gate_up, b13, b2, act_profile, names,
                wgrad_backend="auto"):
        prof = get_profile(profile)
        c13, s13 = quantize_master(w13, prof)
        c2, s2 = quantize_master(w2, prof)
        raise_if_nonfinite([(w13, s13, names[0]), (w2, s2, names[1])], prof)
        aprof = None if act_profile is None else get_profile(act_profile)
        xq = x if aprof is None else fake_quant_rows_mxfp8(x, aprof, "expert input activations")
        act, pre = grouped_mm_mxfp4_gated(xq, offsets, c13, s13, activation=activation, bias=b13, save_pre=True,
                                          gate_up=gate_up)
        aq = act if aprof is None else fake_quant_rows_mxfp8(act, aprof, "expert down-projection activations")
        y = grouped_mm_mxfp4(aq, offsets, c2, s2, bias=b2)
        ctx.save_for_backward(xq, offsets, c13, s13, c2, s2, pre, aq)
        ctx.meta = (activation, gate_up, w13.dtype, w2.dtype, None if b13 is None else b13.dtype,
                    None if b2 is None else b2.dtype, wgrad_backend)
        return y

    @staticmethod
    def backward(ctx, dy):
        xq, offsets, c13, s13, c2, s2, pre, aq = ctx.saved_tensors
        activation, gate_up, dt13, dt2, bt13, bt2, backend = ctx.meta
        need = ctx.needs_input_grad
        dy = dy.to(torch.bfloat16).contiguous()
        dw13 = dw2 = db13 = db2 = dx = None
        if need[3] or need[8]:
            dw2, db2 = expert_wgrad(dy, aq, offsets, dt2, bias_dtype=bt2 if need[8] else None, backend=backend)
        # the activation fake quant is straight-through: d aq is d a, and the dx kernel applies act's backward
        dpre = grouped_mm_mxfp4_dx(dy, offsets, c2, s2, pre=pre, activation=activation, gate_up=gate_up)
        if need[2] or need[7]:
            dw13, db13 = expert_wgrad(dpre, xq, offsets, dt13, bias_dtype=bt13 if need[7] else None,
                                      backend=backend)
        if need[0]:
            dx = grouped_mm_mxfp4_dx(dpre, offsets, c13, s13)
        return (dx, None, dw13 if need[2] else None, dw2 if need[3] else None, None, None, None,
                db13, db2, None, None, None)

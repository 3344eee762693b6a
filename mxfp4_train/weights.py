"""Where an expert's weight comes from: packed MXFP4 bytes (frozen) or a bf16 master through fake quant (QAT).

Both views answer `linear(x, e)` = x @ W_e^T with W_e what the engine serves after the next sync. The packed view
runs through `PackedLinearFn`, which saves only the packed bytes of that expert (views into the resident buffers, no
copy) and dequantizes again in backward: no bf16 copy of any expert outlives the call that made it.
"""

from __future__ import annotations

import torch
from torch import nn

import common


def _dequant(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return common.dequantize((codes, scales), dtype=dtype)


class PackedLinearFn(torch.autograd.Function):
    """y = x @ dequantize(codes, scales)^T; grad only for x (the packed weight is frozen by construction)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(codes, scales)
        return nn.functional.linear(x, _dequant(codes, scales, x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        codes, scales = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ _dequant(codes, scales, grad_out.dtype)
        return grad_x, None, None


class FakeQuantSTE(torch.autograd.Function):
    """Forward: the codec's fake quant (dequantize(quantize(w))). Backward: identity (straight-through estimator)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, profile: str, fp8: bool, name: str | None) -> torch.Tensor:
        if fp8:
            return common.fake_quant_mxfp8(w, profile=profile, name=name)
        return common.fake_quant(w, profile=profile, name=name)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None, None


def fake_quant_ste(w: torch.Tensor, profile: str, name: str | None = None) -> torch.Tensor:
    return FakeQuantSTE.apply(w, profile, False, name)


def fake_quant_act_mxfp8(x: torch.Tensor, profile: str, name: str | None = "expert input activations") -> torch.Tensor:
    """W4A8: the MXFP8 activation quantizer of a W4A8 engine, straight-through in backward."""
    return FakeQuantSTE.apply(x, profile, True, name)


class PackedExpertWeights:
    """Frozen experts: codes uint8 [E, N, K/2] and scales uint8 [E, N, K/32] (canonical layout)."""

    trainable = False

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor) -> None:
        self.codes, self.scales = codes, scales

    def linear(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return PackedLinearFn.apply(x, self.codes[e], self.scales[e])

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return _dequant(self.codes, self.scales, dtype)


class FakeQuantExpertWeights:
    """QAT experts: bf16 master [E, N, K]; each forward uses fake_quant(master[e]) with the model's profile."""

    trainable = True

    def __init__(self, master: torch.Tensor, profile: str, label: str = "experts") -> None:
        self.master, self.profile, self.label = master, profile, label

    def linear(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return nn.functional.linear(x, fake_quant_ste(self.master[e], self.profile, f"{self.label}[{e}]"))

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return common.fake_quant(self.master.detach(), profile=self.profile).to(dtype)

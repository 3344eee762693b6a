"""The routed-expert MLP on expert-sorted rows, built from the grouped MXFP4 GEMMs:

    pre = x W13^T (+ b13) (+ s x A13^T B13^T);  a = act(pre);  y = a W2^T (+ b2) (+ s a A2^T B2^T)

`MXFP4GroupedMLP` is the learner's autograd.Function: the packed W13/W2 are frozen (no weight gradient), LoRA
factors (any float dtype, e.g. fp32 masters) get gradients, and autograd saves only packed weights and bf16
activations (x, pre, a, the rank-R projections). `moe_mlp_forward` is the same forward without autograd state
(the engine path); `moe_layer_forward` adds routing and the weighted un-permute.
"""

from __future__ import annotations

import torch

from ..profiles import get_profile
from . import lora as L
from .combine import sum_slots
from .configs import padded_rank, rows_bucket
from .ops import grouped_mm_mxfp4, grouped_mm_mxfp4_dx, grouped_mm_mxfp4_gated, reduction_order
from .routing import route

Packed = tuple[torch.Tensor, torch.Tensor]  # (codes uint8 [E, N, K/2], scales uint8 [E, N, K/32])


def _bf16(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.bfloat16).contiguous()


def _down(x: torch.Tensor, offsets: torch.Tensor, a: torch.Tensor | None, scaling: float) -> torch.Tensor | None:
    """scaling * x_e @ A_e^T [M, R] (bf16): the LoRA down-projection, or None without LoRA."""
    return None if a is None else L.project(x, offsets, a, scaling)


class MXFP4GroupedMLP(torch.autograd.Function):
    """apply(x [M, H] bf16 sorted, offsets int32 [E+1], w13_codes, w13_scales, w2_codes, w2_scales,
    lora13_a [E, R, H] | None, lora13_b [E, 2I, R] | None, lora2_a [E, R, I] | None, lora2_b [E, H, R] | None,
    scaling, activation, bias13 [E, 2I] | None, bias2 [E, H] | None, gate_up = "halves", limit = None,
    act_profile = None) -> y [M, H] bf16. gate_up "interleaved": w13's rows, bias13 and lora13_b's rows are
    gpt-oss's (gate, up) pairs (ops.py). limit: the clamp limit of activation "silu_clamp" (the model's
    swiglu_limit), forward and backward. act_profile (W4A8): the packed GEMMs read the MXFP8 fake quant of x and of
    the activation with that codec profile (qat.fake_quant_rows_mxfp8, what a W4A8 engine feeds its experts), the
    LoRA projections the unquantized rows (as mxfp4_train.grouped's reference); the backward passes through the
    fake quant unchanged (straight-through)."""

    @staticmethod
    def forward(ctx, x, offsets, w13_codes, w13_scales, w2_codes, w2_scales, lora13_a, lora13_b, lora2_a,
                lora2_b, scaling, activation, bias13, bias2, gate_up="halves", limit=None, act_profile=None):
        from .qat import fake_quant_rows_mxfp8

        a13, b13, a2, b2 = (_bf16(t) for t in (lora13_a, lora13_b, lora2_a, lora2_b))
        if (a13 is None) != (b13 is None) or (a2 is None) != (b2 is None):
            raise ValueError("MXFP4GroupedMLP: give both LoRA factors (A and B) of a projection, or neither")
        aprof = None if act_profile is None else get_profile(act_profile)
        hs13 = _down(x, offsets, a13, scaling)
        xq = x if aprof is None else fake_quant_rows_mxfp8(x, aprof, "expert input activations")
        act, pre = grouped_mm_mxfp4_gated(xq, offsets, w13_codes, w13_scales, activation=activation, bias=bias13,
                                          lora=None if a13 is None else (hs13, b13), save_pre=True,
                                          gate_up=gate_up, limit=limit)
        hs2 = _down(act, offsets, a2, scaling)
        aq = act if aprof is None else fake_quant_rows_mxfp8(act, aprof, "expert down-projection activations")
        y = grouped_mm_mxfp4(aq, offsets, w2_codes, w2_scales, bias=bias2,
                             lora=None if a2 is None else (hs2, b2))
        ctx.save_for_backward(x, offsets, w13_codes, w13_scales, w2_codes, w2_scales, pre, act, hs13, hs2,
                              a13, b13, a2, b2)
        ctx.meta = (scaling, activation, gate_up, limit, [t.dtype if t is not None else None
                                                   for t in (lora13_a, lora13_b, lora2_a, lora2_b)])
        return y

    @staticmethod
    def backward(ctx, dy):
        x, offsets, c13, s13, c2, s2, pre, act, hs13, hs2, a13, b13, a2, b2 = ctx.saved_tensors
        scaling, activation, gate_up, limit, dtypes = ctx.meta
        dy = dy.to(torch.bfloat16).contiguous()
        grads = [None, None, None, None]  # each written once, in its master's dtype
        lora2 = None
        if a2 is not None:
            grads[3] = L.grouped_wgrad(dy, hs2, offsets, dtypes[3])                # dB2_e = dy_e^T (s a_e A2_e^T)
            dh2 = L.project(dy, offsets, b2.transpose(1, 2), scaling)              # s dy_e B2_e
            grads[2] = L.grouped_wgrad(dh2, act, offsets, dtypes[2])               # dA2_e = dh2_e^T a_e
            lora2 = (dh2, a2)
        dpre = grouped_mm_mxfp4_dx(dy, offsets, c2, s2, lora=lora2, pre=pre, activation=activation,
                                   gate_up=gate_up, limit=limit)
        lora13 = None
        if a13 is not None:
            grads[1] = L.grouped_wgrad(dpre, hs13, offsets, dtypes[1])
            dh13 = L.project(dpre, offsets, b13.transpose(1, 2), scaling)
            grads[0] = L.grouped_wgrad(dh13, x, offsets, dtypes[0])
            lora13 = (dh13, a13)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = grouped_mm_mxfp4_dx(dpre, offsets, c13, s13, lora=lora13)
        return (dx, None, None, None, None, None, *grads, None, None, None, None, None, None, None)


def moe_mlp_forward(x: torch.Tensor, offsets: torch.Tensor, w13: Packed, w2: Packed, *, activation: str,
                    bias13: torch.Tensor | None = None, bias2: torch.Tensor | None = None,
                    max_scale_byte: int | None = None, limit: float | None = None) -> torch.Tensor:
    """Inference forward of the expert MLP on sorted rows (no LoRA, nothing saved): the engine's grouped path.
    The intermediate activation passes between the GEMMs in the K order the down GEMM reduces in (interleave.py).
    limit: silu_clamp's (ops.grouped_mm_mxfp4_gated)."""
    order = reduction_order(w2[0], x.shape[0])
    act, _ = grouped_mm_mxfp4_gated(x, offsets, *w13, activation=activation, bias=bias13, out_order=order,
                                    max_scale_byte=max_scale_byte, limit=limit)
    return grouped_mm_mxfp4(act, offsets, *w2, bias=bias2, x_order=order, max_scale_byte=max_scale_byte)


# K chunks of the engine layer's rank-R projections (lora.project's split_k): at decode sizes a few dozen row tiles
# each walked K alone; split in 4, the layer with r=16 adapters took 0.203 instead of 0.207 ms at 16 tokens on an
# H100 (bench/RESULTS.md, seventh round). The learner's projections stay whole (split_k=1).
LORA_SPLIT_K = 4

# Up to this rows-per-expert bucket the engine layer computes the A2 projection in the gated GEMM's epilogue
# (grouped_mm_mxfp4_gated(project=...)): one launch and one read of the activation fewer, for fp32 partials of
# every output tile. 0 (the default) keeps it a separate lora.project, split as above: fused up to 64 rows, the
# layer with r=16 adapters took 0.1972 / 0.2458 ms at 16 / 128 tokens against 0.1949 / 0.2339 apart on an H100
# (bench/RESULTS.md, eighth round): the partials' stores and the fix-up cost the gated GEMM more than the launch.
LORA_FUSE_A2_MAX_BUCKET = 0


def _fused_a2(a2: torch.Tensor, b2: torch.Tensor, order: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A2 [E, Rp, I] bf16 in `order`, B2 [E, H, Rp] bf16) with the rank padded by zeros to configs.padded_rank
    (the engine's kernel copies already are: no copy then)."""
    r = a2.shape[1]
    rp = padded_rank(r)
    a2, b2 = L.factor_in_order(a2, order).to(torch.bfloat16), b2.to(torch.bfloat16)
    if rp != r:
        a2 = torch.nn.functional.pad(a2, (0, 0, 0, rp - r))
        b2 = torch.nn.functional.pad(b2, (0, rp - r))
    return a2.contiguous(), b2.contiguous()


def moe_layer_forward(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: Packed,
                      w2: Packed, *, activation: str, bias13: torch.Tensor | None = None,
                      bias2: torch.Tensor | None = None, max_scale_byte: int | None = None,
                      lora: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float] | None = None,
                      limit: float | None = None, act_quant: str | None = None) -> torch.Tensor:
    """x [T, H] with its router's choice (topk_ids [T, k], topk_weights [T, k]) -> routed-expert output [T, H].

    The permutation into expert order is fused into the first GEMM's loads and the weighted un-permutation into
    the second GEMM's epilogue (each (token, slot) row lands in its own row, times its router weight); the k rows
    of a token are then summed in fp32, in slot order (combine.sum_slots). max_scale_byte: see grouped_mm_mxfp4.
    lora = (A13 [E, R, H], B13 [E, 2I, R], A2 [E, R, I], B2 [E, H, R], scaling): the engine's unmerged expert
    adapters, computed with the learner's kernels (the rank-R projections of MXFP4GroupedMLP, its B terms fused
    into the GEMMs' epilogues): two launches more than without, one up to LORA_FUSE_A2_MAX_BUCKET rows per expert
    (the A2 projection in the gated GEMM's epilogue). Give the factors in bf16, contiguous, with R a power of two
    >= 16 (mxfp4_serve.expert_lora keeps such copies): other factors are converted on every call, to the same bits
    (torch's round to nearest, zero rank columns). The A13 projection gathers the token rows as the gated GEMM
    does; the A2 projection reads the activation in the down GEMM's K order with A2's columns in that order
    (lora.factor_in_order; the natural order, no copy, for kb-major codes). limit: the clamp limit of
    activation "silu_clamp" (DeepSeek-V4's swiglu_limit, from the model's config).
    act_quant (a codec profile: W4A8 emulation) feeds both packed GEMMs the MXFP8 fake quant of their input with
    that profile (common.fake_quant_mxfp8, nonfinite="profile": no host read, CUDA-graph safe), the LoRA
    projections the unquantized rows, as the learner's MXFP4GroupedMLP(act_profile=) does; the fused kernels then
    run at every batch size (the dense prefill path takes bf16 inputs only).
    At prefill sizes (dense.use_dense: rows per expert, envs.HOPPER_PREFILL) the layer runs dense.py's path instead:
    the same weight values through a bounded bf16 scratch and cuBLAS's grouped GEMM."""
    t, k = topk_ids.shape
    from . import dense  # the prefill sizes' path: bf16 scratch + cuBLAS (dense.py)

    if act_quant is None and dense.use_dense(t * k, w13[0].shape[0], x.device, (w13, w2)):
        return dense.moe_layer_forward_dense(x, topk_ids, topk_weights, w13, w2, activation=activation, bias13=bias13,
                                             bias2=bias2, lora=lora, limit=limit)
    routing = route(topk_ids, w13[0].shape[0])
    rows = topk_weights.reshape(-1).float()
    order = reduction_order(w2[0], t * k)  # the intermediate activation in the down GEMM's K order
    lora13 = lora2 = None
    if lora is not None:
        a13, b13, a2, b2, scaling = lora
        # the A13 projection gathers the sorted rows itself, as the gated GEMM does (no copy of the tokens)
        lora13 = (L.project(x, routing.offsets, a13, scaling, gather_rows=routing.token, split_k=LORA_SPLIT_K),
                  _bf16(b13))
    fuse = lora is not None and 0 < rows_bucket(t * k, w13[0].shape[0]) <= LORA_FUSE_A2_MAX_BUCKET
    project = None
    if fuse:
        a2, b2 = _fused_a2(a2, b2, order)
        project = (a2, scaling)
    # the gated GEMM gathers its rows from the (fake-quantized) tokens; the fake quant works per 32-block of a row,
    # so quantizing the tokens equals quantizing the gathered rows
    xq = x if act_quant is None else _fake_quant(x, act_quant, "moe expert inputs")
    act, _, *h2 = grouped_mm_mxfp4_gated(xq, routing.offsets, *w13, activation=activation, bias=bias13,
                                         lora=lora13, gather_rows=routing.token, out_order=order,
                                         max_scale_byte=max_scale_byte, limit=limit, project=project)
    if fuse:
        lora2 = (h2[0], b2)
    elif lora is not None:
        # act's columns are in `order`: A2's are put in the same one (the same sum, in another order)
        lora2 = (L.project(act, routing.offsets, L.factor_in_order(a2, order), scaling, split_k=LORA_SPLIT_K),
                 _bf16(b2))
    # act's columns may be in the down GEMM's K order: a permutation inside each 32-block, which the block-wise
    # fake quant commutes with
    aq = act if act_quant is None else _fake_quant(act, act_quant, "moe down-projection inputs")
    y = grouped_mm_mxfp4(aq, routing.offsets, *w2, bias=bias2, lora=lora2, scatter_rows=routing.source,
                         row_weights=rows, x_order=order, max_scale_byte=max_scale_byte)
    return sum_slots(y, k, x.dtype)


def _fake_quant(t: torch.Tensor, profile: str, name: str) -> torch.Tensor:
    """The engine's W4A8 emulation of one GEMM input: the codec's MXFP8 round trip, the profile's NaN/Inf rule."""
    from ..api import fake_quant_mxfp8

    return fake_quant_mxfp8(t, profile=profile, name=name, nonfinite="profile")

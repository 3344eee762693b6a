"""common.grouped_gemm.dense: the engine MoE layer at prefill sizes (packed experts -> bf16 scratch -> cuBLAS
grouped GEMM) and its three kernels: the expert dequant, the gated activation on rows, the weighted un-permute.

On CPU the kernels run under TRITON_INTERPRET=1 and torch._grouped_mm runs its CPU kernel; with CUDA all natively.
Bounds (as tests/common/test_grouped_gemm.py): the layer's output passes through bf16 three times (the
pre-activation, the activation, the down GEMM's output) before the fp32 combine and the final rounding; each is a
relative 2^-8 (2^-7 where the interpreter's cast truncates), so LAYER_BOUND = 4 * 2^-7 covers the compounding with
room for the fp32 sums' order (~1e-4).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import common  # noqa: E402
from common import envs  # noqa: E402
from common.errors import DTypeError, ShapeError  # noqa: E402
from common.grouped_gemm import activations as A  # noqa: E402
from common.grouped_gemm import dense  # noqa: E402
from common.grouped_gemm.combine import combine_rows  # noqa: E402
from common.grouped_gemm.layout import to_kb_major  # noqa: E402
from common.grouped_gemm.mlp import moe_layer_forward  # noqa: E402
from common.grouped_gemm.routing import route  # noqa: E402
from common.kernels import interpreting  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
LAYER_BOUND = 4 * 2.0**-7


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))


def _same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal bit patterns (the sign of zero included); NaN where the reference has NaN, any payload."""
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    ints = {torch.bfloat16: torch.int16, torch.float32: torch.int32}[want.dtype]
    assert torch.equal(got.view(ints)[~nan], want.view(ints)[~nan])


def _same_bits_or_flushed(got: torch.Tensor, want: torch.Tensor) -> None:
    """_same_bits; under the interpreter only, a subnormal value (|w| < 2^-126, scale bytes 0 and 1) may come out
    truncated toward zero (same sign, smaller magnitude, zero included): its fp32 -> bf16 cast truncates and loses
    subnormal bits (measured), as the fused GEMMs' bits decode there (test_grouped_gemm.py::test_subnormal_scales).
    Natively every value must be exact."""
    tiny = (want.float().abs() > 0) & (want.float().abs() < 2.0**-126)
    if interpreting():
        g, w = got.float(), want.float()
        ok = tiny & (g.abs() <= w.abs()) & ((g == 0) | (g.sign() == w.sign()))
        got = torch.where(ok, want, got)
    _same_bits(got, want)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("k", [96, 512])
@pytest.mark.parametrize("kb_major", [False, True])
def test_dequantize_experts_equals_the_codec(k, kb_major):
    """Every code byte in both nibble positions and every scale byte 0..255 (subnormal results from bytes 0-1,
    infinities where 6 * 2^127 overflows bf16, NaN for a block of byte 255, which the codec itself refuses):
    common.dequantize's bf16 values bit for bit, from
    canonical and kb-major codes, for a slice of the experts, into a caller's buffer. K = 96 leaves a partial K tile
    (masked), 512 two full ones; N = 40 a partial row tile."""
    e, n = 3, 40
    g = _gen()
    codes = torch.randint(0, 256, (e, n, k // 2), dtype=torch.uint8, generator=g)
    codes.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
    scales = torch.randint(0, 256, (e, n, k // 32), dtype=torch.uint8, generator=g)
    scales.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
    # the codec refuses NaN scales (byte 255); the kernels' decode turns the whole block into NaN, as the GEMMs do
    nan_block = scales == 255
    want = common.dequantize((codes, torch.where(nan_block, 127, scales)), torch.bfloat16)
    want[nan_block.repeat_interleave(32, -1)] = float("nan")
    assert ((want.float().abs() > 0) & (want.float().abs() < 2.0**-126)).any()  # subnormal weights are in the case
    src = to_kb_major(codes) if kb_major else codes
    src, sc = src.to(DEVICE), scales.to(DEVICE)
    _same_bits_or_flushed(dense.dequantize_experts(src, sc).cpu(), want)
    buf = torch.full((2 * n * k + 7,), 3.0, dtype=torch.bfloat16, device=DEVICE)
    part = dense.dequantize_experts(src, sc, slice(1, 3), out=buf)
    assert part.shape == (2, n, k) and part.data_ptr() == buf.data_ptr()
    _same_bits_or_flushed(part.cpu(), want[1:3])
    assert torch.equal(buf[-7:].cpu(), torch.full((7,), 3.0, dtype=torch.bfloat16))  # nothing past the slice
    assert dense.dequantize_experts(src, sc, slice(2, 2)).shape == (0, n, k)


def test_dequantize_experts_errors():
    q = common.quantize(torch.randn(2, 8, 64), profile="flashinfer")
    codes, scales = q.codes.to(DEVICE), q.scales.to(DEVICE)
    with pytest.raises(ShapeError, match=r"tensor 'out': expected a contiguous bf16 buffer of >= 1024 elements, got "
                                         r"torch.float32"):
        dense.dequantize_experts(codes, scales, out=torch.empty(1024, device=DEVICE))
    with pytest.raises(ShapeError, match=r"tensor 'out'.*got torch.bfloat16 \(100,\)"):
        dense.dequantize_experts(codes, scales, out=torch.empty(100, dtype=torch.bfloat16, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous slice"):
        dense.dequantize_experts(codes, scales, slice(0, 2, 2))
    with pytest.raises(ShapeError, match="tensor 'weight'"):
        dense.dequantize_experts(codes, scales[:, :, :1])


@pytest.mark.parametrize("activation,limit", [("silu", None), ("silu_clamp", 7.0), ("swiglu_oai", None)])
def test_gated_rows_is_the_epilogue_activation(activation, limit):
    """act = activation(pre + bias[expert of row]) in fp32, rounded once to bf16: against activations.py's torch
    formulas in fp32 on the same bf16 inputs. The two fp32 computations differ by a few fp32 ulps (sigmoid's
    implementation), so after the rounding to bf16 they agree within one bf16 ulp (2^-7 relative, 2^-8 where the
    cast rounds to nearest): asserted per element, with values beyond the clamp limits, zeros and ties of
    the clamp included."""
    g = _gen()
    m, i, e = 21, 300, 3  # I past one column block, M past one row block
    pre = (torch.randn(m, 2 * i, generator=g) * 4).to(torch.bfloat16)
    pre[0, :4] = torch.tensor([0.0, -0.0, 7.0, -7.0])
    pre[1, i:i + 4] = torch.tensor([7.0, -7.0, 9.0, -9.0])
    bias = (torch.randn(e, 2 * i, generator=g)).to(torch.bfloat16)
    rexp = torch.randint(0, e, (m,), generator=g)
    got = dense.gated_rows(pre.to(DEVICE), activation, limit=limit, bias=bias.to(DEVICE), row_experts=rexp.to(DEVICE))
    full = pre.float() + bias.float()[rexp]
    want = A.gated(full, activation, limit=limit).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == (m, i)
    diff = (got.cpu().float() - want.float()).abs()
    assert (diff <= want.float().abs() * 2.0**-7 + 1e-30).all(), diff.max()
    plain = dense.gated_rows(pre.to(DEVICE), activation, limit=limit).cpu()
    assert (plain.float() - A.gated(pre.float(), activation, limit=limit)).abs().max() <= \
        A.gated(pre.float(), activation, limit=limit).abs().max() * 2.0**-7
    with pytest.raises(ValueError, match="bias and row_experts together"):
        dense.gated_rows(pre.to(DEVICE), activation, limit=limit, bias=bias.to(DEVICE))
    with pytest.raises(ShapeError, match=r"tensor 'pre': expected \[M, 2I\]"):
        dense.gated_rows(pre[:, :5].to(DEVICE), activation, limit=limit)


def test_combine_rows_is_the_slot_order_weighted_sum():
    """out[t] = sum over slots j, in order, of w[t, j] * (y[inverse[t*k+j]] + bias[id[t, j]]): fp32, each product
    rounded before it is added (no FMA: the kernel is compiled without fp fusion), one rounding to the output dtype.
    Bit for bit in fp32 against that loop, with infinities, NaN, -0 and zero weights among the values."""
    g = _gen()
    t, k, e, h = 6, 3, 4, 1100
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    rt = route(ids, e)
    y = (torch.randn(t * k, h, generator=g) * 3).to(torch.bfloat16)
    y[0, :4] = torch.tensor([float("inf"), float("nan"), -0.0, 2**-120])
    w = torch.rand(t, k, generator=g)
    w[2, 1] = 0.0
    bias = torch.randn(e, h, generator=g).to(torch.bfloat16)
    for b in (None, bias):
        acc = torch.zeros(t, h)
        for j in range(k):
            v = y.float()[rt.inverse.view(t, k)[:, j]]
            if b is not None:
                v = v + b.float()[ids[:, j]]
            acc = acc + w[:, j:j + 1] * v
        got = combine_rows(y.to(DEVICE), rt.inverse.to(DEVICE), w.to(DEVICE), torch.float32,
                           bias=None if b is None else b.to(DEVICE), expert_ids=None if b is None else ids.to(DEVICE))
        _same_bits(got.cpu(), acc)
    with pytest.raises(DTypeError, match=r"tensor 'weights': expected the router's float32 \[T, k\]"):
        combine_rows(y.to(DEVICE), rt.inverse.to(DEVICE), w.double().to(DEVICE))
    with pytest.raises(ShapeError, match=r"tensor 'y_sorted': expected \[T \* k = 18, H\]"):
        combine_rows(y[:5].to(DEVICE), rt.inverse.to(DEVICE), w.to(DEVICE))
    with pytest.raises(ValueError, match="bias and expert_ids together"):
        combine_rows(y.to(DEVICE), rt.inverse.to(DEVICE), w.to(DEVICE), bias=bias.to(DEVICE))


def _layer_case(e: int, h: int, i: int, t: int, k: int, g: torch.Generator, kb_major: bool, bias: bool, r: int):
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    ids[ids == e - 2] = e - 1  # expert e-2 gets no rows: an empty group inside the batch
    weights = torch.softmax(torch.randn(t, k, generator=g), -1)
    x = torch.randn(t, h, generator=g).to(torch.bfloat16)
    q13 = common.quantize(torch.randn(e, 2 * i, h, generator=g) * 0.15, profile="flashinfer")
    q2 = common.quantize(torch.randn(e, h, i, generator=g) * 0.2, profile="flashinfer")
    conv = to_kb_major if kb_major else (lambda c: c)
    w13 = (conv(q13.codes).to(DEVICE), q13.scales.to(DEVICE))
    w2 = (conv(q2.codes).to(DEVICE), q2.scales.to(DEVICE))
    b13 = (torch.randn(e, 2 * i, generator=g) * 0.1).to(torch.bfloat16) if bias else None
    b2 = (torch.randn(e, h, generator=g) * 0.1).to(torch.bfloat16) if bias else None
    lora = None
    if r:
        lora = tuple((torch.randn(*s, generator=g) * 0.05).to(torch.bfloat16).to(DEVICE)
                     for s in ((e, r, h), (e, 2 * i, r), (e, r, i), (e, h, r))) + (0.5,)
    ref_w = (common.dequantize((q13.codes, q13.scales), torch.float32),
             common.dequantize((q2.codes, q2.scales), torch.float32))
    return ids, weights, x, w13, w2, b13, b2, lora, ref_w


def _reference(x, ids, weights, ref_w, b13, b2, lora, activation, limit):
    """fp32 loop over (token, slot): the layer's definition."""
    w13, w2 = ref_w
    t, k = ids.shape
    out = torch.zeros(t, x.shape[1])
    for tok in range(t):
        for j in range(k):
            ex = int(ids[tok, j])
            pre = x[tok].float() @ w13[ex].T
            if b13 is not None:
                pre = pre + b13[ex].float()
            if lora is not None:
                a13, bb13, _, _, s = lora
                pre = pre + s * (x[tok].float() @ a13[ex].cpu().float().T) @ bb13[ex].cpu().float().T
            act = A.gated(pre[None], activation, limit=limit)[0]
            y = act @ w2[ex].T
            if b2 is not None:
                y = y + b2[ex].float()
            if lora is not None:
                _, _, a2, bb2, s = lora
                y = y + s * (act @ a2[ex].cpu().float().T) @ bb2[ex].cpu().float().T
            out[tok] += float(weights[tok, j]) * y
    return out


@pytest.mark.parametrize("kb_major,bias,rank,activation,limit", [
    (True, False, 0, "silu", None),
    (True, False, 16, "silu_clamp", 6.0),
    (False, True, 0, "swiglu_oai", None),
])
def test_dense_layer_matches_the_reference_and_the_fused_layer(kb_major, bias, rank, activation, limit,
                                                               monkeypatch):
    """moe_layer_forward with MXFP4_RL_HOPPER_PREFILL=dense against the fp32 definition (LAYER_BOUND) and against
    the fused kernels' layer on the same bytes (the two paths differ only in rounding order: 2 * LAYER_BOUND); in
    chunks of experts (a scratch budget of one expert, one of two) the same as in one chunk. Kb-major and canonical
    codes, gpt-oss biases, DeepSeek-V4's clamp, unmerged LoRA, and an expert without rows."""
    g = _gen()
    e, h, i, t, k = 4, 64, 64, 11, 2
    ids, weights, x, w13, w2, b13, b2, lora, ref_w = _layer_case(e, h, i, t, k, g, kb_major, bias, rank)
    ref = _reference(x, ids, weights, ref_w, b13, b2, lora, activation, limit)
    kw = dict(activation=activation, limit=limit, lora=lora, bias13=None if b13 is None else b13.to(DEVICE),
              bias2=None if b2 is None else b2.to(DEVICE))
    args = (x.to(DEVICE), ids.to(DEVICE), weights.to(DEVICE), w13, w2)
    monkeypatch.setenv(envs.HOPPER_PREFILL.name, "dense")
    got = moe_layer_forward(*args, **kw).cpu()
    assert got.dtype == torch.bfloat16 and got.shape == (t, h)
    assert _rel(got, ref) < LAYER_BOUND
    per_expert = (2 * i * h + h * i) * 2
    for budget in (per_expert, 2 * per_expert):
        chunked = dense.moe_layer_forward_dense(*args, **kw, scratch_bytes=budget).cpu()
        if DEVICE == "cpu":  # the same per-group products in the same order; cuBLAS may pick other tiles per call
            assert torch.equal(chunked.view(torch.int16), got.view(torch.int16))
        else:
            assert _rel(chunked, ref) < LAYER_BOUND
    monkeypatch.setenv(envs.HOPPER_PREFILL.name, "fused")
    fused = moe_layer_forward(*args, **kw).cpu()
    assert _rel(got, fused) < 2 * LAYER_BOUND and not torch.equal(got, torch.zeros_like(got))


def test_use_dense_modes_and_chunks(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for_auto = dense.AUTO_MIN_ROWS_PER_EXPERT * 32
    monkeypatch.setenv(envs.HOPPER_PREFILL.name, "fused")
    assert not dense.use_dense(10**6, 32, cuda)
    monkeypatch.setenv(envs.HOPPER_PREFILL.name, "auto")
    if not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        assert dense.use_dense(for_auto, 32, cuda) and not dense.use_dense(for_auto - 1, 32, cuda)
    assert not dense.use_dense(10**6, 32, cpu)  # auto is measured on GPUs only
    monkeypatch.setenv(envs.HOPPER_PREFILL.name, "dense")
    assert dense.use_dense(1, 32, cpu) == interpreting()
    monkeypatch.setenv(envs.HOPPER_PREFILL.name, "sometimes")
    with pytest.raises(ValueError, match="MXFP4_RL_HOPPER_PREFILL must be one of"):
        dense.use_dense(1, 32, cuda)
    assert dense.expert_chunks(5, 10, 25) == [(0, 2), (2, 4), (4, 5)]
    assert dense.expert_chunks(3, 10, 5) == [(0, 1), (1, 2), (2, 3)]  # at least one expert per chunk
    assert dense.expert_chunks(3, 10, 10**9) == [(0, 3)]
    monkeypatch.setenv(envs.PREFILL_SCRATCH_MB.name, "lots")
    with pytest.raises(ValueError, match="MXFP4_RL_PREFILL_SCRATCH_MB must be a whole number of MiB, got 'lots'"):
        dense.scratch_budget_bytes()
    monkeypatch.setenv(envs.PREFILL_SCRATCH_MB.name, "3")
    assert dense.scratch_budget_bytes() == 3 << 20

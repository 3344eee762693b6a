"""Grouped MXFP4 GEMM kernels (common.grouped_gemm) == their pure-torch twins (common.grouped_gemm.reference).

On CPU the kernels run under TRITON_INTERPRET=1 (set before triton is imported); with CUDA they run natively.
Bounds (relative L2 error, ||out - ref|| / ||ref||), all against fp32 references built from the same bf16 inputs
and the exact dequantized weights:
- fp32 outputs: every product of a bf16 activation and a dequantized weight is exact in fp32, so only the order
  of the fp32 sums differs: |error| <= K * 2^-24 * sum|x||w| per element, and sum|x||w| ~ sqrt(K) * |sum x w| for
  random signs: 160 * 6e-8 * 13 ~ 1.2e-4 worst case; FP32_BOUND = 2e-4.
- bf16 outputs: one rounding to bf16 on top, <= 2^-7 relative per element (2^-8 with round-to-nearest on GPUs;
  the interpreter's cast truncates): BF16_BOUND = 2^-7 + 2e-4.
- the autograd MLP stores pre, act, d pre and the LoRA projections in bf16 between GEMMs: up to four such
  roundings compound along a gradient path: MLP_BOUND = 4 * 2^-7 ~ 3.1e-2 (measured ~1e-2 on CPU, ~6e-3 on H100).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import common  # noqa: E402
from common import e2m1  # noqa: E402
from common.errors import DTypeError, ShapeError  # noqa: E402
from common.grouped_gemm import (  # noqa: E402
    MXFP4GroupedMLP,
    TileConfig,
    grouped_mm_mxfp4,
    grouped_mm_mxfp4_dx,
    grouped_mm_mxfp4_gated,
    moe_layer_forward,
    permute,
    route,
    unpermute,
)
from common.grouped_gemm import configs as C  # noqa: E402
from common.grouped_gemm import ops  # noqa: E402
from common.grouped_gemm.interleave import deinterleave_k, interleave_k, reorder_k  # noqa: E402
from common.grouped_gemm.layout import (  # noqa: E402
    DECODE_MASK, PAIR3_MASK, PAIR3_MULTIPLIER, PAIR_ROTATE, SLOT_BITS, convert_in_place, from_kb_major,
    is_kb_major, kb_major_view, to_kb_major,
)
from common.grouped_gemm import reference as R  # noqa: E402
from common.kernels import interpreting  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
FP32_BOUND = 2e-4
BF16_BOUND = 2.0**-7 + 2e-4
MLP_BOUND = 4 * 2.0**-7
# The interpreter runs one program at a time (~5 ms each): tiles of 16 rows x 32 columns keep every test at a
# few dozen programs; both MMA orientations are exercised.
CONFIGS = [TileConfig(16, 32, 64, swap_ab=False), TileConfig(16, 32, 64, swap_ab=True)]
CFG_IDS = ["ab", "swap_ab"]
# rows per expert: an empty expert, a single token, uneven groups (a partial and a full row tile)
COUNTS = [3, 0, 1, 17, 5]

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _offsets(counts: list[int]) -> torch.Tensor:
    o = torch.zeros(len(counts) + 1, dtype=torch.int32)
    o[1:] = torch.tensor(counts).cumsum(0)
    return o.to(DEVICE)


def _packed(e: int, n: int, k: int, seed: int, std: float = 1.0) -> common.MXFP4Tensor:
    w = torch.randn(e, n, k, generator=_gen(seed)) * std
    return common.quantize(w, profile="flashinfer").to(DEVICE)


def _bf16(*shape: int, seed: int, std: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=_gen(seed)) * std).to(torch.bfloat16).to(DEVICE)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _all_bytes_weight(e: int, n: int, k: int, scale_bytes: tuple[int, ...] = (2, 3, 4, 100, 126, 127, 128, 129, 200,
                                                                             250)) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed weights holding every code byte (all 16 nibbles in both positions) and, cycling, the scale bytes.
    The default runs from 2^-125 (byte 2: the smallest whose values 0.5 * scale are all fp32 normals) up to 2^123
    (byte 250, so 6 * scale stays finite). Bytes 0 and 1 give subnormal weights (|w| < 2^-126), which the MMA may
    flush to zero (numpy in the interpreter does, as tensor cores may): their own test below."""
    codes = (torch.arange(e * n * k // 2) % 256).to(torch.uint8).view(e, n, k // 2)
    sc = torch.tensor(scale_bytes, dtype=torch.uint8)
    scales = sc[torch.arange(e * n * k // 32) % sc.numel()].view(e, n, k // 32)
    return codes.to(DEVICE), scales.to(DEVICE)


def _use_decode(decode: str, monkeypatch) -> None:
    """Run the GEMMs with this weight decode, which ops.decode_mode picks by device: "bits" everywhere (as on a GPU
    older than sm_90), "bf16x2" where it is the device's own (natively on sm_90+; inline PTX, which the
    interpreter cannot run)."""
    if decode == "bf16x2" and ops.decode_mode() != "bf16x2":
        pytest.skip("the bf16x2 decode is sm_90 inline PTX; the interpreter (and older GPUs) run the bits decode")
    monkeypatch.setattr(ops, "_bf16x2_capable", lambda: decode == "bf16x2")


def _use_words(words: str, monkeypatch) -> None:
    """words "1": the forward GEMMs' word decode, which explicit configs and the interpreter get; "0": their byte
    decode on canonical codes, which the op picks itself only above WORDS_MAX_BUCKET rows per expert on a GPU."""
    if words == "0":
        auto = ops._use_words
        monkeypatch.setattr(ops, "_use_words", lambda codes, *a, **kw: is_kb_major(codes) and auto(codes, *a, **kw))


@pytest.mark.parametrize("words", ["1", "0"], ids=["words", "bytes"])
@pytest.mark.parametrize("decode", ["bits", "bf16x2"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
def test_in_kernel_dequant_is_exact(cfg, decode, words, monkeypatch):
    """One-hot activation rows pick single weight rows/columns: with fp32 output the kernels must reproduce
    common.dequantize bit for bit (a one-term fp32 sum is exact), for every code byte and extreme scales, with
    the forward's word decode (interleaved K order: the one-hot rows are interleaved too) and its byte decode.
    bf16x2 is inline PTX: it runs natively only (under the interpreter it falls back to bits)."""
    _use_decode(decode, monkeypatch)
    _use_words(words, monkeypatch)
    e, n, k = 2, 32, 128
    codes, scales = _all_bytes_weight(e, n, k)
    w = common.dequantize((codes, scales), torch.float32)
    offs = _offsets([k, k])
    eye = torch.eye(k, dtype=torch.bfloat16, device=DEVICE).repeat(e, 1)
    y = grouped_mm_mxfp4(eye, offs, codes, scales, out_dtype=torch.float32, config=cfg)
    assert torch.equal(y.view(e, k, n), w.transpose(1, 2))
    offs_n = _offsets([n, n])
    eye_n = torch.eye(n, dtype=torch.bfloat16, device=DEVICE).repeat(e, 1)
    dx = grouped_mm_mxfp4_dx(eye_n, offs_n, codes, scales, out_dtype=torch.float32, config=cfg)
    assert torch.equal(dx.view(e, n, k), w)


@pytest.mark.parametrize("bound", [128, 250])
def test_one_mul_word_decode_is_exact(bound):
    """max_scale_byte <= 128 lets the bf16x2 word decode fold 2^126 into the scale (one multiply): still exact for
    every code byte and scale bytes 0..128 (subnormal weights included, as the two-multiply decode); a bound above
    128 keeps two multiplies, exact up to byte 250. Inline PTX: native GPUs only."""
    if interpreting() or not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the bf16x2 word decode is sm_90 inline PTX")
    e, n, k = 2, 64, 128
    scale_bytes = (0, 1, 2, 60, 126, 127, 128) if bound == 128 else (2, 127, 128, 129, 200, 250)
    codes, scales = _all_bytes_weight(e, n, k, scale_bytes)
    w = common.dequantize((codes, scales), torch.float32)
    eye = torch.eye(k, dtype=torch.bfloat16, device=DEVICE).repeat(e, 1)
    for cfg in (TileConfig(16, 64, 128, swap_ab=True), TileConfig(64, 64, 64)):
        y = grouped_mm_mxfp4(eye, _offsets([k, k]), codes, scales, out_dtype=torch.float32, config=cfg,
                             max_scale_byte=bound)
        assert torch.equal(y.view(e, k, n), w.transpose(1, 2)), cfg


def test_interleave_k_order_and_inverse():
    """Column 32b + 8i + 2t + h of the interleaved order holds stored column 32b + 8t + i + 4h (word t, nibble
    i + 4h of block b: what the word decode feeds that reduction slot); deinterleave_k undoes it."""
    x = torch.arange(3 * 96).view(3, 96)
    y = interleave_k(x)
    b, i, t, h = torch.meshgrid(torch.arange(3), torch.arange(4), torch.arange(4), torch.arange(2), indexing="ij")
    assert torch.equal(y[0], (32 * b + 8 * t + i + 4 * h).flatten())
    assert torch.equal(deinterleave_k(y), x)
    with pytest.raises(ShapeError, match="multiple of 32"):
        interleave_k(torch.zeros(2, 48))
    q = _packed(1, 2 * 48, 64, seed=6)  # an intermediate of 48 columns cannot be interleaved
    with pytest.raises(ShapeError, match="out_order='interleaved' needs an output width that is a multiple of 32, "
                                         "got 48"):
        grouped_mm_mxfp4_gated(_bf16(3, 64, seed=7), _offsets([3]), q.codes, q.scales, activation="silu",
                               out_order="interleaved")
    with pytest.raises(ValueError, match=r"x_order must be one of \('natural', 'interleaved', 'deinterleaved'\), "
                                         "got 'shuffled'"):
        grouped_mm_mxfp4(_bf16(3, 64, seed=7), _offsets([3]), q.codes[:, :48], q.scales[:, :48], x_order="shuffled")
    assert torch.equal(reorder_k(interleave_k(x), "interleaved", "deinterleaved"), deinterleave_k(x))
    assert reorder_k(x, "natural", "natural") is x


@pytest.mark.parametrize("cfg", [None, TileConfig(16, 16, 64)], ids=["fixed", "n16"])
@pytest.mark.parametrize("order", ["interleaved", "deinterleaved"])
@pytest.mark.parametrize("words", ["1", "0"], ids=["words", "bytes"])
def test_ordered_inputs_and_outputs(words, order, cfg, monkeypatch):
    """x_order / out_order are layouts, not approximations: whichever decode runs, a reordered input gives the
    natural input's output bit for bit, and the gated GEMM's reordered output is its natural output reordered
    (32-column tiles reorder it in registers, 16-column tiles store each column to its place)."""
    _use_words(words, monkeypatch)
    e, n, k = 2, 64, 96
    counts = [5, 11]
    q13, q2 = _packed(e, 2 * n, k, seed=3), _packed(e, k, n, seed=4)
    offs = _offsets(counts)
    x = _bf16(sum(counts), k, seed=5)
    act, _ = grouped_mm_mxfp4_gated(x, offs, q13.codes, q13.scales, activation="silu", config=cfg)
    act_o, _ = grouped_mm_mxfp4_gated(reorder_k(x, "natural", order), offs, q13.codes, q13.scales,
                                      activation="silu", out_order=order, x_order=order, config=cfg)
    assert torch.equal(act_o, reorder_k(act, "natural", order))
    y = grouped_mm_mxfp4(act, offs, q2.codes, q2.scales, out_dtype=torch.float32, config=cfg)
    y_o = grouped_mm_mxfp4(act_o, offs, q2.codes, q2.scales, out_dtype=torch.float32, x_order=order, config=cfg)
    assert torch.equal(y_o, y)


@pytest.mark.parametrize("decode", ["bits", "bf16x2"])
def test_subnormal_scales(decode, monkeypatch):
    """E8M0 bytes 0 and 1 scale a block by 2^-127 / 2^-126 (OCP MX v1.0; torchao and Triton's own interpreter
    agree), so some of those weights are bf16 subnormals. The bf16x2 decode keeps them exactly (an H100's MMA did
    not flush them either); the fp32 bits decode may lose them to a flushing fp32 matmul (the interpreter's numpy
    one does). (Triton 3.6's Hopper tl.dot_scaled flushed byte 0 to 0: bench/RESULTS.md, second round.)"""
    _use_decode(decode, monkeypatch)
    e, n, k = 1, 32, 128
    codes, scales = _all_bytes_weight(e, n, k, (0, 1, 2, 127))
    w = common.dequantize((codes, scales), torch.float32)[0].T  # [k, n]
    cfg = TileConfig(16, 32, 64, swap_ab=True)
    y = grouped_mm_mxfp4(torch.eye(k, dtype=torch.bfloat16, device=DEVICE), _offsets([k]), codes, scales,
                         out_dtype=torch.float32, config=cfg)
    byte0 = (scales[0].repeat_interleave(32, 1).T == 0)
    sub = w[byte0].abs()
    assert ((sub > 0) & (sub < 2.0**-126)).any()  # the case really holds subnormal weights (0.5..1.5 * 2^-127)
    tiny = (w.abs() > 0) & (w.abs() < 2.0**-126)
    if decode == "bits":
        # fp32 subnormal intermediates: numpy's matmul under the interpreter flushes them (measured); exact or
        # flushed to +-0 are the two outcomes allowed, everything else must be bit-exact
        assert torch.equal(y[~tiny], w[~tiny])
        assert bool(((y[tiny] == w[tiny]) | (y[tiny] == 0)).all())
    else:
        # bf16x2 natively (measured exact on an H100, subnormals included)
        assert torch.equal(y, w)


@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
@pytest.mark.parametrize("k", [96, 128, 160])  # 96, 160: a partial last K tile; 128: EVEN_K (no K masks)
def test_forward_matches_reference(cfg, k):
    e, n = len(COUNTS), 48
    q = _packed(e, n, k, seed=k)
    offs = _offsets(COUNTS)
    x = _bf16(sum(COUNTS), k, seed=1)
    bias = _bf16(e, n, seed=2)
    ref = R.grouped_mm_ref(x, offs, q.codes, q.scales, bias=bias)
    y32 = grouped_mm_mxfp4(x, offs, q.codes, q.scales, bias=bias, out_dtype=torch.float32, config=cfg)
    assert _rel(y32, ref) < FP32_BOUND
    y = grouped_mm_mxfp4(x, offs, q.codes, q.scales, bias=bias, config=cfg)
    assert y.dtype == torch.bfloat16 and _rel(y, ref) < BF16_BOUND


@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
def test_dx_matches_reference(cfg):
    e, n, k = len(COUNTS), 40, 96  # N = 40: a partial reduction tile
    q = _packed(e, n, k, seed=3)
    offs = _offsets(COUNTS)
    dy = _bf16(sum(COUNTS), n, seed=4)
    ref = R.grouped_mm_dx_ref(dy, offs, q.codes, q.scales)
    assert _rel(grouped_mm_mxfp4_dx(dy, offs, q.codes, q.scales, out_dtype=torch.float32, config=cfg), ref) < FP32_BOUND
    assert _rel(grouped_mm_mxfp4_dx(dy, offs, q.codes, q.scales, config=cfg), ref) < BF16_BOUND


@pytest.mark.parametrize("activation", ["silu", "swiglu_oai"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
def test_gated_forward_matches_reference(cfg, activation):
    """std 3 activations push pre-activations across the clamp limit 7 of swiglu_oai; bias and LoRA included."""
    e, i, k, r = len(COUNTS), 32, 96, 8
    q = _packed(e, 2 * i, k, seed=5)
    offs = _offsets(COUNTS)
    x = _bf16(sum(COUNTS), k, seed=6, std=0.3)
    bias = _bf16(e, 2 * i, seed=7)
    h = _bf16(sum(COUNTS), r, seed=8)
    b = _bf16(e, 2 * i, r, seed=9, std=0.5)
    a_ref, pre_ref = R.grouped_mm_gated_ref(x, offs, q.codes, q.scales, activation=activation, bias=bias, lora=(h, b))
    assert (pre_ref.abs() > 7).any() and (pre_ref.abs() < 7).any()
    a, pre = grouped_mm_mxfp4_gated(x, offs, q.codes, q.scales, activation=activation, bias=bias, lora=(h, b),
                                    save_pre=True, out_dtype=torch.float32, config=cfg)
    assert _rel(a, a_ref) < FP32_BOUND
    assert pre.dtype == torch.bfloat16 and _rel(pre, pre_ref) < BF16_BOUND
    a16, none = grouped_mm_mxfp4_gated(x, offs, q.codes, q.scales, activation=activation, bias=bias, lora=(h, b),
                                       config=cfg)
    assert none is None and _rel(a16, a_ref) < BF16_BOUND


@pytest.mark.parametrize("activation", ["silu", "swiglu_oai"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
def test_dx_with_activation_backward(cfg, activation):
    """dx kernel + LoRA + fused activation backward == autograd of the torch activation, incl. pre-activations
    exactly at the clamp limits (torch.clamp passes the gradient there)."""
    e, n, k, r = len(COUNTS), 48, 64, 16
    m = sum(COUNTS)
    q = _packed(e, n, k, seed=10)
    offs = _offsets(COUNTS)
    dy = _bf16(m, n, seed=11)
    pre = _bf16(m, 2 * k, seed=12, std=5.0)
    pre[0, :4] = torch.tensor([7.0, -7.0, 7.0, 6.0], dtype=torch.bfloat16)
    pre[0, k:k + 4] = torch.tensor([-7.0, 7.0, 8.0, -9.0], dtype=torch.bfloat16)
    h = _bf16(m, r, seed=13)
    a = _bf16(e, r, k, seed=14, std=0.5)
    da = R.grouped_mm_dx_ref(dy, offs, q.codes, q.scales, lora=(h, a))
    ref = R.gated_bwd_ref(pre, da, activation)
    got = grouped_mm_mxfp4_dx(dy, offs, q.codes, q.scales, lora=(h, a), pre=pre, activation=activation,
                              out_dtype=torch.float32, config=cfg)
    assert _rel(got, ref) < FP32_BOUND


def _pairs(t: torch.Tensor) -> torch.Tensor:
    """[gate; up] halves along dim -2 -> gpt-oss's interleaved (gate, up) pairs."""
    gate, up = t.chunk(2, dim=-2)
    return torch.stack((gate, up), dim=-2).flatten(-3, -2)


def _pair_cols(t: torch.Tensor) -> torch.Tensor:
    return _pairs(t.transpose(-1, -2)).transpose(-1, -2).contiguous()


@pytest.mark.parametrize("activation", ["silu", "swiglu_oai"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
def test_interleaved_gate_up_rows_give_the_halves_bits(cfg, activation):
    """gate_up="interleaved" (gpt-oss's w13 row order, which the learner keeps) only changes which rows a tile
    loads: act, pre (its columns in the same pair order) and the activation backward's d pre are the halves'
    results bit for bit, bias and LoRA B rows following the weight's order."""
    e, i, k, r = len(COUNTS), 32, 96, 8
    m = sum(COUNTS)
    q = _packed(e, 2 * i, k, seed=70)
    offs = _offsets(COUNTS)
    x = _bf16(m, k, seed=71, std=0.3)
    bias = _bf16(e, 2 * i, seed=72)
    h = _bf16(m, r, seed=73)
    b = _bf16(e, 2 * i, r, seed=74, std=0.5)
    kw = dict(activation=activation, save_pre=True, config=cfg)
    a_h, pre_h = grouped_mm_mxfp4_gated(x, offs, q.codes, q.scales, bias=bias, lora=(h, b), **kw)
    codes, scales = _pairs(q.codes).contiguous(), _pairs(q.scales).contiguous()
    a_p, pre_p = grouped_mm_mxfp4_gated(x, offs, codes, scales, bias=_pair_cols(bias), lora=(h, _pairs(b)),
                                        gate_up="interleaved", **kw)
    assert torch.equal(a_p, a_h) and torch.equal(pre_p, _pair_cols(pre_h))
    a_ref, _ = R.grouped_mm_gated_ref(x, offs, codes, scales, activation=activation, bias=_pair_cols(bias),
                                      lora=(h, _pairs(b)), gate_up="interleaved")
    assert _rel(a_p, a_ref) < BF16_BOUND
    w2 = _packed(e, 48, i, seed=75)
    dy = _bf16(m, 48, seed=76)
    d_h = grouped_mm_mxfp4_dx(dy, offs, w2.codes, w2.scales, pre=pre_h, activation=activation, config=cfg)
    d_p = grouped_mm_mxfp4_dx(dy, offs, w2.codes, w2.scales, pre=pre_p, activation=activation,
                              gate_up="interleaved", config=cfg)
    assert torch.equal(d_p, _pair_cols(d_h))


def _lora_params(e: int, h: int, i: int, r: int, seed: int) -> list[torch.Tensor]:
    shapes = [(e, r, h), (e, 2 * i, r), (e, r, i), (e, h, r)]
    g = _gen(seed)
    return [(torch.randn(s, generator=g) * 0.3).to(DEVICE).requires_grad_(True) for s in shapes]


@pytest.mark.parametrize("activation,gate_up", [("silu", "halves"), ("swiglu_oai", "halves"),
                                               ("swiglu_oai", "interleaved")])
def test_mlp_autograd_matches_reference(activation, gate_up):
    """MXFP4GroupedMLP (fp32 LoRA masters, bf16 compute) vs torch autograd through the fp32 reference MLP; gpt-oss's
    interleaved w13 rows (the learner's layout) with bias and LoRA B in the same row order."""
    e, h, i, r = len(COUNTS), 64, 32, 8
    q13, q2 = _packed(e, 2 * i, h, seed=20, std=0.15), _packed(e, h, i, seed=21, std=0.2)
    offs = _offsets(COUNTS)
    x = _bf16(sum(COUNTS), h, seed=22)
    b13, b2 = _bf16(e, 2 * i, seed=23, std=0.1), _bf16(e, h, seed=24, std=0.1)
    lo = _lora_params(e, h, i, r, seed=25)
    dy = _bf16(sum(COUNTS), h, seed=26)
    xk = x.clone().requires_grad_(True)
    y = MXFP4GroupedMLP.apply(xk, offs, q13.codes, q13.scales, q2.codes, q2.scales, *lo, 0.5, activation, b13, b2,
                              gate_up)
    got = torch.autograd.grad(y, [xk, *lo], dy)
    xr = x.float().requires_grad_(True)
    yr = R.moe_mlp_ref(xr, offs, (q13.codes, q13.scales), (q2.codes, q2.scales), activation=activation,
                       lora13=lo[:2], lora2=lo[2:], scaling=0.5, bias13=b13, bias2=b2, gate_up=gate_up)
    ref = torch.autograd.grad(yr, [xr, *lo], dy.float())
    assert _rel(y, yr) < MLP_BOUND
    for name, g, gr, leaf in zip(["x", "A13", "B13", "A2", "B2"], got, ref, [xk, *lo]):
        assert g.dtype == leaf.dtype, name  # bf16 dx, fp32 LoRA gradients for fp32 masters
        assert _rel(g, gr) < MLP_BOUND, name
    assert not lo[0].grad_fn and got[3][1].abs().sum() == 0  # expert 1 has no rows: zero LoRA gradient


@pytest.mark.parametrize("cfg", [CONFIGS[1]], ids=["swap_ab"])
def test_gather_and_scatter_equal_explicit_permutation(cfg):
    """gather_rows reads the sorted rows straight from the unsorted x; scatter_rows/row_weights write them back
    in token order times the router weight. Both must equal the explicit index_select / multiply bit for bit
    (same kernel, same tile, same fp32 arithmetic)."""
    e, i, h, t = len(COUNTS), 32, 64, 13
    m = sum(COUNTS)
    g = _gen(70)
    src = torch.randint(0, t, (m,), generator=g).to(DEVICE)   # any row map, tokens may repeat
    x = _bf16(t, h, seed=71)
    q13 = _packed(e, 2 * i, h, seed=72, std=0.2)
    offs = _offsets(COUNTS)
    a_g, pre_g = grouped_mm_mxfp4_gated(x, offs, q13.codes, q13.scales, activation="silu", gather_rows=src,
                                        save_pre=True, config=cfg)
    a_e, pre_e = grouped_mm_mxfp4_gated(x.index_select(0, src), offs, q13.codes, q13.scales, activation="silu",
                                        save_pre=True, config=cfg)
    assert torch.equal(a_g, a_e) and torch.equal(pre_g, pre_e)
    q2 = _packed(e, h, i, seed=73, std=0.2)
    dst = torch.randperm(m, generator=g).to(DEVICE)
    w = torch.rand(m, generator=g).to(DEVICE)
    bias = _bf16(e, h, seed=74)
    y_s = grouped_mm_mxfp4(a_g, offs, q2.codes, q2.scales, bias=bias, scatter_rows=dst, row_weights=w,
                           out_dtype=torch.float32, config=cfg)
    y = grouped_mm_mxfp4(a_g, offs, q2.codes, q2.scales, bias=bias, out_dtype=torch.float32, config=cfg)
    want = torch.empty_like(y)
    want[dst] = y * w[dst][:, None]
    assert torch.equal(y_s, want)
    with pytest.raises(ShapeError, match="'gather_rows'.*int32/int64 \\[26\\]"):
        grouped_mm_mxfp4_gated(x, offs, q13.codes, q13.scales, activation="silu", gather_rows=src.float())
    with pytest.raises(ValueError, match="scatter_rows and row_weights together"):
        grouped_mm_mxfp4(a_g, offs, q2.codes, q2.scales, scatter_rows=dst)
    with pytest.raises(ShapeError, match="'row_weights'"):
        grouped_mm_mxfp4(a_g, offs, q2.codes, q2.scales, scatter_rows=dst, row_weights=w[:3])
    with pytest.raises(ShapeError, match="'row_weights'.*on meta"):
        grouped_mm_mxfp4(a_g, offs, q2.codes, q2.scales, scatter_rows=dst, row_weights=w.to("meta"))


def test_mlp_without_lora_and_zero_rows():
    e, h, i = 3, 64, 32
    q13, q2 = _packed(e, 2 * i, h, seed=30, std=0.15), _packed(e, h, i, seed=31, std=0.2)
    x = _bf16(0, h, seed=32).requires_grad_(True)
    offs = _offsets([0, 0, 0])
    y = MXFP4GroupedMLP.apply(x, offs, q13.codes, q13.scales, q2.codes, q2.scales, None, None, None, None, 1.0,
                              "silu", None, None)
    assert y.shape == (0, h)
    (gx,) = torch.autograd.grad(y.sum(), [x])
    assert gx.shape == (0, h)


def test_routing_roundtrip_and_layer_forward():
    t, k, e, h, i = 7, 2, 4, 64, 32
    g = _gen(40)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(DEVICE)
    ids[3] = torch.tensor([1, 1])  # the same expert twice for one token is routed twice
    weights = torch.softmax(torch.randn(t, k, generator=g), -1).to(DEVICE)
    x = _bf16(t, h, seed=41)
    rt = route(ids, e)
    counts = torch.bincount(ids.flatten().cpu(), minlength=e)
    assert rt.offsets.cpu().tolist() == [0, *counts.cumsum(0).tolist()]
    xs = permute(x, rt)
    experts_of_rows = torch.repeat_interleave(torch.arange(e), counts)
    for row in range(t * k):  # every sorted row is a copy of a token routed to the row's expert
        tok = int(rt.token[row])
        assert torch.equal(xs[row], x[tok]) and int(experts_of_rows[row]) in ids[tok].tolist()
    back = unpermute(xs, rt, weights)
    assert torch.allclose(back.float(), x.float() * weights.sum(1, keepdim=True).float(), rtol=2**-7, atol=0)
    q13, q2 = _packed(e, 2 * i, h, seed=42, std=0.15), _packed(e, h, i, seed=43, std=0.2)
    y = moe_layer_forward(x, ids, weights, (q13.codes, q13.scales), (q2.codes, q2.scales), activation="silu")
    ref = torch.zeros(t, h)
    for tok in range(t):
        for j in range(k):
            ex = int(ids[tok, j])
            single = _offsets([1 if q == ex else 0 for q in range(e)])
            out = R.moe_mlp_ref(x[tok:tok + 1], single, (q13.codes, q13.scales), (q2.codes, q2.scales),
                                activation="silu")
            ref[tok] += float(weights[tok, j]) * out[0].cpu()
    assert _rel(y.cpu(), ref) < 2 * BF16_BOUND  # bf16 act between the GEMMs and a bf16 output


@pytest.mark.parametrize("k", [96, 128])
@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
def test_kb_major_codes_give_identical_outputs(cfg, k):
    """Kb-major codes (the Hopper engine's layout: K-block-major, each block's elements stored pre-shuffled and
    each word's bits scattered for the decode) give the canonical layout's results bit for bit. The kb-major call
    takes x as it comes; the canonical call gets the same elements in the same slots as plain nibbles (rows of
    W[:, c(p)]) and x[:, c(p)] (deinterleave_k), the same product reduced in the same order through the word
    decode, so only the tile loads, the bit extraction and the op's choice of x order differ. K = 96 leaves a
    partial last K tile (masked scale blocks), 128 divides (EVEN_K); every code byte, scales 2^-27..2^3 (finite
    outputs, so the equality is not one of infs); gather, scatter and bias fused. test_layer_on_kb_major_codes
    checks the products themselves against the reference."""
    e, n = 3, 64
    codes, scales = _all_bytes_weight(e, n, k, scale_bytes=(100, 119, 126, 127, 128, 130))
    kb = to_kb_major(codes)
    # the kb-major slot order as canonical nibbles: block nibble 8t + n holds the element of word t, slot n
    shuffled = e2m1.pack(deinterleave_k(e2m1.unpack(codes.reshape(e * n, -1)))).reshape(codes.shape)
    counts = [5, 0, 19]
    m = sum(counts)
    offs = _offsets(counts)
    x = _bf16(m, k, seed=90)
    rows = torch.randperm(m, generator=_gen(91)).to(DEVICE)
    rw = torch.rand(m, generator=_gen(92)).to(DEVICE)
    bias = _bf16(e, n, seed=93)
    y = [grouped_mm_mxfp4(xx, offs, c, scales, out_dtype=torch.float32, config=cfg, bias=bias, scatter_rows=rows,
                          row_weights=rw) for c, xx in ((shuffled, deinterleave_k(x)), (kb, x))]
    assert torch.equal(y[0].view(torch.int32), y[1].view(torch.int32))
    g = [grouped_mm_mxfp4_gated(xx, offs, c, scales, activation="silu", out_dtype=torch.float32, config=cfg,
                                gather_rows=rows, save_pre=True) for c, xx in ((shuffled, deinterleave_k(x)), (kb, x))]
    assert torch.equal(g[0][0].view(torch.int32), g[1][0].view(torch.int32))
    assert torch.equal(g[0][1].view(torch.int16), g[1][1].view(torch.int16))
    for out in (y[0], g[0][0]):  # not a vacuous equality of zeros or infs
        assert torch.isfinite(out).all() and (out != 0).float().mean() > 0.5


def test_layer_on_kb_major_codes():
    """The MoE layer on kb-major codes against the fp32 reference of the canonical weights: relative error within
    the bf16 rounding of the intermediate activation and the output (the bound of
    test_routing_roundtrip_and_layer_forward)."""
    t, k, e, h, i = 9, 2, 3, 64, 64
    g = _gen(97)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(DEVICE)
    weights = torch.softmax(torch.randn(t, k, generator=g), -1).to(DEVICE)
    x = _bf16(t, h, seed=98)
    q13, q2 = _packed(e, 2 * i, h, seed=99, std=0.15), _packed(e, h, i, seed=100, std=0.2)
    y = moe_layer_forward(x, ids, weights, (to_kb_major(q13.codes), q13.scales), (to_kb_major(q2.codes), q2.scales),
                          activation="silu")
    w13, w2 = common.dequantize((q13.codes, q13.scales), torch.float32), common.dequantize((q2.codes, q2.scales),
                                                                                          torch.float32)
    ref = torch.zeros(t, h)
    for tok in range(t):
        for j in range(k):
            ex = int(ids[tok, j])
            pre = x[tok].float().cpu() @ w13[ex].cpu().T
            act = torch.nn.functional.silu(pre[:i]) * pre[i:]
            ref[tok] += float(weights[tok, j]) * (act @ w2[ex].cpu().T)
    assert _rel(y.cpu(), ref) < 2 * BF16_BOUND


def test_kb_major_layout_round_trip_and_errors():
    e, n, k = 3, 8, 96
    q = _packed(e, n, k, seed=94)
    kb = to_kb_major(q.codes)
    assert kb.shape == (e, k // 32, n, 16)
    # block b of row r sits at [b, r] as 4 little-endian words; slot i + 4h of word t holds element 8i + 2t + h,
    # its bit j at word bit SLOT_BITS[i + 4h][j]
    natural = e2m1.unpack(q.codes[1, 5, 32:48]).long()
    words = kb[1, 2, 5].view(torch.int32).long() & 0xFFFFFFFF
    for t in range(4):
        for i in range(4):
            for h in range(2):
                nib = sum(((int(words[t]) >> SLOT_BITS[i + 4 * h][j]) & 1) << j for j in range(4))
                assert nib == int(natural[8 * i + 2 * t + h]), (t, i, h)
    assert torch.equal(from_kb_major(kb), q.codes)
    buf = q.codes.clone()
    convert_in_place(buf, to_kb=True, experts=torch.tensor([2, 0]))
    assert torch.equal(kb_major_view(buf)[2], kb[2]) and torch.equal(kb_major_view(buf)[0], kb[0])
    assert torch.equal(buf[1], q.codes[1])  # an expert not listed keeps its canonical bytes
    convert_in_place(buf, to_kb=False, experts=torch.tensor([0, 2]))
    assert torch.equal(buf, q.codes)
    offs = _offsets([2, 1, 1])
    with pytest.raises(ShapeError, match="kb-major codes .* forward GEMMs only"):
        grouped_mm_mxfp4_dx(_bf16(4, n, seed=95), offs, kb, q.scales)
    with pytest.raises(ShapeError, match=r"need scales \[E, N, K/32\] = \[3, 8, 3\], got \(3, 8, 2\)"):
        grouped_mm_mxfp4(_bf16(4, k, seed=96), offs, kb, q.scales[:, :, :2])
    with pytest.raises(ShapeError, match="expected canonical codes"):
        to_kb_major(q.codes[:, :, :8].contiguous().view(e, n * 8)[:, :7])


def test_kb_major_codes_refuse_a_buffer_without_the_word_decode():
    """Only the word decode reads kb-major words: a code buffer that rules it out is an error naming why, not a
    byte decode of scattered bits."""
    named = "a code base address .* not 16-byte aligned"
    e, n, k = 2, 32, 64
    q = _packed(e, n, k, seed=101)
    kb = to_kb_major(q.codes)
    kb = torch.cat([kb.new_zeros(1), kb.reshape(-1)])[1:].view(kb.shape)  # the same bytes one past a 16-byte boundary
    with pytest.raises(ValueError, match=f"kb-major codes are read by the word decode only, which {named} rules out"):
        grouped_mm_mxfp4(_bf16(3, k, seed=102), _offsets([2, 1]), kb, q.scales)


def test_kb_major_decode_steps_recover_every_code():
    """The integer steps the kb-major word decode runs (layout.py; _kb_word_decode_asm in PTX, _kb_pair_bits in
    Triton) on words holding every code in every slot: pair i's bits after the step, masked to DECODE_MASK, are
    each slot's E2M1 value in bf16 bit placement (value * 2^-126), for both halves. A pure-torch twin of the
    kernels' arithmetic, so the bit table is checked on every machine; the kernels are checked against it by the
    GEMM tests above."""
    m32 = 0xFFFFFFFF
    codes = torch.arange(256, dtype=torch.uint8).reshape(4, 1, 64)
    codes = torch.cat([codes, codes.flip(-1)], 1)  # every byte value, each in two positions: E 4, N 2, K 128
    kb = to_kb_major(codes)  # [4, 4, 2, 16]
    words = kb.view(torch.int32).long() & m32  # [E, K/32, N, word]
    slots = deinterleave_k(e2m1.unpack(codes.reshape(8, -1))).reshape(4, 2, 4, 4, 8).permute(0, 2, 1, 3, 4)
    for i in range(4):
        if i == 0:
            x = words
        elif i < 3:
            r = PAIR_ROTATE[i]
            x = ((words << r) | (words >> (32 - r))) & m32
        else:
            x = ((words & PAIR3_MASK) * PAIR3_MULTIPLIER) & m32
        x = x & DECODE_MASK
        for h in range(2):
            half = (x >> (16 * h)) & 0xFFFF
            got = (half << 16).to(torch.int32).view(torch.float32) * 2.0 ** 126
            assert torch.equal(got, e2m1.decode(slots[..., i + 4 * h])), (i, h)


def test_errors_name_tensor_expected_and_actual():
    e, n, k = 2, 32, 64
    q = _packed(e, n, k, seed=60)
    offs = _offsets([3, 1])
    x = _bf16(4, k, seed=61)
    with pytest.raises(DTypeError, match="'x'.*bfloat16.*float32"):
        grouped_mm_mxfp4(x.float(), offs, q.codes, q.scales)
    with pytest.raises(ShapeError, match=r"'x'.*\[M, 64\].*\(4, 96\)"):
        grouped_mm_mxfp4(_bf16(4, 96, seed=62), offs, q.codes, q.scales)
    with pytest.raises(ShapeError, match="'expert_offsets'.*end at the row count 4"):
        grouped_mm_mxfp4(x, _offsets([3, 2]), q.codes, q.scales, validate=True)
    with pytest.raises(ShapeError, match="'expert_offsets'.*int32"):
        grouped_mm_mxfp4(x, offs.long(), q.codes, q.scales)
    with pytest.raises(ShapeError, match="'pre'"):
        grouped_mm_mxfp4_dx(_bf16(4, n, seed=63), offs, q.codes, q.scales, activation="silu")
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        grouped_mm_mxfp4_gated(x, offs, q.codes, q.scales, activation="gelu")
    with pytest.raises(ValueError, match=r"unknown gate_up layout 'pairs'.*\('halves', 'interleaved'\)"):
        grouped_mm_mxfp4_gated(x, offs, q.codes, q.scales, activation="silu", gate_up="pairs")
    with pytest.raises(ValueError, match="unknown gate_up layout 'pairs'"):
        grouped_mm_mxfp4_dx(_bf16(4, n, seed=63), offs, q.codes, q.scales, gate_up="pairs")
    with pytest.raises(ShapeError, match="'bias'"):
        grouped_mm_mxfp4(x, offs, q.codes, q.scales, bias=_bf16(e, n + 1, seed=64))
    with pytest.raises(ShapeError, match="'topk_ids'.*\\[0, 4\\).*\\[0, 5\\]"):
        route(torch.tensor([[0, 5]]), 4, validate=True)
    with pytest.raises(ValueError, match="block_k must be >= 64"):
        TileConfig(16, 32, 32)
    for regs in (100, 16, 256):
        with pytest.raises(ValueError, match=rf"max_regs must be a multiple of 8 in \[24, 255\], got {regs}"):
            TileConfig(16, 64, 128, max_regs=regs)


def test_autotune_candidates_are_valid():
    for kind in C.KINDS:
        for bucket in (1, 16, 32, 64, 128, 4096):
            cands = C.candidates(kind, bucket)
            assert cands and all(isinstance(c, TileConfig) for c in cands)
            # shared memory per stage (bf16 rows + uint8 codes, twice for gated) fits an H100/H200 block (227 KB)
            for c in cands:
                rows_tile = c.block_m * (c.block_k if kind != "dx" else c.block_n) * 2
                w_tile = c.block_n * c.block_k // 2 * (2 if kind == "gated" else 1)
                assert (rows_tile + w_tile) * c.num_stages < 227 * 1024, (kind, c)
    assert C.rows_bucket(96, 32) == 4 and C.rows_bucket(0, 8) == 1 and C.rows_bucket(10**9, 1) == 4096


def test_host_integer_helpers_match_triton():
    # launch grids and padded ranks use these instead of triton.cdiv / triton.next_power_of_2 (host time)
    import triton
    for n in [*range(0, 300), 2**31 - 1, 2**31, 2**40 + 3]:
        assert C.next_pow2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 64, 128):
            assert C.cdiv(n, d) == triton.cdiv(n, d), (n, d)


@pytest.mark.skipif(DEVICE != "cuda", reason="the autotuner runs on a GPU only (the interpreter has a fixed tile)")
def test_autotuned_tile_is_picked_once_then_launched_directly():
    """After the autotuner's first call, a call of the same signature launches the picked tile without it: the
    same bits as the tuned call and as that tile given explicitly; a new row count reuses the pick, a new flag
    (the bias) tunes anew."""
    e, n, k = 4, 128, 256
    q = _packed(e, n, k, seed=90, std=0.2)
    offs = _offsets([40, 0, 17, 7])
    x = _bf16(64, k, seed=91)
    before = dict(ops._PICKED)
    first = grouped_mm_mxfp4(x, offs, q.codes, q.scales)
    new = [key for key in ops._PICKED if key not in before]
    assert len(new) == 1, new
    tile = ops._PICKED[new[0]]
    again = grouped_mm_mxfp4(x, offs, q.codes, q.scales)
    explicit = grouped_mm_mxfp4(x, offs, q.codes, q.scales, config=tile)
    assert torch.equal(first, again) and torch.equal(first, explicit)
    grouped_mm_mxfp4(x[:63], _offsets([40, 0, 16, 7]), q.codes, q.scales)  # same bucket: no new pick
    assert len(ops._PICKED) == len(before) + 1
    grouped_mm_mxfp4(x, offs, q.codes, q.scales, bias=_bf16(e, n, seed=92))
    assert len(ops._PICKED) == len(before) + 2


_COMPILE_SM90 = """
import sys
from common.grouped_gemm import _kernels as K
from common.grouped_gemm.aot import compile_sm90

kind = sys.argv[1]
fn = K._grouped_dx_kernel if kind.startswith("dx") else K._grouped_fwd_kernel
words = kind not in ("dx", "dx_pairs", "gated_bytes")
kb = kind in ("gated", "gated_one_mul", "gated_lora")
pairs = kind.endswith("_pairs")  # gpt-oss's interleaved gate/up rows, pre written and read as pairs
lora = kind == "gated_lora"  # with the A2 projection fused into the epilogue too
const = dict(ACT=1, ALPHA=1.702, LIMIT=7.0, HAS_BIAS=False, LORA_R=16 if lora else 0,
             SAVE_PRE=pairs, GATHER=True, SCATTER=False, E_POW2=32, F32_DOT=False, DECODE=2, SWAP_AB=True, WORDS=words,
             ONE_MUL=kind == "gated_one_mul", OUT_ORDER=int(words), WORD_PAIRS=True, BLOCK_M=16, BLOCK_N=64,
             BLOCK_K=128, EVEN_K=kind != "gated_one_mul", KB_MAJOR=kb, GATE_UP_PAIRS=pairs,
             PDL=3 if lora else 0, NEXT_R=16 if lora else 0, NEXT_N=2048)
ptr = {"codes_ptr": "*i32" if words else "*u8", "scales_ptr": "*u8", "offsets_ptr": "*i32", "src_ptr": "*i64",
       "dst_ptr": "*i64", "rw_ptr": "*fp32", "np_ptr": "*fp32", "nc_ptr": "*i32", "n_scaling": "fp32"}
try:
    compiled = compile_sm90(fn, const, ptr)
except FileNotFoundError as exc:
    print("NO-PTXAS", exc)
    sys.exit(0)
ptx = compiled.asm["ptx"]
# the kb-major word decode's rotation / the canonical one's nibble shift / the byte decode's spread
marker = "shf.l.wrap.b32 x, " if kb else "shr.u32 x, " if words else "prmt.b32 t, "
print("decode", marker in ptx, "bf16x2", ptx.count("mul.rn.bf16x2"), "wgmma", "wgmma" in ptx,
      "cubin", len(compiled.asm["cubin"]), "pdl", ptx.count("griddepcontrol"),
      "count", ptx.count("atom.global.gpu.acq_rel.add"), "reset", ptx.count("atom.global.gpu.relaxed.exch"),
      "cg", int("ld.global.cg" in ptx))
"""


@pytest.mark.parametrize("kind", ["gated", "gated_one_mul", "gated_canonical", "gated_pairs", "gated_bytes", "dx",
                                  "dx_pairs", "gated_lora"])
def test_bf16x2_decode_compiles_for_sm90(kind):
    """The bf16x2 decode is inline PTX that the interpreter never runs: compile the kernels that use it for sm_90
    ahead of time (Triton's bundled ptxas, no GPU needed; in a child process, since this one imported Triton in
    interpreter mode), so a PTX error fails CI instead of a GPU session."""
    from tests.sm90 import compile_in_child

    out = compile_in_child(_COMPILE_SM90, kind)
    words = out.split()
    assert words[:2] == ["decode", "True"] and int(words[3]) > 0, out
    assert words[5] == "True" and int(words[7]) > 0, out
    # the LoRA kind compiles PDL's wait (first) and its signal (after the K loop) too; the others neither
    assert words[9] == ("2" if kind == "gated_lora" else "0"), out
    # and the fused A2 projection's fix-up: one acquire-release count per program, the counter's reset, the
    # partials read past L1 (the interpreter runs one program at a time and cannot show the ordering)
    assert words[10:] == (["count", "1", "reset", "1", "cg", "1"] if kind == "gated_lora"
                          else ["count", "0", "reset", "0", "cg", "0"]), out


def test_decode_mode_defaults_and_reduction_order(monkeypatch):
    """bf16x2 is the decode only where it can run (sm_90+, not the interpreter), bits elsewhere; the word decode
    (x read interleaved) runs at few rows per expert, tuned or not, and always on kb-major codes."""
    monkeypatch.setattr(ops, "interpreting", lambda: False)
    monkeypatch.setattr(ops, "_bf16x2_capable", lambda: True)
    assert ops.decode_mode() == "bf16x2"
    monkeypatch.setattr(ops, "_bf16x2_capable", lambda: False)
    assert ops.decode_mode() == "bits"
    monkeypatch.setattr(ops, "_bf16x2_capable", lambda: True)
    monkeypatch.setattr(ops, "interpreting", lambda: True)
    assert ops.decode_mode() == "bits"
    codes = torch.zeros(2, 64, 64, dtype=torch.uint8)
    monkeypatch.setattr(ops, "interpreting", lambda: False)
    for autotune in ("1", "0"):
        monkeypatch.setenv("MXFP4_GG_AUTOTUNE", autotune)
        assert ops.reduction_order(codes, 16) == "interleaved"
        assert ops.reduction_order(codes, 2 * 65 * 64) == "natural"
        # kb-major codes are stored pre-shuffled and read by the word decode at every size: x as it comes
        kb = codes.view(2, 4, 64, 16)
        assert ops.reduction_order(kb, 16) == "natural"
        assert ops.reduction_order(kb, 2 * 65 * 64) == "natural"


_WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None  # any import of triton now raises ImportError
import common.grouped_gemm.layout, common.grouped_gemm.reference
import common.grouped_gemm.activations, common.grouped_gemm.configs, common.grouped_gemm.interleave
from common.grouped_gemm import TileConfig
try:
    from common.grouped_gemm import route
except ImportError:
    print("pure-torch modules imported; the kernels need triton")
"""


def test_pure_torch_modules_import_without_triton():
    """The layouts, the reference twins, the activations, the K orders and the tile configs are pure torch: a
    process without triton (e.g. a CPU-only tool converting layouts) imports them; the package's kernel names load
    triton only when asked for."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _WITHOUT_TRITON], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "pure-torch modules imported; the kernels need triton", out.stdout

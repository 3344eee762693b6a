"""Fake-QAT on the fused path (common.grouped_gemm.qat through mxfp4_train.grouped_triton) against the reference
QAT step (mxfp4_train.grouped.reference_grouped_mlp with FakeQuantExpertWeights: per-expert fake quant, STE).

On CPU the kernels run under the Triton interpreter (tests/conftest.py) and are called directly, as
tests/train/test_grouped_triton.py does; with a GPU, natively on CUDA tensors. Sizes keep the interpreter to a
few dozen programs per step.
"""

import pytest
import torch
from torch import nn

import common
from common.kernels import interpreting
from mxfp4_train.grouped import Activation, ExpertOperands, reference_grouped_mlp, select_backend
from mxfp4_train.grouped_triton import supports, triton_grouped_mlp
from mxfp4_train.lora import ExpertLoRA, LoRASpec
from mxfp4_train.weights import FakeQuantExpertWeights, PackedExpertWeights

E, H, I, T, K = 4, 64, 32, 12, 2
PROFILE = "flashinfer"
DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
ACTIVATIONS = {"glu": Activation("glu", act_fn=nn.SiLU()), "clamp_swiglu": Activation("clamp_swiglu")}


def _masters(gen, dtype=torch.bfloat16):
    w13 = (torch.randn(E, 2 * I, H, generator=gen) * 0.2).to(dtype).to(DEVICE).requires_grad_(True)
    w2 = (torch.randn(E, H, I, generator=gen) * 0.2).to(dtype).to(DEVICE).requires_grad_(True)
    return w13, w2


def _qat_ops(w13, w2, act="glu", bias=None, act_quant=False):
    ops = ExpertOperands(FakeQuantExpertWeights(w13, PROFILE, "experts.w13 master"),
                         FakeQuantExpertWeights(w2, PROFILE, "experts.w2 master"), ACTIVATIONS[act], E,
                         act_quant_profile=PROFILE if act_quant else None)
    if bias is not None:
        ops.b13, ops.b2 = bias
    return ops


def _inputs(gen):
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16)
    logits = torch.randn(T, E, generator=gen)
    logits[:, 2] = -float("inf")  # expert 2 gets no row: its gradient must be exactly zero
    w, ids = torch.softmax(logits, -1).topk(K, dim=-1)
    ids[0] = torch.tensor([1, 3])
    probe = torch.randn(T, H, generator=gen)  # loss = <y, probe>: a fixed dy, independent of y's rounding
    return x.to(DEVICE), ids.to(DEVICE), w.to(DEVICE), probe.to(DEVICE)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _step(fn, x, ids, w, probe, ops, params):
    """(y, dx, grads of params) of loss <fn(x), probe>, the params' grads cleared before."""
    for p in params:
        p.grad = None
    xr = x.detach().clone().requires_grad_(True)
    y = fn(xr, ids, w, ops)
    (y.double() * probe.double()).sum().backward()
    return y.detach(), xr.grad, [p.grad for p in params]


class _Dense:
    """A weights view on a dense tensor: the float64 oracle's W = fake_quant(master) in float64, whose gradient
    is the master's under the straight-through estimator."""

    def __init__(self, w):
        self.w = w

    def linear(self, x, e):
        return nn.functional.linear(x, self.w[e])


def _float64_oracle(w13, w2, act, bias, x, ids, w, probe):
    """y, dx, dW13, dW2, (db13, db2) in float64 of the QAT function: the reference loop on fake-quantized
    weights with every operation in float64."""
    q13, q2 = (common.fake_quant(m.detach(), profile=PROFILE).double().requires_grad_(True) for m in (w13, w2))
    b64 = None if bias is None else [b.detach().double().requires_grad_(True) for b in bias]
    ops = ExpertOperands(_Dense(q13), _Dense(q2), ACTIVATIONS[act], E,
                         b13=None if bias is None else b64[0], b2=None if bias is None else b64[1])
    x64 = x.double().requires_grad_(True)
    y = reference_grouped_mlp(x64, ids, w.double(), ops)
    (y * probe.double()).sum().backward()
    return y.detach(), x64.grad, q13.grad, q2.grad, None if bias is None else [b.grad for b in b64]


def _bias(gen):
    return [(torch.randn(E, n, generator=gen) * 0.1).to(torch.bfloat16).to(DEVICE).requires_grad_(True)
            for n in (2 * I, H)]


@pytest.mark.parametrize("act,with_bias,master_dtype", [("glu", False, torch.bfloat16),
                                                         ("clamp_swiglu", True, torch.bfloat16),
                                                         ("glu", False, torch.float32)])
def test_fused_qat_step_matches_the_reference_step(act, with_bias, master_dtype):
    # Bounds: the fused and the reference step both round x, the GEMM outputs, the activation and the gradients
    # to bf16 (2^-8 relative each; the interpreter's casts truncate: 2^-7) around fp32 accumulation; a handful of
    # such roundings on the way to dW13 bound the error near 2e-2 of the norm, while a wrong expert, a missing
    # router weight, a transposed gradient or a dequantized weight that is not the codec's gives O(1).
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    w13, w2 = _masters(gen, master_dtype)
    bias = _bias(gen) if with_bias else None
    x, ids, w, probe = _inputs(gen)
    params = [w13, w2] + (bias or [])
    ops = _qat_ops(w13, w2, act, bias)
    y, dx, grads = _step(triton_grouped_mlp, x, ids, w, probe, ops, params)
    y64, dx64, d13, d2, db = _float64_oracle(w13, w2, act, bias, x, ids, w, probe)
    oracle = [d13, d2] + (db or [])
    assert y.dtype == torch.bfloat16
    assert _rel(y, y64) < 2e-2
    assert _rel(dx, dx64) < 2e-2
    for p, g, g64 in zip(params, grads, oracle):
        assert g is not None and g.dtype == p.dtype and g.shape == p.shape  # the masters' .grad, their dtype
        assert _rel(g, g64) < 2e-2
    for g in grads[:2]:
        assert torch.count_nonzero(g[2]) == 0  # STE: an expert without rows gets exactly zero
    if master_dtype == torch.float32:
        return  # the reference step runs F.linear(x, fake_quant(master)): bf16 rows against fp32 masters fail
    _, dx_ref, grads_ref = _step(reference_grouped_mlp, x, ids, w, probe, ops, params)
    assert _rel(dx, dx64) < 2 * _rel(dx_ref, dx64) + 4e-3
    for g, r, g64 in zip(grads, grads_ref, oracle):  # no worse than the reference step's own bf16 error
        assert _rel(g, g64) < 2 * _rel(r, g64) + 4e-3


def test_fused_qat_forward_and_dx_equal_the_frozen_packed_path_bitwise():
    # The same kernels in the same order (fp32 accumulation over K tiles in ascending order, one bf16 rounding,
    # the router weights applied by the same unpermute): on the bytes common.quantize gives, the QAT step's output
    # and dx equal those of the frozen-packed (LoRA-mode) fused path bit for bit, and the masters' gradients are
    # exactly the grouped dy^T x of the kernels' own rows (wgrad.py, checked there against float64).
    gen = torch.Generator().manual_seed(1)
    w13, w2 = _masters(gen)
    x, ids, w, probe = _inputs(gen)
    ops = _qat_ops(w13, w2)
    y, dx, _ = _step(triton_grouped_mlp, x, ids, w, probe, ops, [w13, w2])
    q13, q2 = (common.quantize(m.detach().cpu(), profile=PROFILE, backend="torch") for m in (w13, w2))
    packed = ExpertOperands(PackedExpertWeights(q13.codes.to(DEVICE), q13.scales.to(DEVICE)),
                            PackedExpertWeights(q2.codes.to(DEVICE), q2.scales.to(DEVICE)), ops.activation, E)
    y_p, dx_p, _ = _step(triton_grouped_mlp, x, ids, w, probe, packed, [])
    assert torch.equal(y, y_p) and torch.equal(dx, dx_p)


def _adversarial_master(n, k, gen):
    """[E, n, k] bf16 masters whose blocks are all zeros, -0, every E2M1 tie (midpoints of the grid times a power
    of two), ties at the block maximum, the largest finite bf16, and random values."""
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0])
    w = torch.randn(E, n, k, generator=gen) * 0.3
    blocks = w.view(E, n, k // 32, 32)
    blocks[0, 0, 0] = 0.0
    blocks[0, 1, 0] = -0.0
    blocks[1, :, 0, :14] = ties * 2.0**-3  # scale 2^-3 (amax 5*2^-3 -> RCEIL code ceil(log2(5/48))+127)
    blocks[1, :, 0, 14] = 6 * 2.0**-3
    blocks[2, :, 0, :14] = ties * 2.0**20  # far above the activations' range: the bytes still equal
    blocks[3, 0, -1] = torch.finfo(torch.bfloat16).max  # scale byte 253/254: near the profiles' Inf bytes
    blocks[3, 1, -1, ::2] = -torch.finfo(torch.bfloat16).max
    return w.to(torch.bfloat16)


@pytest.mark.parametrize("profile", ["flashinfer", "ocp", "torchao"])
def test_quantize_master_gives_the_codec_bytes_on_adversarial_values(profile):
    from common.grouped_gemm.qat import quantize_master, raise_if_nonfinite
    from common.profiles import get_profile

    gen = torch.Generator().manual_seed(2)
    w = _adversarial_master(2 * I, H, gen).to(DEVICE)
    codes, scales = quantize_master(w, get_profile(profile))
    ref = common.quantize(w.cpu(), profile=profile, backend="torch")
    assert torch.equal(codes.cpu(), ref.codes) and torch.equal(scales.cpu(), ref.scales)
    # ocp's Inf byte (0xFD) is what the largest finite bf16 gets: the suspect path runs the full check, which passes
    raise_if_nonfinite([(w, scales, "w")], get_profile(profile))


def test_adversarial_masters_through_the_fused_step():
    # zeros, ties and huge blocks (experts 0..3 of _adversarial_master): the forward equals the frozen-packed path
    # on the codec's bytes bit for bit, and the gradients reach the masters; the largest-magnitude blocks stay out
    # of the products (zero activations on those columns) so that the comparison is between finite numbers.
    gen = torch.Generator().manual_seed(3)
    w13 = _adversarial_master(2 * I, H, gen).to(DEVICE)
    w2 = _adversarial_master(H, I, gen).to(DEVICE)
    w13[3, :, -32:] = 0  # expert 3's max-magnitude blocks only in its bytes, not its products (see above)
    w2[3, :, -32:] = 0
    w13[2] *= 2.0**-20
    w2[2] *= 2.0**-20
    w13.requires_grad_(True)
    w2.requires_grad_(True)
    x, ids, w, probe = _inputs(gen)
    ops = _qat_ops(w13, w2)
    y, dx, (g13, g2) = _step(triton_grouped_mlp, x, ids, w, probe, ops, [w13, w2])
    q13, q2 = (common.quantize(m.detach().cpu(), profile=PROFILE, backend="torch") for m in (w13, w2))
    packed = ExpertOperands(PackedExpertWeights(q13.codes.to(DEVICE), q13.scales.to(DEVICE)),
                            PackedExpertWeights(q2.codes.to(DEVICE), q2.scales.to(DEVICE)), ops.activation, E)
    y_p, dx_p, _ = _step(triton_grouped_mlp, x, ids, w, probe, packed, [])
    assert torch.isfinite(y).all() and torch.equal(y, y_p) and torch.equal(dx, dx_p)
    assert torch.isfinite(g13).all() and torch.isfinite(g2).all() and g13.abs().sum() > 0


def test_nonfinite_master_raises_naming_it():
    gen = torch.Generator().manual_seed(4)
    w13, w2 = _masters(gen)
    with torch.no_grad():
        w13[1, 5, 40] = float("nan")
    x, ids, w, _ = _inputs(gen)
    with pytest.raises(common.NonFiniteError, match=r"experts.w13 master.*index \(1, 5\) block 1"):
        triton_grouped_mlp(x, ids, w, _qat_ops(w13, w2))


def test_w4a8_fused_step_matches_the_reference_step():
    # W4A8: both steps fake-quantize x and the activation with the MXFP8 rule before each GEMM and pass the
    # gradient straight through. x's quantization is the same in both; the activation's is not always: the
    # reference rounds silu(gate) and the product to bf16 separately, the kernel once, and a one-ulp bf16
    # difference flips the E4M3 rounding of that element (1 E4M3 ulp, 2^-4 to 2^-3 relative) for about one element
    # in 16. Over 104 random seeds on CPU: up to 6.5e-2 of the norm (12 tokens: one flip weighs a lot), so the
    # seed is fixed here; the bound 8e-2 still fails a missing or misplaced quantization, a wrong expert or router
    # weight (O(1)), and the wiring is checked bit for bit by the next test.
    gen = torch.Generator().manual_seed(8)
    w13, w2 = _masters(gen)
    x, ids, w, probe = _inputs(gen)
    ops = _qat_ops(w13, w2, act_quant=True)
    y, dx, grads = _step(triton_grouped_mlp, x, ids, w, probe, ops, [w13, w2])
    y_r, dx_r, grads_r = _step(reference_grouped_mlp, x, ids, w, probe, ops, [w13, w2])
    assert _rel(y, y_r) < 8e-2 and _rel(dx, dx_r) < 8e-2
    for g, r in zip(grads, grads_r):
        assert _rel(g, r) < 8e-2


def test_w4a8_step_is_the_codec_then_the_gemms_bitwise():
    # The fused W4A8 step on sorted rows equals, bit for bit, the codec's fake quant of x (common.fake_quant_mxfp8),
    # the gated GEMM on the codec's bytes of W13, the codec's fake quant of the activation and the down GEMM; its
    # gradients are the straight-through ones: dW2 = dy^T aq, dW13 = dpre^T xq (the GEMMs' quantized inputs), dx
    # the dx GEMM of dpre (the activation quant passes it unchanged).
    from common.grouped_gemm.ops import grouped_mm_mxfp4, grouped_mm_mxfp4_dx, grouped_mm_mxfp4_gated
    from common.grouped_gemm.qat import MXFP4QATGroupedMLP
    from common.grouped_gemm.wgrad import expert_wgrad

    gen = torch.Generator().manual_seed(7)
    w13, w2 = _masters(gen)
    offsets = torch.tensor([0, 7, 7, 19, 24], dtype=torch.int32, device=DEVICE)
    xs = torch.randn(24, H, generator=gen).to(torch.bfloat16).to(DEVICE).requires_grad_(True)
    dy = torch.randn(24, H, generator=gen).to(torch.bfloat16).to(DEVICE)
    y = MXFP4QATGroupedMLP.apply(xs, offsets, w13, w2, PROFILE, "silu", "halves", None, None, PROFILE,
                                 ("w13", "w2"))
    y.backward(dy)
    q13, q2 = (common.quantize(m.detach().cpu(), profile=PROFILE, backend="torch").to(DEVICE) for m in (w13, w2))
    xq = common.fake_quant_mxfp8(xs.detach().cpu(), profile=PROFILE, backend="torch").to(DEVICE)
    act, pre = grouped_mm_mxfp4_gated(xq, offsets, q13.codes, q13.scales, activation="silu", save_pre=True)
    aq = common.fake_quant_mxfp8(act.cpu(), profile=PROFILE, backend="torch").to(DEVICE)
    assert torch.equal(y, grouped_mm_mxfp4(aq, offsets, q2.codes, q2.scales))
    assert not torch.equal(aq, act) and not torch.equal(xq, xs)
    dpre = grouped_mm_mxfp4_dx(dy, offsets, q2.codes, q2.scales, pre=pre, activation="silu")
    assert torch.equal(w2.grad, expert_wgrad(dy, aq, offsets)[0])
    assert torch.equal(w13.grad, expert_wgrad(dpre, xq, offsets)[0])
    assert torch.equal(xs.grad, grouped_mm_mxfp4_dx(dpre, offsets, q13.codes, q13.scales))


def test_expert_wgrad_kernel_and_grouped_mm_against_float64():
    from common.grouped_gemm.wgrad import expert_wgrad

    gen = torch.Generator().manual_seed(5)
    m, p, q = 50, 96, 40
    dy = torch.randn(m, p, generator=gen).to(torch.bfloat16).to(DEVICE)
    x = torch.randn(m, q, generator=gen).to(torch.bfloat16).to(DEVICE)
    offsets = torch.tensor([0, 17, 17, 50, 50], dtype=torch.int32, device=DEVICE)  # two experts without rows
    dw, db = expert_wgrad(dy, x, offsets, torch.float32, bias_dtype=torch.float32, backend="triton")
    bf, _ = expert_wgrad(dy, x, offsets, torch.bfloat16, backend="triton")
    tm, none = expert_wgrad(dy, x, offsets, torch.bfloat16, backend="torch")
    assert none is None
    for e in range(4):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        ref = dy[lo:hi].double().T @ x[lo:hi].double()
        # fp32 accumulation of exact bf16 products over <= 33 rows: a few fp32 ulps of the largest partial sum
        assert (dw[e].double() - ref).abs().max() <= 2.0**-20 * (hi - lo) * ref.abs().max().clamp(min=1)
        col = dy[lo:hi].double()  # fp32 sum of <= 33 bf16 values in any order: a few fp32 ulps of their sum of |.|
        assert ((db[e].double() - col.sum(0)).abs() <= 2.0**-22 * (hi - lo) * col.abs().sum(0)).all()
        # one bf16 rounding of the same sum: within half a bf16 ulp (2^-8 relative) of float64 plus the fp32
        # sum's error; the interpreter's cast truncates (one ulp, 2^-7), torch and GPUs round to nearest
        for got, ulps in ((bf[e], 2.0**-7 if interpreting() else 2.0**-8), (tm[e], 2.0**-8)):
            assert ((got.double() - ref).abs() <= ref.abs() * ulps * (1 + 2.0**-10) + 1e-30).all()
    assert torch.count_nonzero(dw[1]) == 0 and torch.count_nonzero(tm[3]) == 0


def test_expert_wgrad_errors_name_the_tensor():
    from common.errors import DTypeError, ShapeError
    from common.grouped_gemm.wgrad import expert_wgrad

    dy = torch.zeros(8, 16, dtype=torch.bfloat16)
    offsets = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(DTypeError, match=r"tensor 'x': expected bfloat16 .* got torch.float32"):
        expert_wgrad(dy, torch.zeros(8, 16), offsets)
    with pytest.raises(ShapeError, match=r"tensor 'x': expected \[M=8, \.\.\.\] sorted rows, got \(7, 16\)"):
        expert_wgrad(dy, torch.zeros(7, 16, dtype=torch.bfloat16), offsets)
    with pytest.raises(ValueError, match="torch backend .* cannot run out_dtype torch.float32"):
        expert_wgrad(dy, dy, offsets, torch.float32, backend="torch")


def test_supports_the_qat_masters_on_cuda_and_says_why_not():
    gen = torch.Generator().manual_seed(6)
    w13, w2 = (m.detach().cpu() for m in _masters(gen))
    ops = _qat_ops(w13, w2)
    x = torch.zeros(T, H, dtype=torch.bfloat16)
    assert supports(x, ops) == (False, "needs CUDA tensors")
    if not torch.cuda.is_available():
        return
    assert "is on cpu" in supports(x.cuda(), ops)[1]
    ops = _qat_ops(w13.cuda(), w2.cuda(), act_quant=True)
    assert supports(x.cuda(), ops) == (True, "")
    assert select_backend(x.cuda(), ops) == "triton"  # what MXFP4Experts(mode="qat") runs on a GPU by default
    ops.lora13 = ExpertLoRA(E, H, 2 * I, LoRASpec(r=4, alpha=8.0), device="cuda")
    assert "LoRA adapters on QAT masters" in supports(x.cuda(), ops)[1]

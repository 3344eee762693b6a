"""The learner's fused GPU backend (common.grouped_gemm kernels) computes the reference grouped MLP's function and
gradients. On CPU the kernels run under the Triton interpreter (tests/conftest.py), called directly because the
backend's `supports` keeps `auto` on the bitwise reference there; with a GPU, natively on CUDA tensors."""

import pytest
import torch
from torch import nn

import common
from mxfp4_train.grouped import Activation, ExpertOperands, reference_grouped_mlp, select_backend
from mxfp4_train.grouped_triton import supports, triton_grouped_mlp
from mxfp4_train.lora import ExpertLoRA, LoRASpec
from mxfp4_train.weights import FakeQuantExpertWeights, PackedExpertWeights
from common.kernels import interpreting

E, H, I, T, K = 4, 64, 32, 12, 2
DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"


def _on_device(ops, *tensors):
    """ops and tensors moved to DEVICE (built on CPU from a CPU generator)."""
    for name in ("w13", "w2"):
        w = getattr(ops, name)
        setattr(ops, name, PackedExpertWeights(w.codes.to(DEVICE), w.scales.to(DEVICE)))
    for name in ("b13", "b2"):
        if getattr(ops, name) is not None:
            setattr(ops, name, getattr(ops, name).to(DEVICE))
    for lo in (ops.lora13, ops.lora2):
        if lo is not None:
            lo.to(DEVICE)
    return (ops, *(t.to(DEVICE) for t in tensors))


ACTIVATIONS = {"glu": Activation("glu", act_fn=nn.SiLU()), "clamp_swiglu": Activation("clamp_swiglu")}


def _ops(gen, lora=True, bias=False, act="glu", std13=0.2):
    # with act "clamp_swiglu" (gpt-oss) the w13 rows are (gate, up) pairs
    w13 = common.quantize(torch.randn(E, 2 * I, H, generator=gen) * std13, profile="flashinfer")
    w2 = common.quantize(torch.randn(E, H, I, generator=gen) * 0.2, profile="flashinfer")
    spec = LoRASpec(r=4, alpha=8.0)
    ops = ExpertOperands(PackedExpertWeights(w13.codes, w13.scales), PackedExpertWeights(w2.codes, w2.scales),
                         ACTIVATIONS[act], E)
    if lora:
        ops.lora13, ops.lora2 = ExpertLoRA(E, H, 2 * I, spec), ExpertLoRA(E, I, H, spec)
        with torch.no_grad():  # B starts at zero (PEFT init); make the adapters matter
            ops.lora13.B.normal_(0, 0.1, generator=gen)
            ops.lora2.B.normal_(0, 0.1, generator=gen)
    if bias:
        ops.b13, ops.b2 = torch.randn(E, 2 * I, generator=gen) * 0.1, torch.randn(E, H, generator=gen) * 0.1
    return ops


def _routing(gen):
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16)
    w, ids = torch.softmax(torch.randn(T, E, generator=gen), -1).topk(K, dim=-1)
    ids[0] = torch.tensor([1, 3])  # expert 0 and 2 may get few tokens; force a known pair too
    return x, ids, w


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("act,bias,w4a8", [("glu", False, False), ("glu", True, False), ("clamp_swiglu", True, False),
                                          ("glu", True, True), ("clamp_swiglu", False, True)])
def test_forward_and_gradients_match_the_reference(act, bias, w4a8):
    # bf16 activations through two GEMMs, the activation and the LoRA products, each rounded to bf16 (2^-8; the
    # interpreter truncates, 2^-7): a few such roundings bound the relative error near 3e-2 for outputs and
    # gradients; a wrong expert, scale, row order or missing LoRA term gives O(1).
    # W4A8 (frozen packed experts, MXFP8 fake quant of both GEMMs' inputs, LoRA on the unquantized rows): x is the
    # same bf16 value on both sides, so its quantization is identical; the activation reaches the fake quant in fp32
    # in the reference and as bf16 here (truncated under the interpreter: 2^-7), so an element within 2^-7 of an
    # E4M3 rounding boundary (about one in 2^-7 / 2^-3 = 16) may land one E4M3 step (up to 2^-3 of it) apart: about
    # 0.25 * 2^-3 ~ 3e-2 more relative error in the down GEMM's input, twice the bounds for the outputs (measured
    # over 24 seeds: up to 4.0e-2). That the kernels apply the fake quant where the reference does is checked
    # bit for bit by test_w4a8_is_the_fake_quant_before_each_packed_gemm.
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    ops, x, ids, w = _on_device(_ops(gen, bias=bias, act=act), *_routing(gen))
    if w4a8:
        ops.act_quant_profile = "flashinfer"
        if torch.cuda.is_available():
            assert supports(x.cuda(), ops) == (True, "")
    bound = 6e-2 if w4a8 else 3e-2
    x_ref = x.float().requires_grad_(True)
    ref = reference_grouped_mlp(x_ref, ids, w.float(), ops)
    ref.square().sum().backward()
    ref_grads = [p.grad.clone() for p in (ops.lora13.A, ops.lora13.B, ops.lora2.A, ops.lora2.B)]
    for p in (ops.lora13.A, ops.lora13.B, ops.lora2.A, ops.lora2.B):
        p.grad = None
    x_k = x.clone().requires_grad_(True)
    got = triton_grouped_mlp(x_k, ids, w, ops)
    assert got.dtype == torch.bfloat16
    got.float().square().sum().backward()
    assert _rel(got, ref) < bound
    assert _rel(x_k.grad, x_ref.grad) < bound
    for g, r in zip((ops.lora13.A.grad, ops.lora13.B.grad, ops.lora2.A.grad, ops.lora2.B.grad), ref_grads):
        assert _rel(g, r) < 5e-2 + bound - 3e-2


def test_w4a8_is_the_fake_quant_before_each_packed_gemm():
    """MXFP4GroupedMLP with act_profile (W4A8 on frozen packed experts) equals, bit for bit, the same kernels fed
    by hand: the gated GEMM on the codec's MXFP8 fake quant of x, the down GEMM on that of the activation, the LoRA
    projections on the unquantized rows; and differs from the call without it (the quant is applied)."""
    from common import fake_quant_mxfp8
    from common.grouped_gemm import MXFP4GroupedMLP, grouped_mm_mxfp4, grouped_mm_mxfp4_gated, permute, route
    from common.grouped_gemm import lora as L

    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    ops, x, ids, _ = _on_device(_ops(gen, bias=True), *_routing(gen))
    x[1, :3] = torch.tensor([448.0 * 2**10, 3e-39, 0.0])  # a large block maximum, a subnormal, a zero
    rt = route(ids, E)
    xs = permute(x, rt)
    s = ops.lora13.spec.scaling
    args = (xs, rt.offsets, ops.w13.codes, ops.w13.scales, ops.w2.codes, ops.w2.scales, ops.lora13.A, ops.lora13.B,
            ops.lora2.A, ops.lora2.B, s, "silu", ops.b13, ops.b2)
    with torch.no_grad():
        got = MXFP4GroupedMLP.apply(*args, "halves", None, "flashinfer")
        plain = MXFP4GroupedMLP.apply(*args)
        bf = [t.to(torch.bfloat16) for t in (ops.lora13.B, ops.lora2.B)]
        act, _ = grouped_mm_mxfp4_gated(fake_quant_mxfp8(xs, profile="flashinfer"), rt.offsets, ops.w13.codes,
                                        ops.w13.scales, activation="silu", bias=ops.b13, save_pre=True,
                                        lora=(L.project(xs, rt.offsets, ops.lora13.A, s), bf[0]))
        want = grouped_mm_mxfp4(fake_quant_mxfp8(act, profile="flashinfer"), rt.offsets, ops.w2.codes, ops.w2.scales,
                                bias=ops.b2, lora=(L.project(act, rt.offsets, ops.lora2.A, s), bf[1]))
    assert torch.equal(got, want)
    assert not torch.equal(got, plain)


def test_gpt_oss_forward_across_the_clamp():
    # Larger gpt-oss weights put pre-activations beyond the clamp limit 7, where the forward stays continuous (the
    # same 3e-2 bound as above). Gradients are compared at the smaller weights above: an fp32 reference and a bf16
    # pre-activation may fall on two sides of +-7, where the clamp's gradient jumps by O(1) (measured up to 0.3
    # relative at these weights); the kernel's clamp gradient at the limits is tested exactly in
    # tests/common/test_grouped_gemm.py::test_dx_with_activation_backward.
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    ops, x, ids, w = _on_device(_ops(gen, bias=True, act="clamp_swiglu", std13=1.0), *_routing(gen))
    w0 = common.dequantize((ops.w13.codes[0], ops.w13.scales[0]), torch.float32)
    assert ((x.float() @ w0.T).abs() > 7).any()
    with torch.no_grad():
        ref = reference_grouped_mlp(x.float(), ids, w.float(), ops)
        got = triton_grouped_mlp(x, ids, w, ops)
    assert _rel(got, ref) < 3e-2


def test_deepseek_v4_clamped_silu_forward_across_the_limit():
    # DeepSeek-V4 clamps gate (above) and up (both sides) at swiglu_limit before silu(gate) * up: the kernels'
    # silu_clamp with the model's limit as an argument. The limit sits at the median |pre-activation| so that about
    # half of them are clamped; forward within the same 3e-2 bound (gradients near the limit: see the gpt-oss test's
    # note; the epilogue's clamp gradient is tested exactly in tests/common/test_silu_clamp.py).
    from mxfp4_train.grouped_triton import _kernel_activation

    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    ops, x, ids, w = _on_device(_ops(gen, bias=False, act="glu", std13=1.0), *_routing(gen))
    w0 = common.dequantize((ops.w13.codes[0], ops.w13.scales[0]), torch.float32)
    limit = float((x.float() @ w0.T).abs().median())
    ops.activation = Activation("glu", act_fn=nn.SiLU(), clamp=limit)
    assert _kernel_activation(ops) == ("silu_clamp", "halves", "")
    with torch.no_grad():
        ref = reference_grouped_mlp(x.float(), ids, w.float(), ops)
        got = triton_grouped_mlp(x, ids, w, ops)
        ops.activation = Activation("glu", act_fn=nn.SiLU())
        unclamped = reference_grouped_mlp(x.float(), ids, w.float(), ops)
    assert _rel(got, ref) < 3e-2
    assert _rel(unclamped, ref) > 0.1  # the clamp matters at these inputs


def test_supports_explains_every_rejection():
    gen = torch.Generator().manual_seed(0)
    ops = _ops(gen)
    x, _, _ = _routing(gen)
    assert supports(x, ops) == (False, "needs CUDA tensors")
    assert select_backend(x, ops) == "reference"  # auto keeps the bitwise reference on CPU
    if torch.cuda.is_available():
        assert supports(x.cuda(), ops)[0]
        assert "bf16" in supports(x.cuda().float(), ops)[1]
        qat = ExpertOperands(FakeQuantExpertWeights(torch.randn(E, 2 * I, H), "flashinfer"), ops.w2, ops.activation, E)
        assert "weight gradient" in supports(x.cuda(), qat)[1]


def test_kernel_activation_admits_silu_and_gpt_oss_clamp_swiglu_only():
    from common.grouped_gemm import activations as A
    from mxfp4_train.grouped_triton import GPT_OSS_SWIGLU, _kernel_activation

    assert GPT_OSS_SWIGLU == (A.SWIGLU_ALPHA, A.SWIGLU_LIMIT)  # the kernels' compiled constants
    gen = torch.Generator().manual_seed(0)
    ops = _ops(gen, act="clamp_swiglu")
    assert _kernel_activation(ops) == ("swiglu_oai", "interleaved", "")
    ops.activation = Activation("clamp_swiglu", limit=10.0)
    assert _kernel_activation(ops) == (None, "", "clamp_swiglu with alpha 1.702, limit 10.0: the kernels fuse "
                                                 "gpt-oss's (alpha, limit) = (1.702, 7.0) only")
    ops.activation = Activation("glu", act_fn=nn.GELU())
    name, _, reason = _kernel_activation(ops)
    assert name is None and "fuse silu only" in reason

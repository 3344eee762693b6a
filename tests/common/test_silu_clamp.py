"""DeepSeek-V4's clamped silu ("silu_clamp", limit = the model's swiglu_limit) in the fused grouped-GEMM epilogues,
forward and backward, against the pure-torch twin (common.grouped_gemm.activations) and the contract's activation
(common.moe.ActivationSpec, which the engine's CPU reference and the learner compute).

On CPU the kernels run under TRITON_INTERPRET=1 (set before triton is imported); with CUDA natively. Bit-exact checks
where bits are defined: the clamp itself (a kernel with the clamp == the same kernel's plain silu on pre-activations
clamped beforehand, forward and backward); the GEMM around it is compared with the fp32 reference at the bounds of
tests/common/test_grouped_gemm.py (the kernel's sigmoid is 1 / (1 + exp(-x)) on the device's exp, torch's silu
another formula, so the silu itself differs in the last bits: that is no property of the clamp).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import common  # noqa: E402
from common import moe  # noqa: E402
from common.grouped_gemm import (  # noqa: E402
    MXFP4GroupedMLP,
    TileConfig,
    grouped_mm_mxfp4_dx,
    grouped_mm_mxfp4_gated,
)
from common.grouped_gemm import activations as A  # noqa: E402
from common.grouped_gemm import reference as R  # noqa: E402
from common.kernels import interpreting  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
LIMIT = 10.0  # DeepSeek-V4-Flash's config.json swiglu_limit
FP32_BOUND = 2e-4  # test_grouped_gemm.py: fp32 sums in another order
MLP_BOUND = 4 * 2.0**-7  # test_grouped_gemm.py: four bf16 roundings along a gradient path
# One tile config (16 x 32 x 64) and 4 experts of up to 17 rows: a few dozen interpreter programs per call.
CFG = TileConfig(16, 32, 64, swap_ab=True)
COUNTS = [3, 0, 17, 5]

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _offsets() -> torch.Tensor:
    o = torch.zeros(len(COUNTS) + 1, dtype=torch.int32)
    o[1:] = torch.tensor(COUNTS).cumsum(0)
    return o.to(DEVICE)


def _bf16(*shape: int, seed: int, std: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=_gen(seed)) * std).to(torch.bfloat16).to(DEVICE)


def _packed(e: int, n: int, k: int, seed: int, std: float = 1.0) -> common.MXFP4Tensor:
    return common.quantize(torch.randn(e, n, k, generator=_gen(seed)) * std, profile="flashinfer").to(DEVICE)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _edge_pre(m: int, i: int, seed: int) -> torch.Tensor:
    """bf16 [m, 2I] = [gate | up] pre-activations of std 8 (about a quarter beyond +-10), with exact +-LIMIT and
    values one bf16 step either side of it in the first row."""
    pre = _bf16(m, 2 * i, seed=seed, std=8.0)
    edge = torch.tensor([LIMIT, -LIMIT, 10.0625, 9.9375, -10.0625, -9.9375], dtype=torch.bfloat16)
    pre[0, :6] = edge.to(pre.device)
    pre[0, i:i + 6] = edge.flip(0).to(pre.device)
    return pre


def _clamped(pre: torch.Tensor) -> torch.Tensor:
    gate, up = pre.chunk(2, dim=-1)
    return torch.cat([gate.clamp(max=LIMIT), up.clamp(min=-LIMIT, max=LIMIT)], dim=-1)


def test_clamp_in_the_forward_epilogue_is_exact():
    """Zero weights and pre-activations carried by the bias (0 + b is exact in fp32): silu_clamp's output is, bit for
    bit, the plain silu kernel's on the clamped bias, and the saved pre-activation is the unclamped one."""
    e, i, k = len(COUNTS), 32, 64
    m = sum(COUNTS)
    codes = torch.zeros(e, 2 * i, k // 2, dtype=torch.uint8, device=DEVICE)
    scales = torch.full((e, 2 * i, k // 32), 127, dtype=torch.uint8, device=DEVICE)
    offs = _offsets()
    x = _bf16(m, k, seed=1)
    pre = _edge_pre(e, i, seed=2)  # one bias row per expert
    kw = dict(save_pre=True, out_dtype=torch.float32, config=CFG)
    a, saved = grouped_mm_mxfp4_gated(x, offs, codes, scales, activation="silu_clamp", limit=LIMIT, bias=pre, **kw)
    a_silu, _ = grouped_mm_mxfp4_gated(x, offs, codes, scales, activation="silu", bias=_clamped(pre), **kw)
    assert torch.equal(a, a_silu)
    rows = torch.repeat_interleave(torch.arange(e, device=DEVICE), torch.tensor(COUNTS, device=DEVICE))
    assert torch.equal(saved, pre[rows])
    # against the torch twin: equal to the last bits of the silu (the clamp is exact, see the module docstring)
    assert _rel(a, A.gated(pre[rows].float(), "silu_clamp", limit=LIMIT)) < 1e-6


def test_clamp_in_the_backward_epilogue_is_exact_and_matches_autograd():
    """d pre of silu_clamp == the plain silu backward at the clamped pre, zeroed where torch.clamp passes no
    gradient (gate > L; up outside [-L, L]), bit for bit; and the autograd of the torch twin within FP32_BOUND."""
    e, n, i = len(COUNTS), 48, 32
    m = sum(COUNTS)
    w2 = _packed(e, n, i, seed=3)
    offs = _offsets()
    dy = _bf16(m, n, seed=4)
    pre = _edge_pre(m, i, seed=5)
    kw = dict(out_dtype=torch.float32, config=CFG)
    got = grouped_mm_mxfp4_dx(dy, offs, w2.codes, w2.scales, pre=pre, activation="silu_clamp", limit=LIMIT, **kw)
    silu = grouped_mm_mxfp4_dx(dy, offs, w2.codes, w2.scales, pre=_clamped(pre), activation="silu", **kw)
    gate, up = pre.float().chunk(2, dim=-1)
    passes = torch.cat([gate <= LIMIT, (up >= -LIMIT) & (up <= LIMIT)], dim=-1)
    assert torch.equal(got, torch.where(passes, silu, torch.zeros_like(silu)))
    assert not passes.all() and passes[0, :6].tolist() == [True, True, False, True, True, True]
    da = R.grouped_mm_dx_ref(dy, offs, w2.codes, w2.scales)
    assert _rel(got, R.gated_bwd_ref(pre, da, "silu_clamp", limit=LIMIT)) < FP32_BOUND


def _lora_rows(x: torch.Tensor, a: torch.Tensor, scaling: float) -> torch.Tensor:
    """scaling * x_e A_e^T [M, R] per expert's rows (the LoRA down-projection the gated reference takes)."""
    rows = torch.repeat_interleave(torch.arange(len(COUNTS), device=x.device), torch.tensor(COUNTS, device=x.device))
    return scaling * torch.einsum("mh,mrh->mr", x.float(), a.detach().float()[rows])


W13_SEED = 48  # see the precondition in the test below


def test_gated_gemm_and_mlp_autograd_match_the_reference():
    """The learner's fused path (MXFP4GroupedMLP with LoRA, forward and backward) with silu_clamp == torch autograd
    through the fp32 reference MLP; gate and up pre-activations reach beyond +-L, so the clamps are exercised.

    Precondition (checked): no pre-activation within one bf16 step (1/16 at 8..16) of +-L. The fused backward
    reads pre as saved in bf16, as it does for swiglu_oai, so a value that rounds across the limit gets the other
    side's gradient (measured: a single such element moves dx by 8% in norm); that is the bf16 saving, not the
    clamp, which the exact tests above cover at and around the limit."""
    e, h, i, r = len(COUNTS), 64, 32, 8
    m = sum(COUNTS)
    q13, q2 = _packed(e, 2 * i, h, seed=W13_SEED, std=0.5), _packed(e, h, i, seed=21, std=0.2)
    offs = _offsets()
    x = _bf16(m, h, seed=22)
    g = _gen(25)
    lo = [(torch.randn(s, generator=g) * 0.3).to(DEVICE).requires_grad_(True)
          for s in ((e, r, h), (e, 2 * i, r), (e, r, i), (e, h, r))]
    lora13 = (_lora_rows(x, lo[0], 0.5), lo[1].detach())
    a_ref, pre_ref = R.grouped_mm_gated_ref(x, offs, q13.codes, q13.scales, activation="silu_clamp", limit=LIMIT,
                                            lora=lora13)
    gate, up = pre_ref.chunk(2, dim=-1)
    assert (gate > LIMIT).any() and (up.abs() > LIMIT).any() and (pre_ref.abs() < LIMIT).any()
    assert not ((pre_ref.abs() - LIMIT).abs() < 1 / 16).any(), "precondition: pick another W13_SEED"
    a, _ = grouped_mm_mxfp4_gated(x, offs, q13.codes, q13.scales, activation="silu_clamp", limit=LIMIT,
                                  lora=(lora13[0].to(torch.bfloat16), lora13[1].to(torch.bfloat16)),
                                  out_dtype=torch.float32, config=CFG)
    assert _rel(a, a_ref) < 2 * 2.0**-7  # the LoRA term enters in bf16 here
    dy = _bf16(m, h, seed=26)
    xk = x.clone().requires_grad_(True)
    y = MXFP4GroupedMLP.apply(xk, offs, q13.codes, q13.scales, q2.codes, q2.scales, *lo, 0.5, "silu_clamp", None,
                              None, "halves", LIMIT)
    got = torch.autograd.grad(y, [xk, *lo], dy)
    xr = x.float().requires_grad_(True)
    yr = R.moe_mlp_ref(xr, offs, (q13.codes, q13.scales), (q2.codes, q2.scales), activation="silu_clamp",
                       lora13=lo[:2], lora2=lo[2:], scaling=0.5, limit=LIMIT)
    ref = torch.autograd.grad(yr, [xr, *lo], dy.float())
    assert _rel(y, yr) < MLP_BOUND
    for name, gk, gr in zip(["x", "A13", "B13", "A2", "B2"], got, ref):
        assert _rel(gk, gr) < MLP_BOUND, name


def test_the_twins_and_the_contract_agree():
    """The kernels' torch twin, the contract's ActivationSpec (engine CPU reference) and transformers'
    DeepseekV4Experts._apply_gate (the learner) compute silu_clamp bit for bit on the same fp32 and bf16 inputs."""
    from transformers import DeepseekV4Config
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Experts

    pre = _edge_pre(8, 32, seed=30).cpu()
    spec = moe.ActivationSpec("silu_clamp", limit=LIMIT)
    cfg = DeepseekV4Config(hidden_size=64, intermediate_size=32, moe_intermediate_size=32, n_routed_experts=2,
                           num_experts_per_tok=1, swiglu_limit=LIMIT)
    hf = DeepseekV4Experts(cfg)
    for t in (pre, pre.float()):
        want = hf._apply_gate(t)
        assert torch.equal(spec(*t.chunk(2, dim=-1)), want)
        assert torch.equal(A.gated(t, "silu_clamp", limit=LIMIT), want)
    assert spec.kernel_name == "silu_clamp" and spec.kernel_limit == LIMIT and spec.fused_in_kernels


def test_limits_are_the_models_and_misuse_is_refused():
    with pytest.raises(ValueError, match=r"'silu_clamp'.*finite positive.*swiglu_limit\), got None"):
        moe.ActivationSpec("silu_clamp")
    with pytest.raises(ValueError, match=r"'silu' takes no clamp limit \(got 10.0\).*'silu_clamp'"):
        moe.ActivationSpec("silu", limit=10.0)
    with pytest.raises(ValueError, match=r"finite positive.*got inf"):
        moe.ActivationSpec("silu_clamp", limit=float("inf"))
    assert moe.ActivationSpec("swigluoai").limit == moe.SWIGLU_LIMIT and moe.ActivationSpec("silu").limit is None
    codes = torch.zeros(1, 64, 16, dtype=torch.uint8, device=DEVICE)
    scales = torch.full((1, 64, 1), 127, dtype=torch.uint8, device=DEVICE)
    x, offs = _bf16(2, 32, seed=0), torch.tensor([0, 2], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"activation 'silu_clamp': the clamp limit must be .*got None"):
        grouped_mm_mxfp4_gated(x, offs, codes, scales, activation="silu_clamp")
    with pytest.raises(ValueError, match=r"activation 'swiglu_oai' takes no clamp limit \(got 10.0\)"):
        grouped_mm_mxfp4_gated(x, offs, codes, scales, activation="swiglu_oai", limit=10.0)

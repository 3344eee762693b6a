"""Triton codec kernels == pure-torch reference, byte for byte, for every profile and dtype.

Without CUDA the kernels run under TRITON_INTERPRET=1 on CPU tensors (set here before triton is imported);
with CUDA they run natively on the GPU. Every comparison is torch.equal on bytes.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import common  # noqa: E402
from common import Profile, ScaleRule, TieRule, get_profile, profile_names, reference  # noqa: E402
from common.errors import DTypeError, NonFiniteError, ShapeError  # noqa: E402
from common.kernels import (  # noqa: E402
    dequantize_mxfp4_triton,
    interpreting,
    quantize_mxfp4_triton,
    quantize_mxfp8_triton,
)
from common.kernels.params import f32_bits  # noqa: E402

from .cases import all_adversarial, random_valid_packed  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
PROFILES = profile_names()
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DT_IDS = ["bf16", "fp16", "fp32"]
# On a GPU the random tests draw 100x more blocks (2.7M random-bit blocks over the 18 profile x dtype cases).
SCALE = 1 if DEVICE == "cpu" else 100
INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}

# The interpreter warns about overflowing numpy ops (Inf * 0, 2^127 * large) whose results the kernels use on
# purpose, exactly like IEEE hardware does.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _finite_max(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max


def _random_bits(n_blocks: int, dtype: torch.dtype, gen: torch.Generator, finite: bool = True) -> torch.Tensor:
    """Blocks of uniformly random bit patterns: every exponent, subnormals, and (finite=False) NaN/Inf."""
    view = INT_VIEW[dtype]
    info = torch.iinfo(view)
    bits = torch.randint(info.min, info.max, (n_blocks, 32), generator=gen, dtype=torch.int64).to(view)
    x = bits.view(dtype)
    if finite:
        x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    return x


def _random_normal(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Gaussian values with a per-row magnitude spread that stays inside dtype's range."""
    span = 12 if dtype == torch.float16 else 60
    x = torch.randn(shape, generator=gen, dtype=torch.float32)
    spread = torch.randint(-span, span + 1, (*shape[:-1], 1), generator=gen).to(torch.float32)
    return (x * torch.exp2(spread)).to(dtype)


def _adversarial(dtype: torch.dtype) -> torch.Tensor:
    """The shared adversarial blocks (tests/common/cases.py) plus this dtype's own extremes and subnormals."""
    base = all_adversarial(torch.float32).to(torch.float64)
    base = torch.clamp(base, -_finite_max(dtype), _finite_max(dtype)).to(dtype)
    info = torch.finfo(dtype)
    sub = torch.arange(1, 33, dtype=torch.int64).to(INT_VIEW[dtype]).view(dtype)  # the 32 smallest subnormals
    top = torch.tensor([info.max, -info.max, info.max / 2, info.tiny, -info.tiny, 0.0, -0.0, 1.0] * 4, dtype=dtype)
    # Ties for the FLOOR/EVEN rules: anchors 4*2^k and 7*2^k put the midpoints of 2^k's grid in the block.
    ties = []
    for k in range(-20, 9, 3):
        for anchor in (4.0, 7.0, 7.5):
            vals = [anchor] + [m * s for m in (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.5, 6.5) for s in (1, -1)]
            ties.append(torch.tensor((vals + [0.0] * 32)[:32], dtype=torch.float64) * 2.0**k)
    return torch.cat([base, sub[None], top[None], torch.stack(ties).to(dtype)]).contiguous()


def _check_mxfp4(x: torch.Tensor, profile: str) -> None:
    prof = get_profile(profile)
    codes, scales = quantize_mxfp4_triton(x.to(DEVICE), prof)
    ref_codes, ref_scales = reference.quantize_mxfp4(x, prof, nonfinite="profile")
    assert torch.equal(scales.cpu(), ref_scales), f"{profile}: {(scales.cpu() != ref_scales).sum()} scales differ"
    assert torch.equal(codes.cpu(), ref_codes), f"{profile}: {(codes.cpu() != ref_codes).sum()} code bytes differ"


def _mxfp8_expected(x: torch.Tensor, profile: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference MXFP8 bytes with NaN elements pinned to 0x7F | sign(x).

    The reference's NaN elements come from x * NaN or Inf * 0, whose sign IEEE leaves unspecified (x86 gives
    the first NaN operand or the negative default NaN, CUDA a positive one); the kernel keeps the element's
    own sign bit, as the MXFP4 encoder does.
    """
    elems, scales = reference.quantize_mxfp8(x, get_profile(profile), nonfinite="profile")
    e = elems.view(torch.uint8)
    sign = (x.view(INT_VIEW[x.dtype]) < 0).to(torch.uint8) << 7
    return torch.where((e & 0x7F) == 0x7F, 0x7F | sign, e), scales


def _check_mxfp8(x: torch.Tensor, profile: str) -> None:
    elems, scales = quantize_mxfp8_triton(x.to(DEVICE), get_profile(profile))
    assert elems.dtype == torch.float8_e4m3fn and elems.shape == x.shape
    ref_elems, ref_scales = _mxfp8_expected(x, profile)
    assert torch.equal(scales.cpu(), ref_scales), f"{profile}: {(scales.cpu() != ref_scales).sum()} scales differ"
    got = elems.view(torch.uint8).cpu()
    assert torch.equal(got, ref_elems), f"{profile}: {(got != ref_elems).sum()} element bytes differ"


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("profile", PROFILES)
def test_quantize_mxfp4_random(profile, dtype):
    gen = _gen(hash((profile, str(dtype))) % 2**31)
    _check_mxfp4(_random_normal((3, 37, 256), dtype, gen), profile)  # 888 blocks: two programs, ragged tail
    _check_mxfp4(_random_bits(1500 * SCALE, dtype, gen).reshape(3, 500 * SCALE, 32), profile)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("profile", PROFILES)
def test_quantize_mxfp4_adversarial(profile, dtype):
    _check_mxfp4(_adversarial(dtype), profile)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("profile", PROFILES)
def test_quantize_mxfp4_nonfinite_profile_rule(profile, dtype):
    """NaN/Inf blocks (nonfinite="profile"): scale bytes, saturated Inf, NaN elements and signs as the reference."""
    gen = _gen(7)
    x = _random_normal((64, 32), dtype, gen)
    nan, inf = float("nan"), float("inf")
    x[0, 3] = nan
    x[1, 0], x[1, 31] = inf, -inf
    x[2, 5], x[2, 6] = -inf, nan
    x[3] = torch.tensor([nan, -nan, inf, -inf, 0.0, -0.0, 1.0, -1.0] * 4, dtype=dtype)
    x[4, 7] = -nan
    x[5] = inf
    x[6:8] = _random_bits(2, dtype, gen, finite=False)
    _check_mxfp4(x, profile)
    _check_mxfp4(_random_bits(400, dtype, gen, finite=False), profile)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("profile", PROFILES)
def test_quantize_mxfp8_matches_reference(profile, dtype):
    gen = _gen(11)
    _check_mxfp8(_random_normal((2, 19, 128), dtype, gen), profile)
    _check_mxfp8(_adversarial(dtype), profile)
    _check_mxfp8(_random_bits(600, dtype, gen, finite=False), profile)


# Profiles nobody registers, for the kernel paths the registered ones leave idle: ties away from zero, and a
# zero multiplier for Inf blocks (Inf * 0 = NaN elements) with a NaN element code other than 7.
CUSTOM = [
    Profile(name="test_rceil_away", scale_rule=ScaleRule.RCEIL, tie_rule=TieRule.AWAY),
    Profile(name="test_even_away", scale_rule=ScaleRule.EVEN, tie_rule=TieRule.AWAY, code0_exponent=120),
    Profile(name="test_zero_inf", scale_rule=ScaleRule.FLOOR, inf_scale=0, code0_exponent=None, nan_element=3),
    Profile(name="test_floor_amax", scale_rule=ScaleRule.CEIL_QUOTIENT, amax_floor=1e-30, nan_scale=0x7F,
            nan_element=5),
]


@pytest.mark.parametrize("profile", CUSTOM, ids=[p.name for p in CUSTOM])
def test_unregistered_profile_paths(profile):
    gen = _gen(19)
    for dtype in DTYPES:
        _check_mxfp4(_adversarial(dtype), profile)
        _check_mxfp4(_random_bits(300, dtype, gen, finite=False), profile)
        if profile.tie_rule is TieRule.EVEN:
            _check_mxfp8(_random_bits(300, dtype, gen, finite=False), profile)


@pytest.mark.parametrize("profile", PROFILES)
def test_scale_rules_on_every_amax_region(profile):
    """Single-element blocks whose amax walks the subnormal range, the 6*2^-126 / 448*2^-126 region where
    CEIL_QUOTIENT leaves RCEIL, and random fp32 patterns; checked for both element formats."""
    low = torch.arange(0, 4096, dtype=torch.int32)
    around = []
    for v in (6.0 * 2.0**-126, 448.0 * 2.0**-126, 6.0 * 2.0**-127, 2.0**-126, 3.0 * 2.0**-149):
        b = f32_bits(v)
        around.append(torch.arange(b - 64, b + 64, dtype=torch.int32))
    rand = torch.randint(0, 0x7F800000, (4096,), generator=_gen(3), dtype=torch.int64).to(torch.int32)
    amax = torch.cat([low, *around, rand]).view(torch.float32)
    x = torch.zeros(amax.numel(), 32)
    x[:, 0] = amax
    _check_mxfp4(x, profile)
    _check_mxfp8(x, profile)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_dequantize_every_nibble_and_scale(dtype):
    """All 16 nibbles in every position under all 255 finite scale bytes (overflow to Inf and subnormal
    products included), plus random valid packed tensors with leading dims."""
    nib = torch.arange(16, dtype=torch.uint8).repeat(2)  # one block: nibbles 0..15 twice
    codes = (nib[0::2] | (nib[1::2] << 4)).repeat(255, 1)
    swapped = (nib[1::2] | (nib[0::2] << 4)).repeat(255, 1)  # same nibbles in the other half of each byte
    codes = torch.cat([codes, swapped])
    scales = torch.arange(255, dtype=torch.uint8).repeat(2)[:, None]
    got = dequantize_mxfp4_triton(codes.to(DEVICE), scales.to(DEVICE), dtype).cpu()
    ref = reference.dequantize_mxfp4(codes, scales, dtype)
    assert torch.equal(got.view(INT_VIEW[dtype]), ref.view(INT_VIEW[dtype]))
    codes, scales = random_valid_packed(3 * 40, 192, _gen(5), min_scale=0, max_scale=254)
    codes, scales = codes.reshape(3, 40, 96), scales.reshape(3, 40, 6)
    got = dequantize_mxfp4_triton(codes.to(DEVICE), scales.to(DEVICE), dtype).cpu()
    assert got.shape == (3, 40, 192)
    ref = reference.dequantize_mxfp4(codes, scales, dtype)
    assert torch.equal(got.view(INT_VIEW[dtype]), ref.view(INT_VIEW[dtype]))


def test_dequantize_nan_scale_gives_nan():
    codes = torch.full((2, 16), 0x21, dtype=torch.uint8)
    scales = torch.tensor([[255], [127]], dtype=torch.uint8)
    out = dequantize_mxfp4_triton(codes.to(DEVICE), scales.to(DEVICE), torch.float32).cpu()
    assert torch.isnan(out[0]).all() and torch.equal(out[1], torch.tensor([0.5, 1.0] * 16))


@pytest.mark.parametrize("profile", PROFILES)
def test_roundtrip_valid_codes(profile):
    """quantize(dequantize(q)) == q through the kernels, for codes that every profile maps back to themselves."""
    codes, scales = random_valid_packed(64, 256, _gen(9), min_scale=1, max_scale=252)
    x = dequantize_mxfp4_triton(codes.to(DEVICE), scales.to(DEVICE), torch.float32)
    c2, s2 = quantize_mxfp4_triton(x, get_profile(profile))
    assert torch.equal(s2.cpu(), scales) and torch.equal(c2.cpu(), codes)


def test_non_contiguous_and_leading_dims():
    gen = _gen(13)
    base = _random_normal((4, 64, 96), torch.bfloat16, gen)
    x = base.transpose(0, 1)  # [64, 4, 96], not contiguous
    assert not x.is_contiguous()
    _check_mxfp4(x, "flashinfer")
    _check_mxfp8(x[:, 1], "ocp")  # a strided slice
    codes, scales = quantize_mxfp4_triton(x.to(DEVICE), get_profile("flashinfer"))
    assert codes.shape == (64, 4, 48) and scales.shape == (64, 4, 3)
    empty = torch.empty(0, 64, dtype=torch.bfloat16, device=DEVICE)
    c, s = quantize_mxfp4_triton(empty, get_profile("ocp"))
    assert c.shape == (0, 32) and s.shape == (0, 2)
    assert dequantize_mxfp4_triton(c, s, torch.float16).shape == (0, 64)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_public_api_triton_backend_equals_torch(dtype):
    gen = _gen(17)
    x = _random_normal((2, 16, 128), dtype, gen).to(DEVICE)
    for profile in PROFILES:
        q_t = common.quantize(x, profile=profile, backend="triton")
        q_r = common.quantize(x.cpu(), profile=profile, backend="torch")
        assert q_t.to("cpu").equal(q_r)
        fq_t = common.fake_quant(x, profile=profile, backend="triton").cpu()
        fq_r = common.fake_quant(x.cpu(), profile=profile, backend="torch")
        assert torch.equal(fq_t.view(INT_VIEW[dtype]), fq_r.view(INT_VIEW[dtype]))
        e_t, s_t = common.quantize_mxfp8(x, profile=profile, backend="triton")
        e_r, s_r = common.quantize_mxfp8(x.cpu(), profile=profile, backend="torch")
        assert torch.equal(e_t.view(torch.uint8).cpu(), e_r.view(torch.uint8)) and torch.equal(s_t.cpu(), s_r)


def test_public_api_refuses_nonfinite_before_the_kernel():
    x = torch.ones(4, 64, device=DEVICE)
    x[2, 40] = float("nan")
    with pytest.raises(NonFiniteError, match=r"'w'.*index \(2,\) block 1"):
        common.quantize(x, profile="flashinfer", name="w", backend="triton")
    with pytest.raises(NonFiniteError, match="0xFF"):
        common.dequantize((torch.zeros(1, 16, dtype=torch.uint8, device=DEVICE),
                           torch.full((1, 1), 255, dtype=torch.uint8, device=DEVICE)), backend="triton")


def test_bad_input_errors_name_expected_and_actual():
    prof = get_profile("flashinfer")
    with pytest.raises(ShapeError, match=r"multiple of 32, got shape \(4, 48\)"):
        quantize_mxfp4_triton(torch.zeros(4, 48, device=DEVICE), prof)
    with pytest.raises(DTypeError, match="got torch.int32"):
        quantize_mxfp8_triton(torch.zeros(4, 32, dtype=torch.int32, device=DEVICE), prof)
    with pytest.raises(ShapeError, match="do not agree"):
        dequantize_mxfp4_triton(torch.zeros(4, 16, dtype=torch.uint8), torch.zeros(4, 2, dtype=torch.uint8))
    with pytest.raises(DTypeError, match="output dtype .* got torch.int8"):
        dequantize_mxfp4_triton(torch.zeros(4, 16, dtype=torch.uint8), torch.zeros(4, 1, dtype=torch.uint8),
                                torch.int8)
    with pytest.raises(ValueError, match="power of two, got 48"):
        quantize_mxfp4_triton(torch.zeros(4, 32, device=DEVICE), prof, blocks=48)


def test_cpu_tensor_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="need a CUDA tensor .* TRITON_INTERPRET=1"):
        quantize_mxfp4_triton(torch.zeros(2, 32), get_profile("ocp"))

"""Properties of the reference codec: exact dequantization, round trips, idempotence, errors, non-finite rules."""

import math

import pytest
import torch

import common
from common import errors

from . import cases

PROFILES = common.profile_names()


def _gen():
    g = torch.Generator()
    g.seed()
    return g


def test_dequantize_every_nibble_and_scale_byte_exactly():
    grid = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    nibbles = torch.arange(16, dtype=torch.uint8).repeat(2)  # 32 elements: one block
    codes = (nibbles[0::2] | (nibbles[1::2] << 4)).expand(255, 16).contiguous()
    scales = torch.arange(255, dtype=torch.uint8).unsqueeze(1)
    out = common.dequantize((codes, scales), dtype=torch.float32)
    for s in range(255):
        for i in range(32):
            n = i % 16
            exact = math.ldexp(grid[n & 7], s - 127) * (-1 if n & 8 else 1)
            want = torch.tensor(exact, dtype=torch.float64).float().item()  # 4 * 2^126 and up overflow fp32
            got = out[s, i].item()
            assert got == want and math.copysign(1, got) == math.copysign(1, want), (s, n, got, want)


def test_dequantize_refuses_nan_scale():
    codes = torch.zeros(2, 16, dtype=torch.uint8)
    scales = torch.tensor([[127], [255]], dtype=torch.uint8)
    with pytest.raises(errors.NonFiniteError, match=r"'w2'.*0xFF.*\(1, 0\)"):
        common.dequantize((codes, scales), name="w2")


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_quantize_of_dequantize_is_identity(profile, dtype):
    codes, scales = cases.random_valid_packed(64, 256, _gen())
    q = common.MXFP4Tensor(codes, scales, profile)
    again = common.quantize(common.dequantize(q, dtype=dtype), profile=profile)
    assert again.equal(q)


@pytest.mark.parametrize("profile", ["ocp", "even"])
def test_round_trip_includes_scale_byte_zero_for_exact_code0_profiles(profile):
    codes, scales = cases.random_valid_packed(16, 128, _gen(), min_scale=0, max_scale=3)
    q = common.MXFP4Tensor(codes, scales, profile)
    assert common.quantize(common.dequantize(q, dtype=torch.float32), profile=profile).equal(q)


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fake_quant_is_idempotent_and_keeps_dtype(profile, dtype):
    # fp16 tops out at 65504: keep 6 * scale representable (scale <= 2^13).
    x = cases.random_blocks(512, torch.float32, _gen()).clamp(-3e4, 3e4).to(dtype).reshape(64, 256)
    once = common.fake_quant(x, profile=profile)
    assert once.dtype == dtype and once.shape == x.shape
    assert torch.equal(common.fake_quant(once, profile=profile).view(torch.uint8 if dtype != torch.float32 else torch.int32),
                       once.view(torch.uint8 if dtype != torch.float32 else torch.int32))


def test_fake_quant_relative_error_is_bounded():
    # RCEIL keeps every |x| <= 6 * scale; the worst relative step of E2M1 above the smallest normal (1.0) is a half
    # step of 0.5 at 1.0 -> 25%. Over a Gaussian block the RMS error relative to the block RMS stays under ~15%
    # (E2M1 with a power-of-two scale gives SQNR around 17-19 dB on Gaussian data).
    x = torch.randn(256, 1024, generator=_gen())
    y = common.fake_quant(x, profile="flashinfer")
    rel = (y - x).norm() / x.norm()
    assert 0.05 < rel < 0.15, rel


def test_leading_dims_and_expert_indexing():
    x = torch.randn(3, 8, 64, generator=_gen())
    q = common.quantize(x, profile="flashinfer")
    assert q.codes.shape == (3, 8, 32) and q.scales.shape == (3, 8, 2) and q.shape == x.shape
    assert q[1].equal(common.quantize(x[1], profile="flashinfer"))


def test_errors_name_the_tensor_and_the_problem():
    with pytest.raises(errors.ShapeError, match=r"'experts.0.w1'.*multiple of 32.*\(4, 48\)"):
        common.quantize(torch.randn(4, 48), profile="flashinfer", name="experts.0.w1")
    with pytest.raises(errors.DTypeError, match=r"'w'.*torch.int32"):
        common.quantize(torch.zeros(4, 32, dtype=torch.int32), profile="flashinfer", name="w")
    with pytest.raises(errors.UnknownProfileError, match=r"'nvfp4'.*flashinfer"):
        common.quantize(torch.randn(4, 32), profile="nvfp4")
    with pytest.raises(errors.ShapeError, match=r"codes \(4, 16\) and scales \(4, 2\)"):
        common.MXFP4Tensor(torch.zeros(4, 16, dtype=torch.uint8), torch.zeros(4, 2, dtype=torch.uint8), "ocp")
    with pytest.raises(errors.DTypeError, match=r"scales must be uint8, got torch.float8_e8m0fnu"):
        common.dequantize((torch.zeros(4, 16, dtype=torch.uint8), torch.zeros(4, 1, dtype=torch.float8_e8m0fnu)))
    with pytest.raises(ValueError, match="nonfinite"):
        common.reference.quantize_mxfp4(torch.randn(2, 32), common.get_profile("ocp"), nonfinite="ignore")


def test_non_finite_input_is_refused_naming_the_first_block():
    x = torch.randn(4, 3, 64)
    x[2, 1, 40] = float("nan")
    x[3, 0, 0] = float("inf")
    with pytest.raises(errors.NonFiniteError, match=r"'layers.3.w2'.*2 block\(s\).*\(2, 1\) block 1 \(elements 32\.\.63\)"):
        common.quantize(x, profile="flashinfer", name="layers.3.w2")


@pytest.mark.parametrize("profile", PROFILES)
def test_non_finite_profile_rules(profile):
    p = common.get_profile(profile)
    x = torch.zeros(3, 32)
    x[0, :4] = torch.tensor([float("inf"), -1.0, 2.0, -float("inf")])
    x[1, :4] = torch.tensor([float("nan"), -1.0, 3.0, -float("nan")])
    x[2, :2] = torch.tensor([1.0, -2.0])
    q = common.quantize(x, profile=profile, nonfinite="profile")
    nib = common.e2m1.unpack(q.codes)
    assert q.scales[0].item() == p.inf_scale and q.scales[1].item() == p.nan_scale
    assert nib[0, 0].item() == 0x7 and nib[0, 3].item() == 0xF  # Inf saturates to +-6
    assert nib[1, 0].item() == p.nan_element and nib[1, 3].item() == 0x8 | p.nan_element
    assert nib[1, 1].item() == 0x8 and nib[1, 2].item() == 0x0  # finite elements of a NaN block: +-0
    assert torch.equal(q[2].codes, common.quantize(x[2:], profile=profile).codes[0])  # other blocks unaffected


def test_profiles_validate_their_fields():
    with pytest.raises(ValueError, match="code0_exponent"):
        common.Profile(name="bad", scale_rule=common.ScaleRule.RCEIL, code0_exponent=200)
    with pytest.raises(TypeError, match="scale_rule"):
        common.Profile(name="bad", scale_rule="rceil")
    assert common.get_profile(common.DEFAULT_PROFILE).name == "flashinfer"

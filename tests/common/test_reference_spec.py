"""The pure-torch reference codec against the independent float64 statement of every profile (spec64.py)."""

import pytest
import torch

import common
from common import e2m1

from . import cases, spec64

PROFILES = sorted(spec64.SPECS)
DTYPES = [torch.bfloat16, torch.float32]


@pytest.fixture
def gen():
    g = torch.Generator()
    g.seed()  # fresh inputs every run; the seed is printed on failure through the test id below
    return g


def _inputs(dtype, gen):
    return torch.cat([cases.all_adversarial(dtype), cases.random_blocks(2048, dtype, gen)])


def test_every_profile_has_a_spec():
    assert sorted(common.profile_names()) == PROFILES


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("profile", PROFILES)
def test_mxfp4_matches_float64_spec(profile, dtype, gen):
    x = _inputs(dtype, gen)
    q = common.quantize(x, profile=profile, backend="torch")
    nibbles, scales = spec64.quantize_mxfp4(x, profile)
    bad = (q.scales.flatten() != scales) | (e2m1.unpack(q.codes) != nibbles).any(-1)
    assert not bad.any(), f"{int(bad.sum())} blocks differ (seed {gen.initial_seed()}); first {x[bad][0].tolist()}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("profile", PROFILES)
def test_mxfp8_matches_float64_spec(profile, dtype, gen):
    x = _inputs(dtype, gen)
    elements, scales = common.quantize_mxfp8(x, profile=profile, backend="torch")
    want, want_scales = spec64.quantize_mxfp8(x, profile)
    assert torch.equal(scales.flatten(), want_scales), f"seed {gen.initial_seed()}"
    got = elements.to(torch.float64)
    assert torch.equal(got, want), f"seed {gen.initial_seed()}"
    assert torch.equal(torch.signbit(got), torch.signbit(want)), "sign of zero differs"


def test_literal_packed_bytes():
    # 1.0 -> code 2, -6.0 -> 0xF, 0.25 -> 0 (tie to even), -0.0 -> 0x8, 5.0 -> code 6 (tie to even: 4.0),
    # 0.75 -> code 2 (tie to even: 1.0). Block amax 6 -> scale 2^0 = byte 127.
    x = torch.tensor([[1.0, -6.0, 0.25, -0.0, 5.0, 0.75] + [0.0] * 26])
    q = common.quantize(x, profile="flashinfer")
    assert q.codes[0, :3].tolist() == [0b1111_0010, 0b1000_0000, 0b0010_0110]
    assert q.scales.tolist() == [[127]]
    assert q.shape == x.shape and q.bits_per_element == 4.25


def test_tie_rule_away_from_zero_rounds_every_midpoint_up():
    # Older triton_kernels releases rounded ties away from zero; a profile with TieRule.AWAY must do that.
    p = common.Profile(name="test_away", scale_rule=common.ScaleRule.RCEIL, tie_rule=common.TieRule.AWAY)
    x = torch.tensor([[6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] + [0.0] * 24])
    nibbles = e2m1.unpack(common.quantize(x, profile=p).codes)[0, :8].tolist()
    assert nibbles == [7, 1, 2, 3, 4, 5, 6, 7]

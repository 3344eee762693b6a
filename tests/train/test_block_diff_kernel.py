"""The learner's block delta in two kernels (common.kernels.block_diff, mxfp4_train.sync.delta on a GPU) against the
torch composition it replaces there (block_delta, then common.audit.mxfp4_lanes_after) and against the lanes of the
new bytes hashed from scratch: bit for bit, under the Triton interpreter (natively on a GPU)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import common  # noqa: E402
from common.audit import mxfp4_lanes, mxfp4_lanes_after  # noqa: E402
from common.errors import ShapeError  # noqa: E402
from common.kernels import block_diff as K  # noqa: E402
from common.kernels import interpreting  # noqa: E402
from mxfp4_train.sync.delta import _kernel_delta, block_delta, block_delta_and_lanes  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"


def _weight(e: int, n: int, k: int, seed: int) -> common.MXFP4Tensor:
    g = torch.Generator().manual_seed(seed)
    q = common.quantize(torch.randn(e, n, k, generator=g), profile="flashinfer")
    return common.MXFP4Tensor(q.codes.to(DEVICE), q.scales.to(DEVICE), q.profile)


def _changed(q: common.MXFP4Tensor, case: str, seed: int) -> common.MXFP4Tensor:
    g = torch.Generator().manual_seed(seed)
    codes, scales = q.codes.clone(), q.scales.clone()
    blocks = codes.view(*scales.shape, 16)
    pick = (torch.rand(scales.shape, generator=g) < 0.3).to(DEVICE)
    if case == "random":
        blocks[..., 3][pick] ^= 0xF0                     # one nibble of some blocks
        blocks.view(-1)[0] ^= 0xFF                       # both nibbles of a byte
        scales.view(-1)[5] += 1                          # a scale alone
        scales.view(-1)[-1] -= 1                         # the last block's scale (the padded last scale word)
    elif case == "every nibble":
        codes ^= 0x77                                    # all 16 nibbles of every word differ
    elif case == "sign of zero":
        blocks[..., 0][pick] ^= 0x08                     # +0 <-> -0 and other sign flips: bytes differ
    elif case == "scales only":
        scales[pick] ^= 0x01
    elif case == "none":
        pass
    return common.MXFP4Tensor(codes, scales, q.profile)


def _assert_same(old: common.MXFP4Tensor, new: common.MXFP4Tensor, per: int | None) -> None:
    lanes = mxfp4_lanes(old)
    want = block_delta(old, new)
    want_lanes = mxfp4_lanes_after(lanes, old, new, want.index)
    got, got_lanes = _kernel_delta(old.codes, old.scales, new, lanes, blocks_per_program=per)
    for f in ("index", "codes", "scales"):
        a, b = getattr(got, f), getattr(want, f)
        assert a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu()), f
    for f in ("blocks_total", "codes_flipped", "codes_total", "scales_changed"):
        assert getattr(got, f) == getattr(want, f), f
    assert got_lanes == want_lanes == mxfp4_lanes(new)


@pytest.mark.parametrize("case", ["random", "every nibble", "sign of zero", "scales only", "none"])
def test_kernel_delta_equals_the_torch_composition(case):
    """90 blocks (not a multiple of a program's 64, nor of a scale word's 8: the last scale word is zero padded)."""
    old = _weight(3, 10, 96, seed=1)
    new = _changed(old, case, seed=2)
    _assert_same(old, new, None)
    if case == "every nibble":
        assert block_delta(old, new).codes_flipped == old.shape.numel()  # 16 of 16 nibbles per word counted


@pytest.mark.parametrize("per", [8, 16, 128])
def test_kernel_delta_per_program_tiles(per):
    """Programs of 8 blocks (one scale word each), 16, and one program for everything: the ranks and the lane sums
    across programs do not depend on the split."""
    old = _weight(2, 7, 64, seed=3)
    _assert_same(old, _changed(old, "random", seed=4), per)


def test_kernel_delta_refuses_a_bad_tile_and_mismatched_weights():
    old = _weight(2, 4, 64, seed=5)
    with pytest.raises(ValueError, match="blocks_per_program must be a power of two >= 8, got 12"):
        _kernel_delta(old.codes, old.scales, old, mxfp4_lanes(old), blocks_per_program=12)
    other = _weight(2, 4, 96, seed=6)
    with pytest.raises(ShapeError, match=r"block delta: shapes differ, \[2, 4, 64\] vs \[2, 4, 96\]"):
        block_delta_and_lanes(old, other, mxfp4_lanes(old))


def test_usable_needs_one_device_contiguous_aligned_codes():
    old = _weight(2, 4, 64, seed=7)
    assert K.usable(old.codes, old.codes.clone())
    assert not K.usable(old.codes.transpose(0, 1), old.codes)
    buf = torch.zeros(old.codes.numel() + 1, dtype=torch.uint8, device=DEVICE)
    misaligned = buf[1:].view(old.codes.shape)  # one byte past an allocation: not 8-byte aligned
    assert not K.usable(misaligned, old.codes) and not K.usable(old.codes, misaligned)


_COMPILE = """
from common.grouped_gemm.aot import compile_sm90
from common.kernels.block_diff import _diff_kernel, _gather_kernel
from common.fingerprint import LANES

(a0, b0, m10, m20), (a1, b1, m11, m21) = LANES
const = dict(A0=a0, B0=b0, M10=m10, M20=m20, A1=a1, B1=b1, M11=m11, M21=m21, BLOCKS=1024)
i64 = {n: "*i64" for n in ("new_ptr", "old_ptr", "new_sw_ptr", "old_sw_ptr", "stat_ptr", "codes_ptr")}
u8 = {n: "*u8" for n in ("new_s_ptr", "old_s_ptr", "scales_ptr")}
try:
    a = compile_sm90(_diff_kernel, const, {**i64, **u8, "flag_ptr": "*i8"}, num_warps=4, num_stages=1)
    b = compile_sm90(_gather_kernel, const, {**i64, **u8, "flag_ptr": "*i8", "first_ptr": "*i32",
                                               "index_ptr": "*i32"}, num_warps=4, num_stages=1)
except FileNotFoundError as exc:
    print("NO-PTXAS", exc)
    raise SystemExit(0)
print("ok", len(a.asm["cubin"]) > 0, len(b.asm["cubin"]) > 0)
"""


def test_block_diff_kernels_compile_for_sm90():
    """Both kernels compile for sm_90 (Triton's ptxas, no GPU): 64-bit multiplies, the prefix sum, int8 flags."""
    from tests.sm90 import compile_in_child

    out = compile_in_child(_COMPILE)
    assert out.split() == ["ok", "True", "True"], out

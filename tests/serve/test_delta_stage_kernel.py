"""The engine's block-delta stage in one kernel (common.kernels.delta_stage, mxfp4_serve.sync.staging on a GPU)
against what it replaces: the lanes of the new weight hashed from scratch and the torch stage's refusals, bit for bit,
on canonical and kb-major codes, under the Triton interpreter (natively on a GPU)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import common  # noqa: E402
from common.audit import mxfp4_lanes  # noqa: E402
from common.checkpoint.validate import reserved_scale_low  # noqa: E402
from common.fingerprint import lanes, moved_lanes  # noqa: E402
from common.grouped_gemm.layout import to_kb_major  # noqa: E402
from common.kernels import delta_stage as K  # noqa: E402
from common.kernels import interpreting  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
E, N, KDIM = 3, 40, 256  # 3 * 40 * 8 = 960 blocks: the seen bitmap's last word is partly used
LOW = reserved_scale_low("flashinfer")


def _weight(seed: int) -> common.MXFP4Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(E, N, KDIM, generator=g)
    x[0, 0, :32] = 0.0  # an all-zero block
    x[1, 2, 32:64] *= 2.0**-130  # subnormal inputs
    x[2, -1, -32:] *= 2.0**100  # a large block
    q = common.quantize(x, profile="flashinfer")
    return common.MXFP4Tensor(q.codes.to(DEVICE), q.scales.to(DEVICE), q.profile)


def _delta(q: common.MXFP4Tensor, seed: int, share: float = 0.05):
    """(index int32 [M, 3] in random order, new codes [M, 16], new scales [M], the new weight): random blocks, the
    first and the last, and neighbours sharing a scale word changed."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.rand(q.scales.shape, generator=g) < share
    pick.view(-1)[[0, 1, 2, 9, pick.numel() - 1]] = True
    index = pick.nonzero().to(torch.int32)
    index = index[torch.randperm(index.shape[0], generator=g)]
    m = index.shape[0]
    codes = torch.randint(0, 256, (m, 16), generator=g, dtype=torch.uint8)
    codes[0] = q.codes.cpu().view(*q.scales.shape, 16)[tuple(index[0].long())]  # codes unchanged, scale changed
    scales = torch.randint(100, 140, (m,), generator=g, dtype=torch.uint8)
    new_codes, new_scales = q.codes.cpu().clone(), q.scales.cpu().clone()
    e, r, b = index.long().unbind(1)
    new_codes.view(*q.scales.shape, 16)[e, r, b] = codes
    new_scales[e, r, b] = scales
    new = common.MXFP4Tensor(new_codes.to(DEVICE), new_scales.to(DEVICE), q.profile)
    return index.to(DEVICE), codes.to(DEVICE), scales.to(DEVICE), new


def _live(q: common.MXFP4Tensor, kb_major: bool) -> torch.Tensor:
    """The codes as a layer stores them: kb-major bytes in a tensor of the canonical shape (hopper_triton)."""
    return to_kb_major(q.codes).reshape(q.codes.shape).contiguous() if kb_major else q.codes


@pytest.mark.parametrize("kb_major", [False, True], ids=["canonical", "kb-major"])
@pytest.mark.parametrize("per", [64, 128])
def test_stage_lanes_equal_the_new_weight_hashed_from_scratch(kb_major, per):
    q = _weight(0)
    index, codes, scales, new = _delta(q, 1)
    live_codes, live_scales = _live(q, kb_major), q.scales.clone()
    before = (live_codes.clone(), live_scales.clone())
    got = K.stage_blocks(index, codes, scales, live_codes, live_scales, kb_major=kb_major, reserved_low=LOW,
                         blocks_per_program=per)
    old_lanes, want = mxfp4_lanes(q), mxfp4_lanes(new)
    assert (got.outside, got.twice, got.nan, got.reserved) == (0, 0, 0, 0)
    assert moved_lanes(old_lanes[0], got.code_moves) == want[0]
    assert got.scale_lanes == want[1] == lanes(new.scales)
    assert got.experts == int(torch.unique(index[:, 0]).numel()) == E
    # nothing live was written
    assert torch.equal(live_codes, before[0]) and torch.equal(live_scales, before[1])


def test_stage_of_no_blocks_and_of_one_expert():
    q = _weight(2)
    empty = K.stage_blocks(torch.zeros(0, 3, dtype=torch.int64, device=DEVICE),
                           torch.zeros(0, 16, dtype=torch.uint8, device=DEVICE),
                           torch.zeros(0, dtype=torch.uint8, device=DEVICE), q.codes, q.scales, kb_major=False,
                           reserved_low=LOW)
    assert empty.code_moves == [0, 0] and empty.scale_lanes == mxfp4_lanes(q)[1] and empty.experts == 0
    index, codes, scales, _ = _delta(q, 3)
    mine = index[:, 0] == 1
    got = K.stage_blocks(index[mine].long(), codes[mine], scales[mine], q.codes, q.scales, kb_major=False,
                         reserved_low=LOW)
    assert got.experts == 1


@pytest.mark.parametrize("case", ["twice", "twice at bit 31", "nan", "reserved", "expert", "row", "block",
                                  "negative"])
def test_stage_counts_each_refusal(case):
    q = _weight(4)
    index, codes, scales, _ = _delta(q, 5)
    index, scales = index.clone(), scales.clone()
    want = {"outside": 0, "twice": 0, "nan": 0, "reserved": 0}
    if case == "twice":
        index = torch.cat((index, index[3:5]))
        codes, scales = torch.cat((codes, codes[3:5])), torch.cat((scales, scales[3:5]))
        want["twice"] = 2
    elif case == "twice at bit 31":  # block 31 is the top (sign) bit of the bitmap's first word
        at = torch.tensor([[0, 3, 7]], dtype=torch.int32, device=DEVICE)  # lin = 3 * 8 + 7 = 31
        index = torch.cat((at, index[:2], at))
        codes, scales = torch.cat((codes[:1], codes[:2], codes[:1])), torch.cat((scales[:1], scales[:2], scales[:1]))
        want["twice"] = 1 + int(((index[1:3] == at).all(1)).sum())
    elif case == "nan":
        scales[-1] = 0xFF
        want["nan"] = want["reserved"] = 1  # 0xFF is among the reserved bytes too
    elif case == "reserved":
        scales[0] = LOW
        scales[1] = 0xFE
        want["reserved"] = 2
    else:
        col, value = {"expert": (0, E), "row": (1, N), "block": (2, KDIM // 32), "negative": (1, -1)}[case]
        index[-1, col] = value
        want["outside"] = 1
    got = K.stage_blocks(index, codes, scales, q.codes, q.scales, kb_major=False, reserved_low=LOW)
    assert {f: getattr(got, f) for f in want} == want

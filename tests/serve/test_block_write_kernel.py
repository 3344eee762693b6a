"""Single blocks written into and checked in an engine layer's layout by kernels (common.kernels.block_write: a
block delta's commit on a GPU) against the layout's torch conversion, bit for bit, on canonical and kb-major codes,
under the Triton interpreter (natively on a GPU)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from common.grouped_gemm.layout import from_kb_major, kb_major_view, to_kb_major  # noqa: E402
from common.kernels import block_write as K  # noqa: E402
from common.kernels import interpreting  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
E, N, KDIM = 3, 24, 256


def _case(seed: int, m: int):
    """(canonical codes [E, N, K/2], scales, blocks [m, 3] distinct in random order, new codes [m, 16], scales [m])."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (E, N, KDIM // 2), generator=g, dtype=torch.uint8)
    scales = torch.randint(0, 256, (E, N, KDIM // 32), generator=g, dtype=torch.uint8)
    flat = torch.randperm(scales.numel(), generator=g)[:m]
    kb = KDIM // 32
    blocks = torch.stack((flat // (N * kb), flat // kb % N, flat % kb), 1)
    new = torch.randint(0, 256, (m, 16), generator=g, dtype=torch.uint8)
    new_s = torch.randint(0, 256, (m,), generator=g, dtype=torch.uint8)
    return [t.to(DEVICE) for t in (codes, scales, blocks, new, new_s)]


def _stored(codes: torch.Tensor, kb_major: bool) -> torch.Tensor:
    return to_kb_major(codes).reshape(codes.shape).contiguous() if kb_major else codes.clone()


def _canonical(stored: torch.Tensor, kb_major: bool) -> torch.Tensor:
    return from_kb_major(kb_major_view(stored)) if kb_major else stored


@pytest.mark.parametrize("kb_major", [False, True], ids=["canonical", "kb-major"])
@pytest.mark.parametrize("m, per", [(70, 64), (5, 64), (200, 128)])
def test_swap_writes_the_blocks_through_the_layout_and_returns_the_old_ones(kb_major, m, per):
    codes, scales, blocks, new, new_s = _case(m, m)
    live, live_s = _stored(codes, kb_major), scales.clone()
    old, old_s = K.swap_blocks(blocks, new, new_s, live, live_s, kb_major=kb_major, blocks_per_program=per)
    e, r, b = blocks.unbind(1)
    assert torch.equal(old, codes.view(E, N, -1, 16)[e, r, b]) and torch.equal(old_s, scales[e, r, b])
    want, want_s = codes.clone(), scales.clone()
    want.view(E, N, -1, 16)[e, r, b] = new
    want_s[e, r, b] = new_s
    assert torch.equal(_canonical(live, kb_major), want) and torch.equal(live_s, want_s)  # and nothing else moved
    assert K.blocks_equal(blocks, new, new_s, live, live_s, kb_major=kb_major, blocks_per_program=per)
    # swapped back: the weight is the one before, bit for bit
    K.swap_blocks(blocks, old, old_s, live, live_s, kb_major=kb_major, blocks_per_program=per)
    assert torch.equal(_canonical(live, kb_major), codes) and torch.equal(live_s, scales)


@pytest.mark.parametrize("kb_major", [False, True], ids=["canonical", "kb-major"])
@pytest.mark.parametrize("where", ["first code byte", "last code nibble", "scale"])
def test_blocks_equal_sees_one_differing_nibble_or_scale(kb_major, where):
    codes, scales, blocks, new, new_s = _case(7, 90)
    live, live_s = _stored(codes, kb_major), scales.clone()
    K.swap_blocks(blocks, new, new_s, live, live_s, kb_major=kb_major)
    want, want_s = new.clone(), new_s.clone()
    if where == "first code byte":
        want[0, 0] ^= 0x01
    elif where == "last code nibble":
        want[-1, 15] ^= 0x80
    else:
        want_s[45] ^= 0x40
    assert not K.blocks_equal(blocks, want, want_s, live, live_s, kb_major=kb_major)


def test_no_blocks():
    codes, scales, _, _, _ = _case(9, 1)
    none = torch.zeros(0, 3, dtype=torch.int64, device=DEVICE)
    old, old_s = K.swap_blocks(none, torch.zeros(0, 16, dtype=torch.uint8, device=DEVICE),
                               torch.zeros(0, dtype=torch.uint8, device=DEVICE), codes, scales, kb_major=False)
    assert old.shape == (0, 16) and old_s.shape == (0,)
    assert K.blocks_equal(none, old, old_s, codes, scales, kb_major=True)


_COMPILE = """
from common.grouped_gemm.aot import compile_sm90
from common.kernels.block_write import _check_kernel, _swap_kernel
from common.kernels.delta_stage import _stage_kernel
from common.fingerprint import LANES
from common.grouped_gemm._layout_kernel import TILE_KB, TILE_N, _convert_kernel

(a0, b0, m10, m20), (a1, b1, m11, m21) = LANES
types = {"index_ptr": "*i64", "codes_ptr": "*i32", "scales_ptr": "*u8", "live_ptr": "*i32", "live_s_ptr": "*u8",
         "old_ptr": "*i32", "old_s_ptr": "*u8", "from_ptr": "*i64", "to_ptr": "*i64", "out_ptr": "*i64",
         "groups_ptr": "*i64", "seen_ptr": "*i32", "copy_ptr": "*u8", "touched_ptr": "*i32", "stat_ptr": "*i64"}
stage_types = {**types, "codes_ptr": "*i64"}  # the index: long, as the stage passes it
lanes = dict(A0=a0, B0=b0, M10=m10, M20=m20, A1=a1, B1=b1, M11=m11, M21=m21, NAN=255)
sizes = []
try:
    for kb in (True, False):
        const = dict(KB_MAJOR=kb, NG_FROM=15, NG_TO=15, NG=15, BLOCKS=256, **lanes)
        for kernel, t in ((_swap_kernel, types), (_check_kernel, types), (_stage_kernel, stage_types)):
            sizes.append(len(compile_sm90(kernel, const, t, num_warps=4, num_stages=1).asm["cubin"]) > 0)
        # the whole-weight conversion shares the block helpers (_layout_kernel.block_to_kb_major / _from_)
        convert = dict(TO_KB=kb, NG=15, TILE_N=TILE_N, TILE_KB=TILE_KB)
        sizes.append(len(compile_sm90(_convert_kernel, convert, {"src_ptr": "*i32", "dst_ptr": "*i32",
                                                                "groups_ptr": "*i64"}, num_stages=1).asm["cubin"]) > 0)
except FileNotFoundError as exc:
    print("NO-PTXAS", exc)
    raise SystemExit(0)
print("ok", all(sizes), len(sizes))
"""


def test_block_kernels_compile_for_sm90():
    """The commit's and the stage's block kernels, and the whole-weight layout conversion that shares their block
    helpers, compile for sm_90 on both layouts (Triton's ptxas, no GPU): the interpreter runs Python, where a static
    branch or an atomic that the compiler rejects would still pass."""
    from tests.sm90 import compile_in_child

    out = compile_in_child(_COMPILE)
    assert out.split() == ["ok", "True", "8"], out

"""The one-pass Triton conversion between canonical and kb-major codes equals the torch conversion, bit for bit
(interpreter here; the CUDA dispatch of layout.to_kb_major/from_kb_major runs it natively on a GPU)."""

from __future__ import annotations

import pytest
import torch

from common.grouped_gemm import _layout_kernel as lk
from common.grouped_gemm.layout import SLOT_BITS, _kb_rows, from_kb_major_torch, to_kb_major, to_kb_major_torch


def _codes(e: int, n: int, kb: int, gen: torch.Generator) -> torch.Tensor:
    codes = torch.randint(0, 256, (e, n, kb * 16), dtype=torch.uint8, generator=gen)
    # adversarial bytes: all-zero and all-one blocks, every sign bit set, one lone bit per position
    codes[0, 0, :16] = 0
    codes[0, 0, 16:32] = 0xFF
    codes[-1, -1, :16] = 0x88
    codes[-1, 0, :16] = torch.tensor([1 << (j % 8) for j in range(16)], dtype=torch.uint8)
    return codes


@pytest.mark.parametrize("shape", [(2, 40, 10), (1, 32, 8), (3, 5, 1), (1, 1, 17)])
def test_kernel_equals_torch_both_ways(shape):
    gen = torch.Generator().manual_seed(hash(shape) % 2**31)
    codes = _codes(*shape, gen)
    kb = lk.convert(codes, SLOT_BITS, to_kb=True)
    ref = to_kb_major_torch(codes)
    assert kb.shape == ref.shape and kb.is_contiguous()
    assert torch.equal(kb, ref)
    back = lk.convert(kb, SLOT_BITS, to_kb=False)
    assert torch.equal(back, from_kb_major_torch(ref))
    assert torch.equal(back, codes)


def test_kernel_reads_a_non_contiguous_kb_view():
    gen = torch.Generator().manual_seed(7)
    codes = _codes(2, 8, 4, gen)
    kb = to_kb_major(codes)
    strided = torch.empty(2, 4, 8, 32, dtype=torch.uint8)[..., :16]
    strided.copy_(kb)
    assert not strided.is_contiguous()
    assert torch.equal(lk.convert(strided, SLOT_BITS, to_kb=False), codes)


def test_bit_map_matches_the_torch_layout_bit_by_bit():
    """Each of a block's 128 bits, set alone, lands where the kernel's byte transpose + word bit map puts it."""
    dest = lk.word_bit_map(SLOT_BITS)
    rows = torch.zeros(128, 16, dtype=torch.uint8)
    for p in range(128):
        rows[p, p // 8] = 1 << (p % 8)
    out = _kb_rows(rows)
    for p in range(128):
        word_i, bit_in_word = divmod(p, 32)  # canonical word i, byte t = bit_in_word // 8
        t, within = divmod(bit_in_word, 8)
        expect = 32 * t + dest[8 * word_i + within]  # transposed: word t, byte i
        got = [q for q in range(128) if out[p, q // 8] >> (q % 8) & 1]
        assert got == [expect], (p, got, expect)


def test_groups_rebuild_the_permutation():
    dest = lk.word_bit_map(SLOT_BITS)
    groups = lk.bit_groups(dest)
    assert len(groups) < 32  # grouping by distance saves work over one group per bit
    for s in range(32):
        moved = [((1 << s) & m) << left >> right for m, left, right in groups]
        assert sum(moved) == 1 << dest[s]


def test_empty_weight():
    codes = torch.zeros(0, 4, 32, dtype=torch.uint8)
    assert lk.convert(codes, SLOT_BITS, to_kb=True).shape == (0, 2, 4, 16)

"""One-pass Triton conversion between canonical and kb-major codes (common/grouped_gemm/layout.py), for the GPU.

The torch conversion unpacks every nibble to an int64 and moves the 32 bits of a word one at a time: about a hundred
full-size passes over memory. The engine converts whole weights on every sync (the staged bytes into the layout,
the served bytes back to canonical for the diff, the read-back check and the hashes), and on an H100 those passes
were 1.1 of the 1.2 s that syncing two DeepSeek-V4-Flash layers (856 MB) took (bench/RESULTS.md, refit). Here each
program reads a tile of 16-byte blocks once, and writes each converted block once.

Inside a block the conversion is two fixed permutations (layout.py's docstring has the why):
1. bytes: kb-major word t, byte i is canonical byte 4i + t (a 4x4 byte transpose of the block's 4 words, which is
   its own inverse);
2. bits: then every word's 32 bits are permuted alike (slot i + 4h, bit b of a word comes from bit 8i + 4h + b).
The bit permutation is applied as a few (mask, shift) groups, one per distance a bit moves, read from a tiny table
that `bit_groups` derives from the torch conversion itself, so the two cannot disagree on the layout.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

BLOCK_WORDS = 4  # 32-bit words of one 32-element block's 16 code bytes
TILE_N = 32  # weight rows per program
TILE_KB = 8  # K blocks per program: 128 contiguous canonical bytes per row, 512 contiguous kb-major bytes per block


@triton.jit
def _permute_bits(w, groups_ptr, NG: tl.constexpr):
    out = tl.zeros_like(w)
    for j in tl.static_range(NG):
        mask = tl.load(groups_ptr + 3 * j).to(tl.uint32)
        left = tl.load(groups_ptr + 3 * j + 1).to(tl.uint32)
        right = tl.load(groups_ptr + 3 * j + 2).to(tl.uint32)
        out |= ((w & mask) << left) >> right
    return out


@triton.jit
def _transpose_byte(c0, c1, c2, c3, T: tl.constexpr):
    """Word t of the byte-transposed block: byte i is byte t of word i."""
    return (((c0 >> (8 * T)) & 0xFF) | (((c1 >> (8 * T)) & 0xFF) << 8) | (((c2 >> (8 * T)) & 0xFF) << 16)
            | (((c3 >> (8 * T)) & 0xFF) << 24))


@triton.jit
def block_to_kb_major(c0, c1, c2, c3, groups_ptr, NG: tl.constexpr):
    """One block's four canonical int32 words (as uint32) -> its kb-major words: the byte transpose, then the bits
    (groups_ptr: the to_kb table)."""
    t0, t1 = _transpose_byte(c0, c1, c2, c3, 0), _transpose_byte(c0, c1, c2, c3, 1)
    t2, t3 = _transpose_byte(c0, c1, c2, c3, 2), _transpose_byte(c0, c1, c2, c3, 3)
    return (_permute_bits(t0, groups_ptr, NG), _permute_bits(t1, groups_ptr, NG),
            _permute_bits(t2, groups_ptr, NG), _permute_bits(t3, groups_ptr, NG))


@triton.jit
def block_from_kb_major(w0, w1, w2, w3, groups_ptr, NG: tl.constexpr):
    """The inverse: the bits back (groups_ptr: the from-kb table), then the byte transpose (its own inverse)."""
    p0, p1 = _permute_bits(w0, groups_ptr, NG), _permute_bits(w1, groups_ptr, NG)
    p2, p3 = _permute_bits(w2, groups_ptr, NG), _permute_bits(w3, groups_ptr, NG)
    return (_transpose_byte(p0, p1, p2, p3, 0), _transpose_byte(p0, p1, p2, p3, 1),
            _transpose_byte(p0, p1, p2, p3, 2), _transpose_byte(p0, p1, p2, p3, 3))


@triton.jit
def _convert_kernel(src_ptr, dst_ptr, groups_ptr, N, KB, TO_KB: tl.constexpr, NG: tl.constexpr,
                    TILE_N: tl.constexpr, TILE_KB: tl.constexpr):
    e = tl.program_id(0).to(tl.int64)
    n1 = tl.program_id(1) * TILE_N + tl.arange(0, TILE_N)
    kb1 = tl.program_id(2) * TILE_KB + tl.arange(0, TILE_KB)
    # The tile's last (fastest, thread-adjacent) axis runs along the SOURCE's contiguous blocks: kb in a canonical
    # row, n in a kb-major block row. Loads then coalesce and the strided side is the stores, which do not stall the
    # program (the first version kept kb last both ways: from kb-major it ran at a third of the speed, 485 vs 1424
    # GB/s on an H100).
    if TO_KB:
        n = n1[:, None]
        kb = kb1[None, :]
    else:
        n = n1[None, :]
        kb = kb1[:, None]
    ok = (n < N) & (kb < KB)
    canonical = ((e * N + n) * KB + kb) * 4  # first word of block (n, kb) in [E, N, KB, 4]
    kb_major = ((e * KB + kb) * N + n) * 4  # the same block in [E, KB, N, 4]
    src = canonical if TO_KB else kb_major
    dst = kb_major if TO_KB else canonical
    w0 = tl.load(src_ptr + src, mask=ok, other=0).to(tl.uint32, bitcast=True)
    w1 = tl.load(src_ptr + src + 1, mask=ok, other=0).to(tl.uint32, bitcast=True)
    w2 = tl.load(src_ptr + src + 2, mask=ok, other=0).to(tl.uint32, bitcast=True)
    w3 = tl.load(src_ptr + src + 3, mask=ok, other=0).to(tl.uint32, bitcast=True)
    if TO_KB:
        o0, o1, o2, o3 = block_to_kb_major(w0, w1, w2, w3, groups_ptr, NG)
    else:
        o0, o1, o2, o3 = block_from_kb_major(w0, w1, w2, w3, groups_ptr, NG)
    tl.store(dst_ptr + dst, o0.to(tl.int32, bitcast=True), mask=ok)
    tl.store(dst_ptr + dst + 1, o1.to(tl.int32, bitcast=True), mask=ok)
    tl.store(dst_ptr + dst + 2, o2.to(tl.int32, bitcast=True), mask=ok)
    tl.store(dst_ptr + dst + 3, o3.to(tl.int32, bitcast=True), mask=ok)


def word_bit_map(slot_bits: tuple[tuple[int, ...], ...]) -> list[int]:
    """dest[s]: where bit s of a byte-transposed word goes (byte i, nibble h, bit b = bit 8i + 4h + b is slot
    i + 4h's bit b, stored at slot_bits[i + 4h][b])."""
    dest = [0] * 32
    for i in range(4):
        for h in range(2):
            for b in range(4):
                dest[8 * i + 4 * h + b] = slot_bits[i + 4 * h][b]
    if sorted(dest) != list(range(32)):
        raise AssertionError(f"kb-major bit map is not a permutation of a word's bits: {dest}")
    return dest


def bit_groups(dest: list[int]) -> list[tuple[int, int, int]]:
    """The permutation dest as (source mask, left shift, right shift) groups, one per distance moved."""
    by_delta: dict[int, int] = {}
    for s, d in enumerate(dest):
        by_delta[d - s] = by_delta.get(d - s, 0) | (1 << s)
    return [(m, max(delta, 0), max(-delta, 0)) for delta, m in sorted(by_delta.items())]


@functools.lru_cache(maxsize=None)
def _groups_table(slot_bits: tuple[tuple[int, ...], ...], to_kb: bool, device: str) -> torch.Tensor:
    dest = word_bit_map(slot_bits)
    if not to_kb:
        inverse = [0] * 32
        for s, d in enumerate(dest):
            inverse[d] = s
        dest = inverse
    return torch.tensor(bit_groups(dest), dtype=torch.int64, device=device).flatten()


def convert(codes: torch.Tensor, slot_bits: tuple[tuple[int, ...], ...], to_kb: bool) -> torch.Tensor:
    """to_kb: canonical uint8 [E, N, K/2] -> kb-major [E, K/32, N, 16]; else the inverse. A new contiguous tensor.
    The caller (layout.to_kb_major / from_kb_major) has checked dtype and shape."""
    src = codes.contiguous()
    if to_kb:
        e, n, kh = src.shape
        kb = kh // 16
        out = torch.empty(e, kb, n, 16, dtype=torch.uint8, device=src.device)
    else:
        e, kb, n, _ = src.shape
        out = torch.empty(e, n, kb * 16, dtype=torch.uint8, device=src.device)
    if out.numel() == 0:
        return out
    groups = _groups_table(slot_bits, to_kb, str(src.device))
    grid = (e, triton.cdiv(n, TILE_N), triton.cdiv(kb, TILE_KB))
    _convert_kernel[grid](src.view(torch.int32), out.view(torch.int32), groups, n, kb, TO_KB=to_kb,
                          NG=groups.numel() // 3, TILE_N=TILE_N, TILE_KB=TILE_KB, num_warps=4)
    return out

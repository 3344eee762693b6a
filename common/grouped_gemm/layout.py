"""The K-block-major code layout of the forward GEMMs ("kb-major"), the Hopper engine's resident layout.

Canonical codes are [E, N, K/2]: a weight row's bytes are contiguous. Kb-major codes hold the same nibbles as
[E, K/32, N, 16]: for every 32-element scale block, the 16 code bytes (4 little-endian 32-bit words) of all N rows,
row after row; inside a block the elements are permuted (below) and inside each word their bits are scattered so
that the word decode needs few instructions (below). Scales stay canonical [E, N, K/32].

Why: a forward GEMM step reads a [rows, BLOCK_K] tile. Triton's pipeliner copies it to shared memory in the order
of the load, and the decode reads it back with 8-row ldmatrix instructions. With canonical rows the shared rows
are BLOCK_K/2 bytes apart and those 8 rows fall in the same banks (8-way conflicts at BLOCK_K = 256, measured with
Nsight Compute on an H100: 64% of all shared-memory wavefronts of the gated GEMM were conflict replays). Loading
the tile as [BLOCK_K/32, rows, 16 bytes] fixes the shared side, but from canonical memory each warp's 16-byte
copies then touch 32 different rows (uncoalesced); from kb-major memory the same copies are contiguous. Measured
at DeepSeek-V4-Flash decode sizes: the gated GEMM 11% faster (bench/RESULTS.md, fifth round).

Why the nibble permutation: the word decode feeds reduction slot 8i + 2t + h the element in word t, slot i + 4h
(interleave.py). On canonical codes that is a shuffled K order, and the activations had to be copied into it
(`interleave_k`, a kernel launch per layer: 3.5% of the DeepSeek-V4-Flash decode layer). Stored permuted (slot
i + 4h of word t holds element 8i + 2t + h), the shuffle cancels: the word decode reduces in the natural order and
reads the layer input as it comes.

Why the bits of a word are scattered (SLOT_BITS): the decode turns slots (i, i + 4) of a word into one bf16x2
register whose halves carry an E2M1 value's sign at bf16 bit 15 and its three magnitude bits at bits 8..6
(DECODE_MASK; the scale multiply fixes the exponent). From a nibble that costs two shifts and two masks per pair,
because sign and magnitude sit 3 bits apart in a nibble and 7 bits apart in the bf16. Kb-major words therefore
store every slot's four bits where one cheap step moves them into place: pair 0 already sits there (one mask),
pairs 1 and 2 need a rotation by 10 and 13 bits (rotate, mask), and pair 3 a multiply by 2^3 + 2^8 + 2^14 whose
three shifted copies never overlap (mask, multiply, mask). 8 integer instructions per word instead of 16: the
word decode GEMMs are issue-bound at decode sizes (Nsight Compute on an H100: 73% issue slots busy, ALU the
busiest pipe; bench/RESULTS.md, seventh round). No four rotations of the mask tile a 32-bit word (checked
exhaustively), hence the multiply for the last pair.

The byte decode cannot read these words, so the forward kernels read kb-major codes with the word decode at every
batch size (ops._use_words). The conversion is a bit permutation: exact, and undone by from_kb_major (the engine's
sync and hashing read the canonical bytes back through common.moe.KB_MAJOR, the layout object recorded on the
layer). CUDA tensors convert in one Triton pass (_layout_kernel.py), others with the torch ops below. Only the
forward kernels read kb-major codes; the dx kernel needs the canonical layout.
"""

from __future__ import annotations

import torch

from .. import e2m1
from ..errors import DTypeError, ShapeError
from .interleave import deinterleave_k, interleave_k

BLOCK_BYTES = 16  # code bytes of one 32-element scale block

# The bf16x2 bits one decoded pair of slots lands in: sign 15 / 31, magnitude (mantissa, exponent bits) 6..8 / 22..24.
DECODE_MASK = 0x81C081C0
# How the decode of pair i (slots i and i + 4 of a word) moves its bits onto DECODE_MASK: pair 0 is stored in place,
# pairs 1 and 2 rotated right by PAIR_ROTATE[i] (the decode rotates them back); pair 3's E2M1 bits 0..3 sit
# PAIR3_SHIFTS[b] below their targets, and one multiply by the sum of those powers of two (three copies that never
# overlap) moves them all after a mask keeps pair 3 alone.
PAIR_ROTATE = (0, 10, 13)
PAIR3_SHIFTS = (3, 3, 8, 14)
PAIR3_MULTIPLIER = sum(1 << s for s in set(PAIR3_SHIFTS))
_TARGET = ((6, 7, 8, 15), (22, 23, 24, 31))  # bf16x2 half h: E2M1 bits 0..3 (mantissa, exponent lo, hi, sign)


def _slot_bits() -> tuple[tuple[int, ...], ...]:
    """SLOT_BITS[n][b]: the word bit holding bit b of slot n (n = i + 4h: pair i, bf16x2 half h)."""
    table = [[0] * 4 for _ in range(8)]
    for i in range(4):
        for h in range(2):
            for b in range(4):
                t = _TARGET[h][b]
                table[i + 4 * h][b] = (t - PAIR_ROTATE[i]) % 32 if i < 3 else t - PAIR3_SHIFTS[b]
    if sorted(bit for slot in table for bit in slot) != list(range(32)):
        raise AssertionError(f"kb-major slot bits do not partition the word: {table}")
    return tuple(tuple(r) for r in table)


SLOT_BITS = _slot_bits()
PAIR3_MASK = sum(1 << b for n in (3, 7) for b in SLOT_BITS[n])


def _words_from_slots(nib: torch.Tensor) -> torch.Tensor:
    """E2M1 nibbles [R, K] in slot order (slot n of word w at column 8w + n) -> uint8 [R, K/2], each word's bits
    placed per SLOT_BITS and stored little-endian."""
    r, k = nib.shape
    v = nib.reshape(r, k // 8, 8).to(torch.int64)
    word = torch.zeros(r, k // 8, dtype=torch.int64, device=nib.device)
    for n in range(8):
        for b in range(4):
            word |= ((v[..., n] >> b) & 1) << SLOT_BITS[n][b]
    shifts = torch.arange(0, 32, 8, device=nib.device)
    return ((word[..., None] >> shifts) & 0xFF).to(torch.uint8).reshape(r, k // 2)


def _slots_from_words(codes: torch.Tensor) -> torch.Tensor:
    """The inverse of _words_from_slots: uint8 [R, K/2] kb-major bytes -> nibbles [R, K] in slot order."""
    r, kh = codes.shape
    b = codes.reshape(r, kh // 4, 4).to(torch.int64)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    nib = torch.zeros(r, kh // 4, 8, dtype=torch.int64, device=codes.device)
    for n in range(8):
        for bit in range(4):
            nib[..., n] |= ((word >> SLOT_BITS[n][bit]) & 1) << bit
    return nib.reshape(r, kh * 2).to(torch.uint8)


def _kb_rows(rows: torch.Tensor) -> torch.Tensor:
    """uint8 [R, K/2] canonical code rows -> the same rows as kb-major words (slot i + 4h of word t holds element
    8i + 2t + h of its block, its bits placed per SLOT_BITS)."""
    return _words_from_slots(deinterleave_k(e2m1.unpack(rows)))


def _canonical_rows(rows: torch.Tensor) -> torch.Tensor:
    """The inverse of _kb_rows."""
    return e2m1.pack(interleave_k(_slots_from_words(rows)))


def is_kb_major(codes: torch.Tensor) -> bool:
    """Kb-major codes are 4-D [E, K/32, N, 16]; canonical ones 3-D [E, N, K/2]."""
    return codes.dim() == 4


def _check_canonical(codes: torch.Tensor, name: str) -> None:
    if codes.dtype != torch.uint8:
        raise DTypeError(f"tensor '{name}': codes must be uint8, got {codes.dtype}")
    if codes.dim() != 3 or codes.shape[2] % BLOCK_BYTES:
        raise ShapeError(f"tensor '{name}': expected canonical codes [E, N, K/2] with K a multiple of 32, got "
                         f"{tuple(codes.shape)}")


def to_kb_major(codes: torch.Tensor, name: str = "codes") -> torch.Tensor:
    """Canonical [E, N, K/2] -> kb-major [E, K/32, N, 16] (a new contiguous tensor)."""
    _check_canonical(codes, name)
    if codes.is_cuda:
        from ._layout_kernel import convert

        return convert(codes, SLOT_BITS, to_kb=True)
    return to_kb_major_torch(codes)


def to_kb_major_torch(codes: torch.Tensor) -> torch.Tensor:
    """to_kb_major in torch ops, on any device (the CPU path; the kernel's reference and benchmark baseline)."""
    e, n, kh = codes.shape
    stored = _kb_rows(codes.reshape(e * n, kh))
    return stored.reshape(e, n, kh // BLOCK_BYTES, BLOCK_BYTES).permute(0, 2, 1, 3).contiguous()


def from_kb_major(codes: torch.Tensor, name: str = "codes") -> torch.Tensor:
    """Kb-major [E, K/32, N, 16] -> canonical [E, N, K/2] (a new contiguous tensor)."""
    if codes.dtype != torch.uint8 or codes.dim() != 4 or codes.shape[3] != BLOCK_BYTES:
        raise ShapeError(f"tensor '{name}': expected kb-major uint8 codes [E, K/32, N, {BLOCK_BYTES}], got "
                         f"{codes.dtype} {tuple(codes.shape)}")
    if codes.is_cuda:
        from ._layout_kernel import convert

        return convert(codes, SLOT_BITS, to_kb=False)
    return from_kb_major_torch(codes)


def from_kb_major_torch(codes: torch.Tensor) -> torch.Tensor:
    """from_kb_major in torch ops, on any device."""
    e, kb, n, _ = codes.shape
    rows = codes.permute(0, 2, 1, 3).reshape(e * n, kb * BLOCK_BYTES)
    return _canonical_rows(rows).reshape(e, n, kb * BLOCK_BYTES)


def kb_major_view(storage: torch.Tensor, name: str = "codes") -> torch.Tensor:
    """The kb-major [E, K/32, N, 16] view of a contiguous [E, N, K/2] buffer that HOLDS kb-major bytes (an engine
    parameter converted in place: its shape stays canonical, its bytes are not)."""
    _check_canonical(storage, name)
    if not storage.is_contiguous():
        raise ShapeError(f"tensor '{name}': a kb-major buffer must be contiguous")
    e, n, kh = storage.shape
    return storage.view(e, kh // BLOCK_BYTES, n, BLOCK_BYTES)


def convert_in_place(storage: torch.Tensor, to_kb: bool, experts: torch.Tensor | None = None,
                     name: str = "codes") -> None:
    """Rewrite the bytes of a contiguous [E, N, K/2] buffer from canonical to kb-major (to_kb) or back, one
    expert at a time (a temporary of one expert's bytes, not of the whole weight); experts: local expert ids to
    convert (default all). Converting twice in the same direction scrambles the bytes: engine layers go through
    common.moe.convert_layer, which records the layout on the layer and refuses a second conversion."""
    _check_canonical(storage, name)
    if not storage.is_contiguous():
        raise ShapeError(f"tensor '{name}': in-place conversion needs a contiguous buffer")
    e, n, kh = storage.shape
    ids = range(e) if experts is None else [int(i) for i in experts.tolist()]
    for i in ids:
        flat = storage[i]
        if to_kb:
            new = to_kb_major(flat.view(1, n, kh), name)
        else:
            new = from_kb_major(flat.view(1, kh // BLOCK_BYTES, n, BLOCK_BYTES), name)
        flat.copy_(new.view(n, kh))

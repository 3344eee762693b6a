"""The K-block-major code layout of the forward GEMMs ("kb-major"), the Hopper engine's resident layout.

Canonical codes are [E, N, K/2]: a weight row's bytes are contiguous. Kb-major codes hold the same nibbles as
[E, K/32, N, 16]: for every 32-element scale block, the 16 code bytes of all N rows, row after row; inside a block
the nibbles are permuted so that stored nibble p holds element 8(p%4) + 2(p//8) + (p//4)%2 (the block's
`deinterleave_k` order). Scales stay canonical [E, N, K/32].

Why: a forward GEMM step reads a [rows, BLOCK_K] tile. Triton's pipeliner copies it to shared memory in the order
of the load, and the decode reads it back with 8-row ldmatrix instructions. With canonical rows the shared rows
are BLOCK_K/2 bytes apart and those 8 rows fall in the same banks (8-way conflicts at BLOCK_K = 256, measured with
Nsight Compute on an H100: 64% of all shared-memory wavefronts of the gated GEMM were conflict replays). Loading
the tile as [BLOCK_K/32, rows, 16 bytes] fixes the shared side, but from canonical memory each warp's 16-byte
copies then touch 32 different rows (uncoalesced); from kb-major memory the same copies are contiguous. Measured
at DeepSeek-V4-Flash decode sizes: the gated GEMM 11% faster (bench/RESULTS.md, fifth round).

Why the nibble permutation: the word decode feeds reduction slot 8i + 2t + h the stored nibble 8t + i + 4h
(interleave.py). On canonical codes that is a shuffled K order, and the activations had to be copied into it
(`interleave_k`, a kernel launch per layer: 3.5% of the DeepSeek-V4-Flash decode layer). Stored permuted, the
shuffle cancels: the word decode (the engine's decode sizes) reduces in the natural order and reads the layer
input as it comes; the byte decode (large batches) reads the activations in `deinterleave_k`'s order instead.

The conversion is a nibble permutation: exact, and undone by from_kb_major (the engine's sync and hashing read the
canonical bytes back). Only the forward kernels read kb-major codes; the dx kernel and tl.dot_scaled need the
canonical layout.
"""

from __future__ import annotations

import torch

from .. import e2m1
from ..errors import DTypeError, ShapeError
from .interleave import deinterleave_k, interleave_k

BLOCK_BYTES = 16  # code bytes of one 32-element scale block


def _permute_nibbles(rows: torch.Tensor, forward: bool) -> torch.Tensor:
    """uint8 [R, K/2] code rows -> the same rows with every block's nibbles in the stored order of the kb-major
    layout (forward) or back in the natural order."""
    nib = e2m1.unpack(rows)
    return e2m1.pack(deinterleave_k(nib) if forward else interleave_k(nib))


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
    e, n, kh = codes.shape
    stored = _permute_nibbles(codes.reshape(e * n, kh), forward=True)
    return stored.reshape(e, n, kh // BLOCK_BYTES, BLOCK_BYTES).permute(0, 2, 1, 3).contiguous()


def from_kb_major(codes: torch.Tensor, name: str = "codes") -> torch.Tensor:
    """Kb-major [E, K/32, N, 16] -> canonical [E, N, K/2] (a new contiguous tensor)."""
    if codes.dtype != torch.uint8 or codes.dim() != 4 or codes.shape[3] != BLOCK_BYTES:
        raise ShapeError(f"tensor '{name}': expected kb-major uint8 codes [E, K/32, N, {BLOCK_BYTES}], got "
                         f"{codes.dtype} {tuple(codes.shape)}")
    e, kb, n, _ = codes.shape
    rows = codes.permute(0, 2, 1, 3).reshape(e * n, kb * BLOCK_BYTES)
    return _permute_nibbles(rows, forward=False).reshape(e, n, kb * BLOCK_BYTES)


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
    convert (default all). Converting twice in the same direction scrambles the bytes: callers track the state."""
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

"""A 128-bit fingerprint of a tensor's bytes, computed on the device that holds them: the core of the audit hash.

A weight sync must prove the engine serves the learner's bytes without copying hundreds of MB per layer to the host
to hash them there (sha256 on the host runs at about 1 GB/s; a refit moves tens of GB/s). The bytes, zero-padded to
whole 64-bit words w_i, are mixed with their position i into two independent lanes:

    x = (i * A + B) ^ w_i;   x = x * M1;   x = x ^ (x >>> 32);   x = x * M2;   lane = sum of x   (all mod 2^64)

Modular sums are order independent, so a Triton kernel (CUDA; blocks sum in any order) and the torch loop below
(any device, e.g. the CPU) give the same value; the position term makes moved, swapped and zeroed words visible; the
multiply-xorshift-multiply avalanche spreads a one-bit change over the whole word before it is summed. This detects
bugs and corruption (a random change collides with probability about 2^-64 per lane), not an adversary crafting
collisions: it is an audit, not a signature.
"""

from __future__ import annotations

import torch

# odd 64-bit constants below 2^63, so that they are valid int64 scalars in torch and Triton
LANES = ((0x2545F4914F6CDD1D, 0x14057B7EF767814F, 0x5851F42D4C957F2D, 0x3C6EF372FE94F82B),
         (0x6C62272E07BB0142, 0x27BB2EE687B0B0FD, 0x1B03738712FAD5C9, 0x4CF5AD432745937F))
_MASK32 = 0xFFFFFFFF
_CHUNK_WORDS = 1 << 22  # torch path: 32 MiB of words at a time, so temporaries stay bounded


def words_of(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as int64 words (little endian, zero padded), 1-D, on its device."""
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad or flat.storage_offset() % 8:
        flat = torch.cat((flat, flat.new_zeros(pad)))  # a fresh, aligned copy
    return flat.view(torch.int64)


def _lanes_torch(words: torch.Tensor) -> list[int]:
    sums = [torch.zeros((), dtype=torch.int64, device=words.device) for _ in LANES]
    for start in range(0, words.numel(), _CHUNK_WORDS):
        w = words[start:start + _CHUNK_WORDS]
        idx = torch.arange(start, start + w.numel(), dtype=torch.int64, device=w.device)
        for lane, (a, b, m1, m2) in enumerate(LANES):
            x = torch.bitwise_xor(idx * a + b, w) * m1
            x = torch.bitwise_xor(x, torch.bitwise_and(x >> 32, _MASK32))  # a logical shift: mask the sign's copies
            sums[lane] += (x * m2).sum()
    return [int(s) for s in sums]


def lanes(t: torch.Tensor) -> list[int]:
    """The two lane sums (signed int64 values) of the tensor's bytes."""
    words = words_of(t)
    if words.numel() == 0:
        return [0, 0]
    if words.is_cuda:
        from .kernels.fingerprint import lanes_triton

        return lanes_triton(words)
    return _lanes_torch(words)


def fingerprint(t: torch.Tensor) -> bytes:
    """24 bytes: both lanes and the byte count (so zero padding cannot make two lengths collide)."""
    nbytes = t.numel() * t.element_size()
    return b"".join(int(v).to_bytes(8, "little", signed=True) for v in lanes(t)) + nbytes.to_bytes(8, "little")

"""Audit of packed MXFP4 tensors: a stable hash per tensor, and a diff that says how two tensors differ.

After every weight sync the learner and the engine hash the expert tensors they hold; equal hashes prove equal
bytes (up to the fingerprint's collision odds, common/fingerprint.py: the bytes are fingerprinted on the device that
holds them, in one pass, and only the fingerprints are hashed with sha256 on the host). When they differ, `diff` reports the code-flip rate (fraction of differing 4-bit codes), the histogram of
scale-exponent changes and the first differing (expert, row, block), which usually points at the cause (a layout
bug moves whole rows, a profile mismatch shifts scales by one, a stale expert differs everywhere).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping

import torch

from . import constants as C
from .errors import ShapeError
from .fingerprint import fingerprint, fingerprint_of_lanes, lanes
from .tensor import MXFP4Tensor

# v2: device fingerprints of the bytes (v1 hashed the bytes themselves on the host, ~1 GB/s). Bump the version if
# the hashed header or the fingerprint changes: a learner and an engine of different versions then disagree loudly.
HASH_DOMAIN = b"mxfp4_rl/audit/v2\0"


def _feed(h, t: torch.Tensor) -> None:
    h.update(fingerprint(t))


def tensor_hash(q: MXFP4Tensor) -> str:
    """sha256 hex digest over (domain, dtype, logical shape, profile) + fingerprint(codes) + fingerprint(scales).

    Device- and stride-independent: the same bytes give the same hash on CPU and GPU, contiguous or not.
    """
    return hash_of_lanes(q.shape, q.profile, *mxfp4_lanes(q), q.codes.numel(), q.scales.numel())


def mxfp4_lanes(q: MXFP4Tensor) -> tuple[list[int], list[int]]:
    """The fingerprint lanes of the codes and of the scales (what tensor_hash hashes, besides the header): kept by
    an engine so that a sparse (block delta) update rehashes the changed words only (fingerprint.update_lanes)."""
    return lanes(q.codes), lanes(q.scales)


def block_lin(blocks: torch.Tensor, rows: int, kblocks: int) -> torch.Tensor:
    """Flat index [M] (int64) of the blocks (expert, row, block) [M, 3] of a weight of `rows` rows and `kblocks`
    blocks a row: the byte of each block's scale, and the row of its 16 code bytes in the codes viewed [-1, 16]."""
    b = blocks.to(torch.int64)
    return (b[:, 0] * rows + b[:, 1]) * kblocks + b[:, 2]


def block_words(blocks: torch.Tensor, rows: int, kblocks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the blocks (expert, row, block) [M, 3] of a canonical MXFP4 weight of `rows` rows and `kblocks` blocks a
    row sit among the 64-bit words its fingerprint sums (common.fingerprint.words_of): (lin [M], each block's flat
    index, i.e. the byte of its scale; its code words [2M], 2 lin and 2 lin + 1, as its 16 code bytes start at byte
    16 lin; the scale words [U], sorted and unique: word lin // 8 holds scale byte lin). The learner's and the
    engine's sparse rehash of a delta both place the blocks through this."""
    lin = block_lin(blocks, rows, kblocks)
    return lin, torch.stack((2 * lin, 2 * lin + 1), 1).reshape(-1), torch.unique(lin // 8)


def mxfp4_lanes_after(lane_values: tuple[list[int], list[int]], old: MXFP4Tensor, new: MXFP4Tensor,
                      blocks: torch.Tensor) -> tuple[list[int], list[int]]:
    """The lanes of `new`, given the lanes of `old` and the blocks [M, 3] (expert, row, block) where they may differ
    (every other block equal): only those blocks' code words and scale words are fingerprinted."""
    from .fingerprint import update_lanes_of, words_of

    _, code_words, scale_words = block_words(blocks.to(new.codes.device), *new.scales.shape[1:])
    oc, nc = words_of(old.codes), words_of(new.codes)
    os_, ns = words_of(old.scales), words_of(new.scales)
    pick = torch.Tensor.index_select  # a single-index gather (advanced indexing is several times slower on a CPU)
    codes, scales = update_lanes_of([(lane_values[0], code_words, pick(oc, 0, code_words), pick(nc, 0, code_words)),
                                     (lane_values[1], scale_words, pick(os_, 0, scale_words),
                                      pick(ns, 0, scale_words))])
    return codes, scales


def hash_of_lanes(shape, profile: str, code_lanes: list[int], scale_lanes: list[int], code_bytes: int,
                  scale_bytes: int) -> str:
    """tensor_hash of an MXFP4 tensor given its shape, profile and the lanes and byte counts of codes and scales."""
    header = {"format": "mxfp4", "dtype": "uint8", "block_size": C.BLOCK_SIZE, "shape": list(shape),
              "profile": profile}
    h = hashlib.sha256(HASH_DOMAIN)
    h.update(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    h.update(fingerprint_of_lanes(code_lanes, code_bytes))
    h.update(fingerprint_of_lanes(scale_lanes, scale_bytes))
    return h.hexdigest()


def dense_hash(kind: str, *tensors: torch.Tensor) -> str:
    """sha256 hex digest over (domain, kind, each tensor's dtype and shape) + each tensor's fingerprint: the audit hash
    of float tensors a sync carries unquantized (expert biases, expert LoRA factors, non-expert parameters).
    Bytes, not values: -0.0 and +0.0 hash differently, as they are different weights to a bit-exactness claim."""
    header = {"format": "dense", "kind": kind,
              "tensors": [[str(t.dtype).removeprefix("torch."), list(t.shape)] for t in tensors]}
    h = hashlib.sha256(HASH_DOMAIN)
    h.update(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    for t in tensors:
        _feed(h, t)
    return h.hexdigest()


def audit_hashes(mapping: Mapping) -> dict:
    """{key: tensor_hash(q)} for a mapping of MXFP4Tensors, keys kept in the mapping's order."""
    return {k: tensor_hash(v) for k, v in mapping.items()}


@dataclasses.dataclass(frozen=True)
class AuditDiff:
    """How b differs from a (same logical shape)."""

    shape: tuple[int, ...]
    profiles: tuple[str, str]
    codes_total: int  # number of 4-bit codes compared
    codes_flipped: int
    blocks_total: int
    scale_delta_hist: dict[int, int]  # b - a scale exponent -> count, only nonzero deltas
    blocks_differing: int  # blocks whose scale or any code differs
    first_diff: tuple[int, ...] | None  # (leading dims..., row, block) of the first differing block
    # Flips between +0 (0x0) and -0 (0x8): the bytes differ but the value does not (profiles keep the sign of zero,
    # so tiny updates around zero flip it without changing what the engine computes).
    zero_sign_flips: int = 0

    @property
    def code_flip_rate(self) -> float:
        return self.codes_flipped / self.codes_total if self.codes_total else 0.0

    @property
    def value_flip_rate(self) -> float:
        """Fraction of codes whose value changed (code flips minus +0/-0 flips)."""
        return (self.codes_flipped - self.zero_sign_flips) / self.codes_total if self.codes_total else 0.0

    @property
    def scales_changed(self) -> int:
        return sum(self.scale_delta_hist.values())

    @property
    def identical(self) -> bool:
        return self.blocks_differing == 0 and self.profiles[0] == self.profiles[1]

    def __str__(self) -> str:
        head = f"MXFP4 diff of shape {list(self.shape)}"
        if self.profiles[0] != self.profiles[1]:
            head += f" (profiles differ: {self.profiles[0]!r} vs {self.profiles[1]!r})"
        if self.blocks_differing == 0:
            return f"{head}: identical bytes ({self.blocks_total} blocks)"
        labels = ["expert"] * (len(self.first_diff) - 2) + ["row", "block"]
        where = ", ".join(f"{n} {i}" for n, i in zip(labels, self.first_diff))
        hist = ", ".join(f"{d:+d}: {c}" for d, c in sorted(self.scale_delta_hist.items())) or "none"
        return (f"{head}: {self.blocks_differing}/{self.blocks_total} blocks differ; "
                f"code flips {self.codes_flipped}/{self.codes_total} ({100 * self.code_flip_rate:.4f}%, "
                f"{self.zero_sign_flips} of them +0/-0 only); "
                f"scale exponent changes {self.scales_changed} ({hist}); first difference at {where}")


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold the same bytes (dtype and shape included). Compared as 64-bit words where both
    allow it: torch.equal on uint8 ran about 6x slower than on the int64 view on a 2-core CPU (16 MB: 5.5 ms vs
    0.9 ms), and the sync compares every byte it writes."""
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    a, b = (t.contiguous().reshape(-1).view(torch.uint8) for t in (a, b))  # bytes, not values (NaN, -0.0)
    if a.numel() % 8 == 0 and a.data_ptr() % 8 == 0 and b.data_ptr() % 8 == 0:
        a, b = a.view(torch.int64), b.view(torch.int64)
    return torch.equal(a, b)


def nibble_flips(xor: torch.Tensor) -> torch.Tensor:
    """Per byte of a code XOR: how many of its two 4-bit codes differ (0, 1 or 2)."""
    return ((xor & 0x0F) != 0).to(torch.int64) + ((xor >> 4) != 0).to(torch.int64)


def _zero_sign_flips(a: torch.Tensor, b: torch.Tensor) -> int:
    """Nibbles that are +-0 on both sides with different signs (0x0 <-> 0x8)."""
    total = 0
    for shift in (0, 4):
        na, nb = (a >> shift) & 0xF, (b >> shift) & 0xF
        total += int((((na & 0x7) == 0) & ((nb & 0x7) == 0) & (na != nb)).sum())
    return total


def diff(a: MXFP4Tensor, b: MXFP4Tensor) -> AuditDiff:
    """Compare two packed tensors of the same logical shape (b is moved to a's device)."""
    if a.shape != b.shape:
        raise ShapeError(f"audit diff: shapes differ, {list(a.shape)} vs {list(b.shape)}")
    bc, bs = b.codes.to(a.device), b.scales.to(a.device)
    xor = a.codes ^ bc
    flips = nibble_flips(xor)
    block_flips = flips.reshape(*flips.shape[:-1], -1, C.BLOCK_SIZE // 2).sum(-1)  # [..., N, K/32]
    delta = bs.to(torch.int16) - a.scales.to(torch.int16)
    differs = (block_flips > 0) | (delta != 0)
    values, counts = torch.unique(delta[delta != 0], return_counts=True)
    first = None
    if bool(differs.any()):
        flat = int(differs.reshape(-1).to(torch.uint8).argmax())
        first = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), differs.shape))
    return AuditDiff(
        shape=tuple(a.shape), profiles=(a.profile, b.profile), codes_total=a.shape.numel(),
        codes_flipped=int(flips.sum()), blocks_total=a.scales.numel(),
        scale_delta_hist={int(v): int(c) for v, c in zip(values.tolist(), counts.tolist())},
        blocks_differing=int(differs.sum()), first_diff=first, zero_sign_flips=_zero_sign_flips(a.codes, bc),
    )


def diff_mappings(a: Mapping, b: Mapping) -> dict:
    """{key: AuditDiff} for the keys whose tensors differ; a key present on one side only raises KeyError."""
    only = sorted(map(str, set(a) ^ set(b)))
    if only:
        raise KeyError(f"audit: keys present on one side only: {only[:10]}{' ...' if len(only) > 10 else ''}")
    return {k: d for k in a if not (d := diff(a[k], b[k])).identical}

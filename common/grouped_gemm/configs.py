"""Tile configurations of the grouped MXFP4 GEMMs (pure Python: readable and testable without a GPU).

On a GPU the kernels are autotuned per (rows-per-expert bucket, N, K) over the candidates below; on CPU under
TRITON_INTERPRET=1 a small fixed tile keeps the number of program instances (about 5 ms each) low.
Shared memory per pipeline stage, bf16 activations + uint8 codes: BLOCK_M*BLOCK_K*2 + BLOCK_N*BLOCK_K/2 bytes
(twice the code bytes for the gated kernel); every candidate stays under 160 KB at its stage count, inside the
227 KB an H100/H200 block may use. Triton skips a candidate that does not fit instead of failing.
"""

from __future__ import annotations

import dataclasses

KINDS = ("fwd", "gated", "dx")


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """BLOCK_M: rows (tokens) per tile; BLOCK_N: weight rows per tile (fwd) or reduction step (dx); BLOCK_K:
    reduction step (fwd) or output columns (dx). swap_ab puts the weight tile on the MMA's M side (few tokens)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    swap_ab: bool = False

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"TileConfig.{name} must be a power of two >= 16, got {v}")
        if self.block_k < 64:
            # block_k tiles the packed K axis in both kernels: at least 2 scale blocks per row
            raise ValueError(f"TileConfig.block_k must be >= 64 (it tiles the packed K axis), got {self.block_k}")

    def meta(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, SWAP_AB=self.swap_ab)


# Under the interpreter: few, mid-sized programs (the tests' K = 96 and 160 exercise a partial last K tile).
INTERPRETER_CONFIG = TileConfig(block_m=16, block_n=32, block_k=64, num_warps=4, num_stages=1)


def rows_bucket(rows: int, experts: int) -> int:
    """Average rows per expert rounded up to a power of two (the autotune key: decode vs prefill regimes)."""
    avg = max(1, -(-rows // max(1, experts)))
    return min(1 << (avg - 1).bit_length(), 4096)


def _small(kind: str) -> list[TileConfig]:
    # Few rows per expert: memory-bound on the packed weights. Weight rows on the MMA M side (swap_ab), deep K
    # steps so each program streams long contiguous code rows; 16 tokens is the MMA's smallest N.
    # fwd/gated: (BLOCK_N weight rows = MMA M, BLOCK_K reduction); dx: (BLOCK_N reduction, BLOCK_K output = MMA M).
    sizes = ((64, 256), (128, 128), (64, 128), (128, 256)) if kind != "dx" else ((128, 64), (64, 128), (128, 128),
                                                                                  (256, 64))
    return [TileConfig(16, bn, bk, 4, 3, swap_ab=True) for bn, bk in sizes]


def _medium(kind: str) -> list[TileConfig]:
    if kind == "dx":
        return [TileConfig(32, 128, 128, 4, 3, swap_ab=True), TileConfig(64, 64, 128, 4, 3, swap_ab=True),
                TileConfig(64, 64, 128, 4, 3)]
    return [TileConfig(32, 128, 128, 4, 3, swap_ab=True), TileConfig(64, 128, 128, 4, 3, swap_ab=True),
            TileConfig(64, 64, 128, 4, 3)]


def _large(kind: str) -> list[TileConfig]:
    # Many rows per expert: compute-bound. swap_ab puts the dequantized weight tile (in registers) on the MMA's A
    # side, which Hopper's wgmma reads from registers, and the activations on the B side (shared memory).
    if kind == "gated":  # two accumulators: keep BLOCK_M * BLOCK_N * 2 fp32 within the register file
        return [TileConfig(128, 64, 64, 8, 3), TileConfig(64, 128, 64, 4, 3), TileConfig(64, 128, 64, 8, 3, True),
                TileConfig(128, 64, 128, 8, 3, True)]
    if kind == "dx":  # (BLOCK_N reduction, BLOCK_K output)
        return [TileConfig(128, 64, 128, 8, 3), TileConfig(128, 64, 256, 8, 3), TileConfig(128, 64, 128, 8, 3, True),
                TileConfig(64, 64, 256, 8, 3, True)]
    return [TileConfig(128, 128, 64, 8, 3), TileConfig(128, 128, 64, 4, 4), TileConfig(128, 128, 64, 8, 3, True),
            TileConfig(64, 128, 128, 4, 3, True)]


def candidates(kind: str, bucket: int) -> list[TileConfig]:
    """Autotune candidates for a kernel kind at a rows-per-expert bucket."""
    if kind not in KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}; choose one of {KINDS}")
    if bucket <= 16:
        return _small(kind)
    if bucket <= 64:
        return _medium(kind)
    return _large(kind)


def all_candidates(kind: str) -> list[TileConfig]:
    seen: dict[TileConfig, None] = {}
    for b in (1, 64, 4096):
        for c in candidates(kind, b):
            seen[c] = None
    return list(seen)

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
    reduction step (fwd) or output columns (dx). swap_ab puts the weight tile on the MMA's M side (few tokens).
    max_regs caps the registers per thread (ptxas .maxnreg; None: the compiler's choice), which trades spills for
    one more resident block per SM."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    swap_ab: bool = False
    max_regs: int | None = None

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"TileConfig.{name} must be a power of two >= 16, got {v}")
        if self.max_regs is not None and not (24 <= self.max_regs <= 255 and self.max_regs % 8 == 0):
            raise ValueError(f"TileConfig.max_regs must be a multiple of 8 in [24, 255], got {self.max_regs}")
        if self.block_k < 64:
            # block_k tiles the packed K axis in both kernels: at least 2 scale blocks per row
            raise ValueError(f"TileConfig.block_k must be >= 64 (it tiles the packed K axis), got {self.block_k}")

    @property
    def word_pairs(self) -> bool:
        """Whether the forward's word decode may run its bf16x2 PTX: the PTX writes a word's nibbles i and i + 4
        into one register, which is the pair the MMA reads only when the weight tile is wgmma's register operand
        (swap_ab, >= 64 weight rows per warpgroup of 4 warps). Elsewhere (measured on an H100: 32-row swap_ab
        tiles) Triton lays the pairs out differently and the kernel uses the elementwise fp32 decode instead."""
        return self.swap_ab and self.num_warps == 4 and self.block_n >= 64

    def meta(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, SWAP_AB=self.swap_ab,
                    WORD_PAIRS=self.word_pairs)


# Under the interpreter: few, mid-sized programs (the tests' K = 96 and 160 exercise a partial last K tile).
INTERPRETER_CONFIG = TileConfig(block_m=16, block_n=32, block_k=64, num_warps=4, num_stages=1)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of host ints. Launch paths use these two rather than triton.cdiv / triton.next_power_of_2,
    which triton 3.9 wraps as constexpr functions at about 4 us of host time per call."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n for n >= 1, 0 for 0 (as triton.next_power_of_2)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


MMA_MIN_K = 16  # Hopper's bf16 MMA reduces >= 16 along K


def padded_rank(r: int) -> int:
    """The LoRA rank the kernels compute with: r padded by zero columns to a power of two >= MMA_MIN_K (the
    grouped GEMMs' fused LoRA terms pad to it on every call; the engine keeps factor copies at it)."""
    return max(MMA_MIN_K, next_pow2(int(r)))


def rows_bucket(rows: int, experts: int) -> int:
    """Average rows per expert rounded up to a power of two (the autotune key: decode vs prefill regimes)."""
    avg = max(1, cdiv(rows, max(1, experts)))
    return min(1 << (avg - 1).bit_length(), 4096)


def _small(kind: str) -> list[TileConfig]:
    # Few rows per expert: memory-bound on the packed weights. Weight rows on the MMA M side (swap_ab); 16 tokens
    # is the MMA's smallest N. dx: (BLOCK_N reduction, BLOCK_K output = MMA M).
    if kind == "dx":
        return [TileConfig(16, bn, bk, 4, 3, swap_ab=True) for bn, bk in ((128, 64), (64, 128), (128, 128), (256, 64))] \
            + [TileConfig(16, 32, 256, 4, 4, swap_ab=True), TileConfig(16, 64, 128, 4, 5, swap_ab=True)]
    # fwd/gated: (BLOCK_N weight rows = MMA M, BLOCK_K reduction, stages), the fastest tiles of bench/sweep_tiles.py
    # on an H100 (bench/RESULTS.md, fourth round): 64-row tiles keep 3-4 blocks per SM; BLOCK_K = 64 divides
    # gpt-oss's K = 2880, so its weight loads need no K mask (EVEN_K) and vectorize.
    # Register-capped twins (max_regs 128: four blocks per SM instead of three) end the DeepSeek-V4-Flash gated
    # GEMM's 1024 busy tiles in two waves instead of three (sixth round).
    tiles = ((64, 256, 3), (64, 128, 4), (128, 128, 3), (128, 128, 4), (64, 64, 6), (128, 64, 4))
    capped = ((64, 128, 3), (64, 128, 4))
    return ([TileConfig(16, bn, bk, 4, ns, swap_ab=True) for bn, bk, ns in tiles]
            + [TileConfig(16, bn, bk, 4, ns, swap_ab=True, max_regs=128)
               for bn, bk, ns in capped])


def _medium(kind: str) -> list[TileConfig]:
    # The first of each list won a CUDA-graph sweep of the learner's GEMMs at DeepSeek-V4-Flash 128 / 256 tokens
    # (24 / 48 rows per expert) on an H100 (bench/RESULTS.md, eighth round), 5-12% ahead of the earlier picks.
    if kind == "dx":
        return [TileConfig(32, 64, 128, 4, 3, swap_ab=True), TileConfig(64, 128, 128, 4, 3),
                TileConfig(64, 64, 256, 4, 3, swap_ab=True), TileConfig(32, 128, 128, 4, 3, swap_ab=True),
                TileConfig(64, 64, 128, 4, 3, swap_ab=True), TileConfig(64, 64, 128, 4, 3)]
    # 16-row tiles too: an expert's row tiles run side by side (row tiles vary fastest) and share its weight
    # tiles through L2
    return [TileConfig(64, 128, 64, 4, 3, swap_ab=True), TileConfig(64, 256, 64, 4, 3, swap_ab=True),
            TileConfig(32, 64, 128, 4, 3, swap_ab=True), TileConfig(32, 128, 128, 4, 3, swap_ab=True),
            TileConfig(64, 128, 128, 4, 3, swap_ab=True), TileConfig(64, 64, 128, 4, 3),
            TileConfig(16, 64, 256, 4, 3, swap_ab=True), TileConfig(16, 128, 128, 4, 4, swap_ab=True)]


# The gated GEMM's word decode runs up to this bucket (ops.WORDS_MAX_BUCKET); its 4-warp word tile won there.
_GATED_WORD_TILE = TileConfig(64, 128, 64, 4, 3, swap_ab=True)
GATED_WORDS_MAX_BUCKET = 256


def _large(kind: str, bucket: int) -> list[TileConfig]:
    # Many rows per expert: compute-bound. swap_ab puts the dequantized weight tile (in registers) on the MMA's A
    # side, which Hopper's wgmma reads from registers, and the activations on the B side (shared memory).
    # The 8-warp swap_ab tiles added in the seventh round are the fastest at DeepSeek-V4-Flash 4096 tokens on an
    # H100 (bench/RESULTS.md: byte decode, each GEMM from a CUDA graph); the 4-warp swap_ab tiles run the bf16x2
    # word decode (TileConfig.word_pairs), the only one that reads the engine's kb-major codes.
    # The 4-warp 64 x 128 x 64 word tile won a graph sweep at 1024 tokens (192 rows per expert; eighth round); it
    # joins only the buckets where the gated GEMM decodes words, so the larger ones keep their measured set.
    if kind == "gated":  # two accumulators: keep BLOCK_M * BLOCK_N * 2 fp32 within the register file
        words = [_GATED_WORD_TILE] if bucket <= GATED_WORDS_MAX_BUCKET else []
        return words + [
                TileConfig(128, 64, 64, 8, 3), TileConfig(64, 128, 64, 4, 3), TileConfig(64, 128, 64, 8, 3, True),
                TileConfig(128, 64, 128, 8, 3, True), TileConfig(128, 128, 64, 8, 3, True),
                TileConfig(128, 128, 64, 8, 4, True), TileConfig(128, 64, 64, 4, 3, True),
                TileConfig(64, 64, 128, 4, 4, True)]
    if kind == "dx":  # (BLOCK_N reduction, BLOCK_K output)
        return [TileConfig(128, 64, 128, 8, 3), TileConfig(128, 64, 256, 8, 3), TileConfig(128, 64, 128, 8, 3, True),
                TileConfig(64, 128, 128, 4, 3),
                TileConfig(64, 64, 256, 8, 3, True), TileConfig(128, 64, 256, 8, 3, True)]
    return [TileConfig(128, 128, 64, 8, 3), TileConfig(128, 128, 64, 4, 4), TileConfig(128, 128, 64, 8, 3, True),
            TileConfig(64, 128, 128, 4, 3, True), TileConfig(256, 128, 64, 8, 3, True),
            TileConfig(128, 128, 64, 4, 3, True)]


def candidates(kind: str, bucket: int) -> list[TileConfig]:
    """Autotune candidates for a kernel kind at a rows-per-expert bucket."""
    if kind not in KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}; choose one of {KINDS}")
    if bucket <= 16:
        return _small(kind)
    if bucket <= 64:
        return _medium(kind)
    return _large(kind, bucket)


def all_candidates(kind: str) -> list[TileConfig]:
    seen: dict[TileConfig, None] = {}
    for b in (1, 64, GATED_WORDS_MAX_BUCKET, 4096):
        for c in candidates(kind, b):
            seen[c] = None
    return list(seen)

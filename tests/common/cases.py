"""Adversarial MXFP4/MXFP8 input blocks shared by the codec tests.

Each generator returns a float32 tensor [n_blocks, 32]; callers cast to bf16 where the values are representable.
"""

from __future__ import annotations

import torch

MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _f32(bits: int) -> float:
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()


def next_up(x: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(x, torch.full_like(x, float("inf")))


def next_down(x: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(x, torch.zeros_like(x))


def tie_blocks(exponents=range(-120, 121, 7)) -> torch.Tensor:
    """amax = 6 * 2^k (exact scale under every rule) and every grid midpoint (and grid value) times 2^k, both signs."""
    rows = []
    for k in exponents:
        vals = [6.0] + list(MIDPOINTS) + [-m for m in MIDPOINTS] + list(GRID) + [-g for g in GRID]
        vals += [m * 1.0000001 for m in MIDPOINTS[:3]]  # just above a midpoint (rounds up for every rule)
        vals = (vals + [0.0] * 32)[:32]
        rows.append(torch.tensor(vals, dtype=torch.float64) * 2.0**k)
    return torch.stack(rows).to(torch.float32)


def boundary_blocks(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Blocks whose amax sits on, just below and just above 6*2^k and 1.5*2^k (mantissa exactly 0x400000),
    1.75*2^k (0x600000) and 2^k, for k over the whole exponent range; steps are one ulp of `dtype`."""
    pivots = []
    for k in range(-133, 127):
        for m in (6.0, 1.5, 1.75, 1.0, 7.0):
            v = m * 2.0**k
            if v < 3.3e38:
                pivots.append(v)
    p = torch.tensor(pivots, dtype=torch.float64).to(dtype)
    p = p[p > 0]
    amax = torch.cat([p, torch.nextafter(p, torch.full_like(p, float("inf"))), torch.nextafter(p, torch.zeros_like(p))])
    amax = amax[torch.isfinite(amax)]
    gen = torch.Generator().manual_seed(1234)
    body = torch.rand(amax.numel(), 32, generator=gen, dtype=torch.float32) * 2 - 1
    blocks = (body.to(torch.float64) * amax.to(torch.float64)[:, None]).to(dtype).to(torch.float32)
    pos = torch.randint(0, 32, (amax.numel(),), generator=gen)
    blocks[torch.arange(amax.numel()), pos] = amax.to(torch.float32) * torch.where(
        torch.rand(amax.numel(), generator=gen) < 0.5, -1.0, 1.0)
    return blocks[torch.isfinite(blocks).all(-1)]


def special_blocks() -> torch.Tensor:
    """Zeros, -0, subnormals, max magnitudes, single nonzeros."""
    tiny = _f32(1)  # 2^-149
    rows = [
        torch.zeros(32),
        -torch.zeros(32),
        torch.tensor([0.0, -0.0] * 16),
        torch.full((32,), tiny),
        torch.arange(32, dtype=torch.float32) * tiny,
        torch.full((32,), _f32(0x007FFFFF)),  # largest subnormal
        torch.full((32,), 2.0**-126),  # smallest normal
        torch.full((32,), 6.0 * 2.0**-127),
        torch.tensor([3.3895313892515355e38] + [1.0] * 31),  # max bf16
        torch.tensor([-3.4028234663852886e38] + [-1e30] * 31),  # max fp32
        torch.tensor([1e-38] + [0.0] * 31),
        torch.tensor([0.0] * 31 + [-7.0]),
    ]
    return torch.stack(rows).to(torch.float32)


def random_blocks(n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Normal values with a per-block magnitude spread over ~2^-60..2^60 (and some denser near 1)."""
    x = torch.randn(n, 32, generator=gen, dtype=torch.float32)
    spread = torch.exp2(torch.randint(-60, 61, (n, 1), generator=gen).to(torch.float32))
    return (x * spread).to(dtype)


def all_adversarial(dtype: torch.dtype) -> torch.Tensor:
    blocks = torch.cat([tie_blocks(), boundary_blocks(dtype), special_blocks()]).to(dtype)
    return blocks[torch.isfinite(blocks).all(-1)].contiguous()  # max fp32 overflows to Inf in bf16


def random_valid_packed(n_rows: int, k: int, gen: torch.Generator, min_scale: int = 1, max_scale: int = 252):
    """Random codes/scales that every profile maps back to themselves: each block holds a nibble of magnitude
    6 or 7 (values 4 or 6), so the block amax determines the same scale byte again."""
    nib = torch.randint(0, 16, (n_rows, k), generator=gen, dtype=torch.int64).to(torch.uint8)
    blocks = nib.view(n_rows, k // 32, 32)
    pos = torch.randint(0, 32, (n_rows, k // 32), generator=gen)
    big = torch.randint(6, 8, (n_rows, k // 32), generator=gen).to(torch.uint8) | (
        torch.randint(0, 2, (n_rows, k // 32), generator=gen).to(torch.uint8) << 3)
    blocks.scatter_(2, pos.unsqueeze(-1), big.unsqueeze(-1))
    nib = blocks.view(n_rows, k)
    codes = nib[:, 0::2] | (nib[:, 1::2] << 4)
    scales = torch.randint(min_scale, max_scale + 1, (n_rows, k // 32), generator=gen).to(torch.uint8)
    return codes, scales

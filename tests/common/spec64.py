"""An independent float64 statement of the MXFP4/MXFP8 profile formulas, written from the specs, for the tests.

Nothing here is imported from `common`: the scale rules are stated as "smallest/largest power of two such that ...",
decided by exact float64 comparisons (every fp32/bf16 value, every 6 * 2^k and 448 * 2^k is exact in float64),
and elements are rounded by choosing the nearest grid value explicitly.
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64
E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=F64)


def _e4m3_grid() -> torch.Tensor:
    vals = [m / 8 * 2.0**-6 for m in range(8)]  # zero and subnormals
    vals += [(1 + m / 8) * 2.0**e for e in range(-6, 9) for m in range(8)]
    return torch.tensor(vals[:-1], dtype=F64)  # drop 0x7F (NaN in e4m3fn); max is 448


E4M3_GRID = _e4m3_grid()

# Per profile: scale rule, tie rule, amax floor, exponent used for code-0 blocks (None: elements become +-0),
# Inf scale byte.
SPECS = {
    "flashinfer": dict(rule="rceil", tie="even", floor=None, code0=None, inf=0xFE),
    "ocp": dict(rule="floor", tie="even", floor=None, code0=127, inf=0xFD),
    "even": dict(rule="even", tie="even", floor=None, code0=127, inf=0xFD),
    "torchao": dict(rule="floor", tie="even", floor=None, code0=126, inf=0xFD),
    "deepseek_v4": dict(rule="ceil_quotient", tie="even", floor=6.0 * 2.0**-126, code0=127, inf=0xFE),
    "triton_kernels": dict(rule="ceil_quotient", tie="even", floor=None, code0=None, inf=0xFF),
}


def _pow2_exponent_floor(a: float) -> int:
    """Largest e with 2^e <= a (a > 0)."""
    m, p = math.frexp(a)  # a = m * 2^p, m in [0.5, 1)
    return p - 1


def scale_code(amax: float, rule: str, emax_value: float, emax: int, mbits: int, amax_floor: float | None) -> int:
    if math.isnan(amax):
        return 0xFF
    if amax_floor is not None:
        amax = max(amax, amax_floor)
    if amax == 0.0:
        return 0
    if rule == "rceil":  # smallest e with emax_value * 2^e >= amax
        e = _pow2_exponent_floor(amax / emax_value) + 1
        while emax_value * 2.0 ** (e - 1) >= amax:
            e -= 1
        while emax_value * 2.0**e < amax:
            e += 1
    elif rule == "floor":  # floor(log2 amax) - emax
        e = _pow2_exponent_floor(amax) - emax
    elif rule == "even":  # round amax to mbits+1 significant bits, halves up, then floor
        p = _pow2_exponent_floor(amax)
        step = 2.0 ** (p - mbits)
        e = _pow2_exponent_floor(math.floor(amax / step + 0.5) * step) - emax
    elif rule == "ceil_quotient":  # q = fp32(amax / emax_value); smallest power of two >= q, at least 2^-126
        q = torch.tensor(amax / emax_value, dtype=F64).to(torch.float32).item()
        if q == 0.0:
            return 0
        e = max(-126, math.ceil(math.log2(q)))
        while 2.0 ** (e - 1) >= q and e - 1 >= -126:
            e -= 1
        while 2.0**e < q:
            e += 1
    else:
        raise AssertionError(rule)
    return min(max(e + 127, 0), 254)


def round_to_grid(y: torch.Tensor, grid: torch.Tensor, tie: str) -> torch.Tensor:
    """Index of the nearest grid value to |y| (float64), saturating; ties to the even index or away from zero."""
    a = y.abs().clamp(max=grid[-1].item())
    d = (a.unsqueeze(-1) - grid).abs()
    best = d.min(-1, keepdim=True).values
    cand = d == best
    idx = torch.arange(grid.numel())
    if tie == "even":
        # Grid indices are the element codes; an even code has mantissa LSB 0.
        score = torch.where(cand, (idx % 2 == 0).to(torch.int64) * 1000 + idx, torch.full_like(idx, -1))
    else:
        score = torch.where(cand, idx, torch.full_like(idx, -1))
    return score.argmax(-1)


def _scaled(row: torch.Tensor, code: int, code0: int | None) -> torch.Tensor:
    if code == 0:
        return row * 0.0 if code0 is None else row * 2.0**code0
    return row * 2.0 ** (127 - code)


def quantize_mxfp4(x: torch.Tensor, profile: str):
    """x [n, 32] finite (float32/bf16) -> (nibbles uint8 [n, 32], scale bytes uint8 [n])."""
    s = SPECS[profile]
    x64 = x.to(F64)
    codes, nibbles = [], []
    for row in x64:
        amax = row.abs().max().item()
        c = scale_code(amax, s["rule"], 6.0, 2, 1, s["floor"])
        y = _scaled(row, c, s["code0"])
        mag = round_to_grid(y, E2M1_GRID, s["tie"])
        sign = torch.signbit(row).to(torch.int64) << 3
        nibbles.append((mag | sign).to(torch.uint8))
        codes.append(c)
    return torch.stack(nibbles), torch.tensor(codes, dtype=torch.uint8)


def quantize_mxfp8(x: torch.Tensor, profile: str):
    """x [n, 32] finite -> (e4m3 values as float64 [n, 32], scale bytes uint8 [n])."""
    s = SPECS[profile]
    x64 = x.to(F64)
    vals, codes = [], []
    for row in x64:
        c = scale_code(row.abs().max().item(), s["rule"], 448.0, 8, 3, s["floor"])
        y = _scaled(row, c, s["code0"])
        mag = E4M3_GRID[round_to_grid(y, E4M3_GRID, "even")]
        vals.append(torch.where(torch.signbit(row), -mag, mag))
        codes.append(c)
    return torch.stack(vals), torch.tensor(codes, dtype=torch.uint8)

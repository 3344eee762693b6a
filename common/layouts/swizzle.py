"""The 128x4 swizzled E8M0 scale layout of cuBLAS / FlashInfer block-scaled GEMMs.

cuBLAS "1D Block Scaling Factors Layout": the [rows, K/32] scale matrix is padded to rows a multiple of 128 and
columns a multiple of 4 (zero bytes), cut into 128x4 tiles stored one after another (tile row-major: all column
tiles of rows 0..127 first), and inside a tile the byte of (r, c) sits at offset (r % 32) * 16 + (r // 32) * 4 + c,
so the 4 scales one thread needs for 4 row groups are adjacent. Matches torchao's `to_blocked` byte for byte
(tests/common/test_layouts.py). Leading dims (experts) are swizzled independently.
"""

from __future__ import annotations

import torch

from ..errors import ShapeError
from ._checks import expect_dtype

TILE_ROWS, TILE_COLS = 128, 4
SUB_ROWS = 32  # a tile is 4 groups of 32 rows


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def swizzled_shape(rows: int, cols: int) -> tuple[int, int]:
    return _ceil_to(rows, TILE_ROWS), _ceil_to(cols, TILE_COLS)


def swizzle_scales(scales: torch.Tensor) -> torch.Tensor:
    """uint8 [..., rows, cols] -> uint8 [..., R, C] (R, C padded to 128, 4) holding the swizzled byte order."""
    expect_dtype(scales, torch.uint8, "scales")
    if scales.dim() < 2:
        raise ShapeError(f"tensor 'scales': expected [..., rows, K/32], got shape {tuple(scales.shape)}")
    *lead, rows, cols = scales.shape
    r, c = swizzled_shape(rows, cols)
    padded = scales.new_zeros((*lead, r, c))
    padded[..., :rows, :cols] = scales
    # [.., row tile, row group (r // 32), r % 32, col tile, c] -> [.., row tile, col tile, r % 32, row group, c]
    t = padded.reshape(*lead, r // TILE_ROWS, TILE_ROWS // SUB_ROWS, SUB_ROWS, c // TILE_COLS, TILE_COLS)
    n = len(lead)
    t = t.permute(*range(n), n, n + 3, n + 2, n + 1, n + 4)
    return t.reshape(*lead, r, c)


def unswizzle_scales(swizzled: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of swizzle_scales: drop the padding and return uint8 [..., rows, cols]."""
    expect_dtype(swizzled, torch.uint8, "swizzled scales")
    r, c = swizzled_shape(rows, cols)
    if swizzled.dim() < 2 or tuple(swizzled.shape[-2:]) != (r, c):
        raise ShapeError(f"tensor 'swizzled scales': expected [..., {r}, {c}] for {rows}x{cols} scales, "
                         f"got shape {tuple(swizzled.shape)}")
    *lead, _, _ = swizzled.shape
    n = len(lead)
    t = swizzled.reshape(*lead, r // TILE_ROWS, c // TILE_COLS, SUB_ROWS, TILE_ROWS // SUB_ROWS, TILE_COLS)
    t = t.permute(*range(n), n, n + 3, n + 2, n + 1, n + 4)
    return t.reshape(*lead, r, c)[..., :rows, :cols].contiguous()

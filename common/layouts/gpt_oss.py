"""Canonical <-> gpt-oss MXFP4 expert layout.

gpt-oss checkpoints store `*_blocks` uint8 [E, N, K/32, 16] (the canonical codes [E, N, K/2] seen as 16-byte
blocks: same bytes, same nibble order) and `*_scales` uint8 [E, N, K/32]. In `gate_up_proj_*` the gate and up
rows are interleaved, row 2i = gate row i, row 2i+1 = up row i (transformers GptOssExperts._apply_gate takes
gate = [..., ::2], up = [..., 1::2]). Every function here is a pure byte permutation or view.
"""

from __future__ import annotations

import torch

from .. import constants as C
from ..tensor import MXFP4Tensor
from ..errors import ShapeError
from ._checks import expect_dtype, expect_even_rows, expect_shape

BLOCK_BYTES = C.BLOCK_SIZE // 2  # 16 packed bytes per 32-element block


def interleave_rows(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """[..., I, X] twice -> [..., 2I, X] with row 2i = gate i, row 2i+1 = up i."""
    expect_shape(up, tuple(gate.shape), "up")
    return torch.stack((gate, up), dim=-2).flatten(-3, -2)


def deinterleave_rows(x: torch.Tensor, name: str = "gate_up") -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of interleave_rows: (gate = even rows, up = odd rows), both contiguous."""
    expect_even_rows(x, name)
    return x[..., 0::2, :].contiguous(), x[..., 1::2, :].contiguous()


def codes_to_blocks(codes: torch.Tensor, name: str = "codes") -> torch.Tensor:
    """Canonical codes [..., N, K/2] -> gpt-oss blocks [..., N, K/32, 16] (a view of the same bytes)."""
    expect_dtype(codes, torch.uint8, name)
    if codes.dim() < 1 or codes.shape[-1] % BLOCK_BYTES:
        raise ShapeError(f"tensor '{name}': expected [..., N, K/2] with K/2 a multiple of {BLOCK_BYTES}, "
                         f"got shape {tuple(codes.shape)}")
    return codes.unflatten(-1, (codes.shape[-1] // BLOCK_BYTES, BLOCK_BYTES))


def blocks_to_codes(blocks: torch.Tensor, name: str = "blocks") -> torch.Tensor:
    """gpt-oss blocks [..., N, K/32, 16] -> canonical codes [..., N, K/2]."""
    expect_dtype(blocks, torch.uint8, name)
    if blocks.dim() < 2 or blocks.shape[-1] != BLOCK_BYTES:
        raise ShapeError(f"tensor '{name}': expected [..., N, K/32, {BLOCK_BYTES}], got shape {tuple(blocks.shape)}")
    return blocks.flatten(-2, -1)


def to_gpt_oss_gate_up(gate: MXFP4Tensor, up: MXFP4Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gate, up [E, I, H] -> (gate_up_proj_blocks [E, 2I, H/32, 16], gate_up_proj_scales [E, 2I, H/32])."""
    return codes_to_blocks(interleave_rows(gate.codes, up.codes)), interleave_rows(gate.scales, up.scales)


def from_gpt_oss_gate_up(blocks: torch.Tensor, scales: torch.Tensor, profile: str) -> tuple[MXFP4Tensor, MXFP4Tensor]:
    """Inverse of to_gpt_oss_gate_up: (gate [E, I, H], up [E, I, H])."""
    codes = blocks_to_codes(blocks, "gate_up_proj_blocks")
    expect_dtype(scales, torch.uint8, "gate_up_proj_scales")
    expect_shape(scales, tuple(blocks.shape[:-1]), "gate_up_proj_scales")
    gc, uc = deinterleave_rows(codes, "gate_up_proj_blocks")
    gs, us = deinterleave_rows(scales, "gate_up_proj_scales")
    return MXFP4Tensor(gc, gs, profile), MXFP4Tensor(uc, us, profile)


def to_gpt_oss_down(down: MXFP4Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """down [E, H, I] -> (down_proj_blocks [E, H, I/32, 16], down_proj_scales [E, H, I/32])."""
    return codes_to_blocks(down.codes), down.scales


def from_gpt_oss_down(blocks: torch.Tensor, scales: torch.Tensor, profile: str) -> MXFP4Tensor:
    codes = blocks_to_codes(blocks, "down_proj_blocks")
    expect_dtype(scales, torch.uint8, "down_proj_scales")
    expect_shape(scales, tuple(blocks.shape[:-1]), "down_proj_scales")
    return MXFP4Tensor(codes.contiguous(), scales, profile)

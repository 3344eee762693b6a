"""Shared argument checks of the layout conversions: every error names the tensor, the expected and the actual."""

from __future__ import annotations

import torch

from ..errors import DTypeError, ShapeError


def expect_dtype(t: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    if t.dtype != dtype:
        raise DTypeError(f"tensor '{name}': expected dtype {dtype}, got {t.dtype}")


def expect_rank(t: torch.Tensor, rank: int, name: str, what: str) -> None:
    if t.dim() != rank:
        raise ShapeError(f"tensor '{name}': expected {rank} dims {what}, got shape {tuple(t.shape)}")


def expect_shape(t: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ShapeError(f"tensor '{name}': expected shape {tuple(shape)}, got {tuple(t.shape)}")


def expect_even_rows(t: torch.Tensor, name: str) -> None:
    if t.dim() < 2 or t.shape[-2] % 2:
        raise ShapeError(f"tensor '{name}': expected an even number of rows (gate/up pairs) in dim -2, "
                         f"got shape {tuple(t.shape)}")

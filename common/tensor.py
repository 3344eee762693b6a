"""MXFP4Tensor: packed codes + E8M0 scales with their logical shape and profile."""

from __future__ import annotations

import dataclasses

import torch

from . import constants as C
from .errors import DTypeError, ShapeError, describe


def check_packed(codes: torch.Tensor, scales: torch.Tensor, name: str | None = None) -> None:
    """Raise a clear error unless codes [..., N, K/2] and scales [..., N, K/32] are uint8 and agree."""
    what = describe(name)
    for label, t in (("codes", codes), ("scales", scales)):
        if t.dtype != torch.uint8:
            raise DTypeError(f"{what}: {label} must be uint8, got {t.dtype}")
    if codes.dim() < 1 or codes.shape[:-1] != scales.shape[:-1] or codes.shape[-1] != scales.shape[-1] * 16:
        raise ShapeError(
            f"{what}: codes {tuple(codes.shape)} and scales {tuple(scales.shape)} do not agree; expected "
            f"codes [..., N, K/2] with scales [..., N, K/32] (one scale byte per 16 code bytes)"
        )


@dataclasses.dataclass(frozen=True)
class MXFP4Tensor:
    """An MXFP4 tensor in the canonical layout.

    codes:  uint8 [..., N, K/2], byte j = code[2j] | code[2j+1] << 4 (low nibble = even element)
    scales: uint8 [..., N, K/32], E8M0 (value 2^(byte - 127))
    profile: name of the quantizer profile that produced it
    """

    codes: torch.Tensor
    scales: torch.Tensor
    profile: str

    def __post_init__(self) -> None:
        check_packed(self.codes, self.scales)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.codes.shape[:-1], self.codes.shape[-1] * 2))

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + self.scales.numel()

    @property
    def bits_per_element(self) -> float:
        return 8.0 * self.nbytes / max(1, self.shape.numel())

    def to(self, device: torch.device | str) -> "MXFP4Tensor":
        return MXFP4Tensor(self.codes.to(device), self.scales.to(device), self.profile)

    def __getitem__(self, index) -> "MXFP4Tensor":
        """Index the leading dims (experts, rows); the K axis cannot be indexed."""
        return MXFP4Tensor(self.codes[index], self.scales[index], self.profile)

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        from .api import dequantize

        return dequantize(self, dtype=dtype)

    def equal(self, other: "MXFP4Tensor") -> bool:
        """Bit-for-bit equality of codes and scales (profile names must match too)."""
        return (
            self.profile == other.profile
            and torch.equal(self.codes, other.codes)
            and torch.equal(self.scales, other.scales)
        )


BLOCK_BYTES = C.BLOCK_SIZE // 2

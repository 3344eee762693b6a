"""Public Triton codec entry points: validate, flatten to [n_blocks, 32], launch, reshape back.

common.api dispatches here for backend="triton" (and for CUDA tensors with backend="auto"). The non-finite
check (nonfinite="raise") is done by common.api before calling; these functions apply the profile's NaN/Inf
rule to whatever they get, exactly as common.reference does with nonfinite="profile".
"""

from __future__ import annotations

import os

import torch
import triton

from .. import constants as C
from ..errors import DTypeError
from ..formats import E2M1, E4M3
from ..profiles import Profile, TieRule, get_profile
from ..reference import check_input
from ..tensor import check_packed
from . import params
from ._dequantize import _dequantize_mxfp4_kernel
from ._quantize import _quantize_mxfp4_kernel, _quantize_mxfp8_kernel


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _check_device(t: torch.Tensor, what: str) -> None:
    if not t.is_cuda and not interpreting():
        raise RuntimeError(
            f"{what}: the Triton codec kernels need a CUDA tensor (got device {t.device}); on CPU set "
            f"TRITON_INTERPRET=1 before importing triton, or use backend='torch'"
        )


def _config(kernel: str, blocks: int | None, num_warps: int | None) -> tuple[int, int]:
    gpu_blocks, gpu_warps = params.GPU_CONFIG[kernel]
    default_blocks = params.INTERPRETER_BLOCKS if interpreting() else gpu_blocks
    blocks = default_blocks if blocks is None else blocks
    if blocks < 1 or blocks & (blocks - 1):
        raise ValueError(f"{kernel}: blocks per program must be a power of two, got {blocks}")
    return blocks, gpu_warps if num_warps is None else num_warps


def _as_kernel_input(x: torch.Tensor) -> torch.Tensor:
    # 16-bit floats go in as int16 bits: the kernel widens bf16 with a shift (exact for subnormals, independent
    # of the interpreter's bf16 conversion) and restores the sign of fp16 NaNs that the GPU's cvt drops.
    x = x.contiguous()
    return x.view(torch.int16) if x.dtype in (torch.bfloat16, torch.float16) else x


def quantize_mxfp4_triton(x: torch.Tensor, profile: str | Profile, *, blocks: int | None = None,
                          num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., N, K] float -> (codes uint8 [..., N, K/2], scales uint8 [..., N, K/32]), same bytes as
    common.reference.quantize_mxfp4(x, profile, nonfinite="profile")."""
    prof = get_profile(profile)
    check_input(x, None)
    _check_device(x, "quantize_mxfp4_triton")
    lead, k = tuple(x.shape[:-1]), x.shape[-1]
    codes = torch.empty(*lead, k // 2, dtype=torch.uint8, device=x.device)
    scales = torch.empty(*lead, k // C.BLOCK_SIZE, dtype=torch.uint8, device=x.device)
    n_blocks = scales.numel()
    if n_blocks == 0:
        return codes, scales
    bl, warps = _config("quantize_mxfp4", blocks, num_warps)
    _quantize_mxfp4_kernel[(triton.cdiv(n_blocks, bl),)](
        _as_kernel_input(x), codes, scales, n_blocks, IN_KIND=params.IN_KINDS[x.dtype], BLOCKS=bl,
        num_warps=warps, **params.mxfp4_constants(prof, E2M1))
    return codes, scales


def dequantize_mxfp4_triton(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16, *,
                            blocks: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """Exact dequantization to dtype (bf16/fp16/fp32) of canonical codes + scales; scale byte 0xFF gives NaN
    (common.api refuses it before calling)."""
    check_packed(codes, scales)
    if dtype not in params.OUT_KINDS:
        raise DTypeError(f"dequantize: output dtype must be float32, bfloat16 or float16, got {dtype}")
    _check_device(codes, "dequantize_mxfp4_triton")
    if scales.device != codes.device:
        raise ValueError(f"dequantize: codes are on {codes.device} but scales on {scales.device}")
    out = torch.empty(*codes.shape[:-1], codes.shape[-1] * 2, dtype=dtype, device=codes.device)
    n_blocks = scales.numel()
    if n_blocks == 0:
        return out
    bl, warps = _config("dequantize_mxfp4", blocks, num_warps)
    out_arg = out.view(torch.int16) if dtype == torch.bfloat16 else out
    _dequantize_mxfp4_kernel[(triton.cdiv(n_blocks, bl),)](
        codes.contiguous(), scales.contiguous(), out_arg, n_blocks, OUT_KIND=params.OUT_KINDS[dtype], BLOCKS=bl,
        num_warps=warps)
    return out


def quantize_mxfp8_triton(x: torch.Tensor, profile: str | Profile, *, blocks: int | None = None,
                          num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] float -> (float8_e4m3fn [..., K], scales uint8 [..., K/32]), same bytes as
    common.reference.quantize_mxfp8(x, profile, nonfinite="profile"); NaN elements keep their sign bit."""
    prof = get_profile(profile)
    check_input(x, None)
    if prof.tie_rule is not TieRule.EVEN:
        raise ValueError(f"profile {prof.name!r}: MXFP8 supports only round-half-to-even elements")
    _check_device(x, "quantize_mxfp8_triton")
    elems = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    scales = torch.empty(*x.shape[:-1], x.shape[-1] // C.BLOCK_SIZE, dtype=torch.uint8, device=x.device)
    n_blocks = scales.numel()
    if n_blocks:
        bl, warps = _config("quantize_mxfp8", blocks, num_warps)
        _quantize_mxfp8_kernel[(triton.cdiv(n_blocks, bl),)](
            _as_kernel_input(x), elems, scales, n_blocks, IN_KIND=params.IN_KINDS[x.dtype], BLOCKS=bl,
            num_warps=warps, **params.scale_constants(prof, E4M3))
    return elems.view(torch.float8_e4m3fn), scales

"""Canonical vLLM MoE params <-> the weight layout of FlashInfer's TRT-LLM-gen MXFP4 MoE (`trtllm_fp4_block_scale_moe`).

What the kernel wants, per expert (vLLM's TRTLLM MXFP4 path prepares it with FlashInfer's helpers
`_maybe_get_cached_w3_w1_permute_indices` / `get_w2_permute_indices_with_cache` with epilogue_tile_m=128 and
`block_scale_interleave`; tests/common/golden holds their bytes, produced on a GPU by scripts/gpu_flashinfer_golden.py):

1. gemm1 rows in (up, gate) order: the TRT-LLM-gen SwiGLU takes its *second* half as the gate, so vLLM swaps
   w1/w3 ("[w3; w1]"), and the gated-activation epilogue wants the two halves interleaved row by row
   (row 2i = up row i, row 2i+1 = gate row i) so that one tile holds matching gate and up outputs.
2. Every matrix (gemm1, gemm2, their scales and biases) has its rows shuffled for the transposed-MMA epilogue:
   with epilogue_tile_m = 128 the rows are cut into blocks of 32 and each block, read as an 8x4 grid of rows
   (row 4a + b), is stored transposed (row 8b + a).
3. Scales, after the same row permutation as their codes, take the 128x4 swizzled layout of cuBLAS/FlashInfer
   (common.layouts.swizzle), padded to rows % 128 and cols % 4.

Everything here is a pure byte permutation (codes and scales stay uint8; packed nibbles never move within a byte),
with an inverse. The permutation is the same for every expert, so experts convert independently: the refit
re-runs `convert_experts` on the touched experts only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..errors import ShapeError
from ..moe import params as P
from ..moe.params import ALL_PARAMS
from ._checks import expect_dtype, expect_even_rows
from .gpt_oss import deinterleave_rows, interleave_rows
from .swizzle import TILE_COLS, TILE_ROWS, swizzle_scales, swizzled_shape, unswizzle_scales

EPILOGUE_TILE_M = 128  # what vLLM and FlashInfer's MoE tests pass for the TRT-LLM-gen kernels
SHUFFLE_BLOCK = 32  # rows per shuffle block when epilogue_tile_m % 128 == 0 (FlashInfer get_shuffle_block_size)
SHUFFLE_GRID = (8, 4)  # a block's rows 4a + b read as an 8x4 grid and stored transposed
# Kernel tile constraints: vLLM's mxfp4_round_up_hidden_size_and_intermediate_size for its TRTLLM backends.
HIDDEN_ALIGN = 256
INTERMEDIATE_ALIGN = 128
PARAM_NAMES = ALL_PARAMS  # the contract's names (common.moe.params)


def _expect_rows(x: torch.Tensor, multiple: int, name: str, dim: int = -2) -> None:
    if x.dim() < -dim or x.shape[dim] % multiple:
        raise ShapeError(f"tensor '{name}': expected dim {dim} (rows) to be a multiple of {multiple} for the "
                         f"TRT-LLM epilogue shuffle, got shape {tuple(x.shape)}")


# ---------------------------------------------------------------- row permutations (any dtype, rows = dim -2)


def shuffle_rows(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """Epilogue-tile row shuffle along dim -2: within each block of 32 rows, row 4a + b moves to row 8b + a."""
    _expect_rows(x, SHUFFLE_BLOCK, name)
    *lead, rows, cols = x.shape
    a, b = SHUFFLE_GRID
    t = x.reshape(*lead, rows // SHUFFLE_BLOCK, a, b, cols).transpose(-3, -2)
    return t.reshape(*lead, rows, cols).contiguous()


def unshuffle_rows(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """Inverse of shuffle_rows."""
    _expect_rows(x, SHUFFLE_BLOCK, name)
    *lead, rows, cols = x.shape
    a, b = SHUFFLE_GRID
    t = x.reshape(*lead, rows // SHUFFLE_BLOCK, b, a, cols).transpose(-3, -2)
    return t.reshape(*lead, rows, cols).contiguous()


def gate_up_to_kernel_rows(x: torch.Tensor, name: str = "w13") -> torch.Tensor:
    """[..., 2I, X] stacked [gate; up] (vLLM's w13) -> rows interleaved (up_i, gate_i), then shuffled."""
    expect_even_rows(x, name)
    i = x.shape[-2] // 2
    return shuffle_rows(interleave_rows(x[..., i:, :], x[..., :i, :]), name)


def kernel_rows_to_gate_up(x: torch.Tensor, name: str = "w13") -> torch.Tensor:
    """Inverse of gate_up_to_kernel_rows."""
    up, gate = deinterleave_rows(unshuffle_rows(x, name), name)
    return torch.cat((gate, up), dim=-2)


# ---------------------------------------------------------------- packed codes + E8M0 scales


def _expect_pair(codes: torch.Tensor, scales: torch.Tensor, name: str) -> None:
    expect_dtype(codes, torch.uint8, f"{name}_weight")
    expect_dtype(scales, torch.uint8, f"{name}_weight_scale")
    if codes.dim() < 2 or scales.shape[:-1] != codes.shape[:-1] or codes.shape[-1] != scales.shape[-1] * 16:
        raise ShapeError(f"tensors '{name}_weight' / '{name}_weight_scale': expected [..., N, K/2] and "
                         f"[..., N, K/32], got {tuple(codes.shape)} and {tuple(scales.shape)}")


def to_trtllm_w13(codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w13 codes [..., 2I, H/2], scales [..., 2I, H/32] -> (kernel codes, same shape; swizzled scales
    [..., ceil128(2I), ceil4(H/32)], equal to the input shape when aligned)."""
    _expect_pair(codes, scales, "w13")
    rows = gate_up_to_kernel_rows(scales, P.W13_SCALE)
    return gate_up_to_kernel_rows(codes, P.W13), swizzle_scales(rows)


def from_trtllm_w13(codes: torch.Tensor, swizzled: torch.Tensor, scale_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of to_trtllm_w13; scale_cols = H/32 (the unpadded scale width)."""
    rows = codes.shape[-2]
    scales = unswizzle_scales(swizzled, rows, scale_cols)
    _expect_pair(codes, scales, "w13")
    return kernel_rows_to_gate_up(codes, P.W13), kernel_rows_to_gate_up(scales, P.W13_SCALE)


def to_trtllm_w2(codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w2 codes [..., H, I/2], scales [..., H, I/32] -> (shuffled codes; shuffled + swizzled scales)."""
    _expect_pair(codes, scales, "w2")
    return shuffle_rows(codes, P.W2), swizzle_scales(shuffle_rows(scales, P.W2_SCALE))


def from_trtllm_w2(codes: torch.Tensor, swizzled: torch.Tensor, scale_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of to_trtllm_w2; scale_cols = I/32."""
    scales = unswizzle_scales(swizzled, codes.shape[-2], scale_cols)
    _expect_pair(codes, scales, "w2")
    return unshuffle_rows(codes, P.W2), unshuffle_rows(scales, P.W2_SCALE)


# ---------------------------------------------------------------- biases (rows are the last dim)


def to_trtllm_w13_bias(bias: torch.Tensor) -> torch.Tensor:
    """[..., 2I] = [gate; up] -> the kernel row order of w13 (same permutation as its codes)."""
    return gate_up_to_kernel_rows(bias.unsqueeze(-1), P.W13_BIAS).squeeze(-1)


def from_trtllm_w13_bias(bias: torch.Tensor) -> torch.Tensor:
    return kernel_rows_to_gate_up(bias.unsqueeze(-1), P.W13_BIAS).squeeze(-1)


def to_trtllm_w2_bias(bias: torch.Tensor) -> torch.Tensor:
    return shuffle_rows(bias.unsqueeze(-1), P.W2_BIAS).squeeze(-1)


def from_trtllm_w2_bias(bias: torch.Tensor) -> torch.Tensor:
    return unshuffle_rows(bias.unsqueeze(-1), P.W2_BIAS).squeeze(-1)


# ---------------------------------------------------------------- whole parameter sets, per expert


def check_kernel_dims(hidden: int, intermediate: int) -> None:
    """The TRT-LLM-gen MXFP4 MoE tiles need H % 256 == 0 and I % 128 == 0 (per TP partition); then every
    converted tensor has exactly its canonical shape (rows % 128, scale cols % 4), so it fits in place."""
    if hidden % HIDDEN_ALIGN or intermediate % INTERMEDIATE_ALIGN:
        ph, pi = -(-hidden // HIDDEN_ALIGN) * HIDDEN_ALIGN, -(-intermediate // INTERMEDIATE_ALIGN) * INTERMEDIATE_ALIGN
        raise ShapeError(f"FlashInfer TRT-LLM MXFP4 MoE needs hidden % {HIDDEN_ALIGN} == 0 and intermediate % "
                         f"{INTERMEDIATE_ALIGN} == 0 (per partition), got hidden={hidden}, "
                         f"intermediate={intermediate}; allocate the expert parameters padded to hidden={ph}, "
                         f"intermediate={pi} (zero codes in the padding)")


def _dims(params: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    w13, w2 = params[P.W13], params[P.W2]
    return w2.shape[-2], w13.shape[-2] // 2  # hidden, intermediate


def _check_experts(params: Mapping[str, torch.Tensor], expert_ids: Sequence[int] | None) -> None:
    missing = [n for n in PARAM_NAMES[:4] if n not in params]
    if missing:
        raise KeyError(f"MoE params lack {missing}; expected {PARAM_NAMES[:4]} (+ optional biases)")
    n = params[P.W13].shape[0]
    for name, t in params.items():
        if t is not None and t.shape[0] != n:
            raise ShapeError(f"tensor '{name}': expected {n} experts in dim 0 like 'w13_weight', got {tuple(t.shape)}")
    if expert_ids is not None and len(expert_ids) != n:
        raise ShapeError(f"expert_ids lists {len(expert_ids)} experts but the slices hold {n}")


def convert_experts(params: Mapping[str, torch.Tensor],
                    expert_ids: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """Canonical slices [n, ...] of the vLLM MoE params (any n experts: all of them, or the ones a refit touched,
    listed in expert_ids) -> the same slices in kernel layout, each with its canonical shape. Biases keep dtype."""
    _check_experts(params, expert_ids)
    check_kernel_dims(*_dims(params))
    out = {}
    out[P.W13], out[P.W13_SCALE] = to_trtllm_w13(params[P.W13], params[P.W13_SCALE])
    out[P.W2], out[P.W2_SCALE] = to_trtllm_w2(params[P.W2], params[P.W2_SCALE])
    if params.get(P.W13_BIAS) is not None:
        out[P.W13_BIAS] = to_trtllm_w13_bias(params[P.W13_BIAS])
    if params.get(P.W2_BIAS) is not None:
        out[P.W2_BIAS] = to_trtllm_w2_bias(params[P.W2_BIAS])
    return out


def revert_experts(params: Mapping[str, torch.Tensor],
                   expert_ids: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """Inverse of convert_experts (for audits of a prepared layer and for tests)."""
    _check_experts(params, expert_ids)
    hidden, inter = _dims(params)
    check_kernel_dims(hidden, inter)
    out = {}
    out[P.W13], out[P.W13_SCALE] = from_trtllm_w13(params[P.W13], params[P.W13_SCALE],
                                                                 hidden // 32)
    out[P.W2], out[P.W2_SCALE] = from_trtllm_w2(params[P.W2], params[P.W2_SCALE],
                                                              inter // 32)
    if params.get(P.W13_BIAS) is not None:
        out[P.W13_BIAS] = from_trtllm_w13_bias(params[P.W13_BIAS])
    if params.get(P.W2_BIAS) is not None:
        out[P.W2_BIAS] = from_trtllm_w2_bias(params[P.W2_BIAS])
    return out


__all__ = [
    "EPILOGUE_TILE_M", "HIDDEN_ALIGN", "INTERMEDIATE_ALIGN", "TILE_COLS", "TILE_ROWS", "check_kernel_dims",
    "convert_experts", "from_trtllm_w13", "from_trtllm_w13_bias", "from_trtllm_w2", "from_trtllm_w2_bias",
    "gate_up_to_kernel_rows", "kernel_rows_to_gate_up", "revert_experts", "shuffle_rows", "swizzled_shape",
    "to_trtllm_w13", "to_trtllm_w13_bias", "to_trtllm_w2", "to_trtllm_w2_bias", "unshuffle_rows",
]

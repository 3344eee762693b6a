"""The per-expert LoRA terms of the grouped MLP that the MXFP4 GEMMs do not fuse: the rank-R projections of the
sorted rows (their up-projections are the GEMMs' LoRA epilogue) and the factors' weight gradients.

Triton kernels (common/grouped_gemm/_lora_kernels.py) wherever the grouped GEMMs run (CUDA, or the interpreter
on CPU): fp32 accumulation, one rounding, the scaling folded in before it, and two launches fewer per projection
than a grouped GEMM followed by a multiply.
"""

from __future__ import annotations

import torch

from ..errors import ShapeError
from ..kernels import fast_launch, interpreting, pdl
from ._lora_kernels import _lora_project_kernel, _lora_wgrad_kernel
from .configs import cdiv, next_pow2, padded_rank
from .counters import tile_counters
from .interleave import reorder_k

_MAX_BLOCK_R = 64


def _rank_block(r: int) -> int:
    """The MMA needs >= 16 along every dimension: a smaller rank is masked inside a 16-wide tile."""
    return min(_MAX_BLOCK_R, padded_rank(r))


def _check(offsets: torch.Tensor, rows: int, *named: tuple[str, torch.Tensor]) -> None:
    for name, t in named:
        if t.dim() != 2 or t.shape[0] != rows:
            raise ShapeError(f"tensor '{name}': expected [M={rows}, ...] sorted rows, got {tuple(t.shape)}")
        if t.device != offsets.device:
            raise ValueError(f"tensor '{name}' is on {t.device} but 'expert_offsets' on {offsets.device}")
    if not offsets.is_cuda and not interpreting():
        raise RuntimeError("LoRA grouped kernels: need CUDA tensors, or TRITON_INTERPRET=1 on CPU")
    if offsets.dtype != torch.int32 or offsets.dim() != 1:
        raise ShapeError(f"tensor 'expert_offsets': expected int32 [E+1], got {offsets.dtype} "
                         f"{tuple(offsets.shape)}")


# The projection's K step and pipeline depth on a GPU (the interpreter runs BLOCK_K 64). 256 x 4 stages: on an H100
# the engine's DeepSeek-V4-Flash layer with r=16 adapters cost 1.12x / 1.11x the layer without them at 16 / 128
# tokens, against 1.16x / 1.15x with the 128 x 3 the learner's profiles first ran with (bench/lora_layer.py
# --project-tiles, bench/RESULTS.md). A tile whose stages would pass SMEM_BUDGET (wide rank blocks at large batches)
# falls back to FALLBACK_TILE.
PROJECT_BLOCK_K = 256
PROJECT_STAGES = 4
PROJECT_WARPS = 4
FALLBACK_TILE = (128, 3)
SMEM_BUDGET = 160 * 1024  # bytes of bf16 x and factor tiles over all stages; 64 + 16 rows at 256 x 4 ran on an H100


def _project_tile(block_m: int, block_r: int) -> tuple[int, int]:
    """(BLOCK_K, stages) of the projection on a GPU."""
    if (block_m + block_r) * PROJECT_BLOCK_K * 2 * PROJECT_STAGES <= SMEM_BUDGET:
        return PROJECT_BLOCK_K, PROJECT_STAGES
    return FALLBACK_TILE


def _split_buffers(device: torch.device, tiles: int, split_k: int, block_m: int, block_r: int, dummy: torch.Tensor):
    """(partials, counters) of a launch with `tiles` programs along grid axes 0-1 and split_k along axis 2."""
    if split_k == 1:
        return dummy, dummy
    return (torch.empty(tiles * split_k * block_m * block_r, dtype=torch.float32, device=device),
            tile_counters(device, tiles))


def _check_split(split_k: int) -> None:
    if not isinstance(split_k, int) or not 1 <= split_k <= 64:
        raise ValueError(f"LoRA projection: split_k must be an int in [1, 64], got {split_k!r}")


def project(x: torch.Tensor, offsets: torch.Tensor, factor: torch.Tensor, scaling: float = 1.0, *,
            gather_rows: torch.Tensor | None = None, split_k: int = 1) -> torch.Tensor:
    """h [M, R] bf16 = scaling * x_e @ factor_e^T per expert's rows, factor [E, R, K] at any strides (an A factor
    as stored, or B.transpose(1, 2) of a B factor [E, K, R]); x [M, K] is bf16 or wider (rounded to bf16 first,
    as the factor is, by torch's round to nearest; a bf16 factor is used as it is, no copy).
    With gather_rows [M] (int32/int64), x is the unsorted [T, K] and sorted row r reads x[gather_rows[r]]: the
    same bits as project(x[gather_rows], ...) without the copy (the engine's MoE layer, as its gated GEMM).
    split_k > 1 sums K in that many chunks on separate programs, added in chunk order by the last of them (one
    launch, deterministic; other bits than split_k=1: the engine's decode-size layer uses it, the learner not)."""
    _check_split(split_k)
    m = x.shape[0] if gather_rows is None else gather_rows.shape[0]
    _check(offsets, m, *(() if gather_rows is not None else (("x", x),)))
    if gather_rows is not None:
        _check_gather(x, gather_rows, m, offsets.device)
    e, r, k = factor.shape
    if x.shape[1] != k or offsets.numel() != e + 1:
        raise ShapeError(f"LoRA projection: x {tuple(x.shape)} against factor [E, R, K] {tuple(factor.shape)} "
                         f"with {offsets.numel()} offsets: expected x [M, {k}] and {e + 1} offsets")
    out = torch.empty(m, r, dtype=torch.bfloat16, device=x.device)
    if m == 0:
        return out
    # rounded here, not in the kernel: the interpreter's in-kernel cast truncates where torch and GPUs round
    x, factor = x.to(torch.bfloat16).contiguous(), factor.to(torch.bfloat16)
    avg = cdiv(m, e)
    interp = interpreting()
    block_m = 16 if (avg <= 16 or interp) else 32 if avg <= 32 else 64
    block_r = _rank_block(r)
    block_k, stages = _project_tile(block_m, block_r)
    grid = (cdiv(m, block_m) + e, cdiv(r, block_r), split_k)
    parts, counts = _split_buffers(x.device, grid[0] * grid[1], split_k, block_m, block_r, out)
    fast_launch.launch(_lora_project_kernel, grid, x, factor, offsets,
                       gather_rows.contiguous() if gather_rows is not None else offsets, out, parts, counts, k, e, r,
                       float(scaling), x.stride(0), factor.stride(0), factor.stride(1), factor.stride(2),
                       out.stride(0), GATHER=gather_rows is not None,
                       E_POW2=max(2, next_pow2(e)), F32_DOT=interp, SPLIT_K=split_k, BLOCK_M=block_m,
                       BLOCK_R=block_r, BLOCK_K=64 if interp else block_k, num_warps=PROJECT_WARPS,
                       num_stages=stages, **pdl.launch_options(pdl.mode(x), small=True))
    return out


def _check_gather(x: torch.Tensor, rows: torch.Tensor, m: int, device: torch.device) -> None:
    if x.dim() != 2 or x.device != device:
        raise ShapeError(f"tensor 'x': expected [T, K] on {device}, got {tuple(x.shape)} on {x.device}")
    if rows.dtype not in (torch.int32, torch.int64) or rows.shape != (m,) or rows.device != device:
        raise ShapeError(f"tensor 'gather_rows': expected int32/int64 [{m}] on {device}, got {rows.dtype} "
                         f"{tuple(rows.shape)} on {rows.device}")


def factor_in_order(a: torch.Tensor, order: str) -> torch.Tensor:
    """A [E, R, K] with its K columns in column order `order` (interleave.ORDERS): the factor that projects an
    activation given in that order (the gated GEMM's out_order) to the same h, so that the activation can stay in
    the order the down GEMM reduces in. A itself for "natural" (kb-major codes: the engine's order); else a copy."""
    if order == "natural":
        return a
    e, r, k = a.shape
    return reorder_k(a.reshape(e * r, k), "natural", order).view(e, r, k)


def grouped_wgrad(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor,
                  out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """out [E, P, Q] = a_e^T [P, rows_e] @ b_e [rows_e, Q] per expert, zero for an expert without rows; a [M, P]
    and b [M, Q] sorted rows, one of P, Q the rank. Rounded once into out_dtype (e.g. an fp32 master's)."""
    _check(offsets, a.shape[0], ("a", a), ("b", b))
    e = offsets.numel() - 1
    p, q = a.shape[1], b.shape[1]
    out = torch.empty(e, p, q, dtype=out_dtype, device=a.device)
    if a.shape[0] == 0:
        return out.zero_()
    a, b = a.to(torch.bfloat16).contiguous(), b.to(torch.bfloat16).contiguous()
    so = (out.stride(0), out.stride(1), out.stride(2))
    if p < q:  # the wide operand on the MMA's M side: compute out_e^T = b_e^T a_e into the transposed strides
        a, b, p, q, so = b, a, q, p, (so[0], so[2], so[1])
    block_q = _rank_block(q)
    interp = interpreting()
    block_p = 64 if interp else 128
    grid = (e, cdiv(p, block_p), cdiv(q, block_q))
    fast_launch.launch(_lora_wgrad_kernel, grid, a, b, offsets, out, p, q, a.stride(0), b.stride(0), *so,
                       F32_DOT=interp, BLOCK_P=block_p, BLOCK_Q=block_q, BLOCK_ROWS=16 if interp else 64,
                       num_warps=4, num_stages=3)
    return out

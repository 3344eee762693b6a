"""The engine MoE layer at prefill sizes: packed experts dequantized into a bounded bf16 scratch, then cuBLAS's
grouped GEMM (`torch._grouped_mm`).

Why: at thousands of rows per expert the GEMMs are compute bound, and a Triton 3.6 mainloop reaches about 0.7x of
cuBLAS's rate on these shapes (bench/RESULTS.md, seventh and eighth rounds). Dequantizing a layer's experts costs one
pass over their bf16 bytes, which at those sizes is smaller than the mainloop's loss; at decode sizes the fused
kernels (mlp.py, no bf16 weight ever written) stay far ahead. `use_dense` picks by rows per expert (measured:
bench/peers.py's ours_dense and ours_fused rows), and inside a CUDA graph capture only for a layer that needs no host
read (one chunk).

The weights multiplied are the fused kernels' values bit for bit (the same decode, _dense_kernels.py); only the
reduction order and the roundings between the steps differ (pre-activation rounded to bf16 by cuBLAS before the
activation, router weights applied in the fp32 combine): the engine stays at the learner's floor, not bitwise equal
to the fused path.

Memory: the scratch holds at most `scratch_budget_bytes()` of bf16 weights (w13 and w2 of a chunk of experts). A
layer that fits is done in one chunk, with no host sync; a larger one (gpt-oss-120b: 6.4 GB of bf16 experts per
layer) reads the routing's offsets once on the host and walks its experts chunk by chunk.
"""

from __future__ import annotations

import torch
import triton

from .. import envs
from ..errors import ShapeError
from ..kernels import interpreting
from . import activations as A
from . import lora as L
from ._dense_kernels import _dequant_experts_kernel, _gated_rows_kernel
from .combine import combine_rows
from .layout import is_kb_major
from .ops import weight_dims
from .routing import route

Packed = tuple[torch.Tensor, torch.Tensor]

# Rows per expert (T * k / E) from which use_dense takes this path under "auto". H100, dsv4 shape (bench/RESULTS.md,
# fourth round of 2026-12-07): dense / fused = 1.29-1.34 at 384 rows per expert, 0.93-0.96 at 768, 0.69-0.70 at
# 1536; log-linear between the first two, the paths cross at about 690 rows.
AUTO_MIN_ROWS_PER_EXPERT = 704
DEQUANT_BLOCK_N, DEQUANT_BLOCK_K = 32, 256
ACT_BLOCK_M, ACT_BLOCK_I = 16, 256


def scratch_budget_bytes() -> int:
    """envs.PREFILL_SCRATCH_MB in bytes: the most bf16 weight scratch one layer call may hold."""
    value = envs.PREFILL_SCRATCH_MB.get()
    try:
        mb = int(value)
    except ValueError:
        raise ValueError(f"{envs.PREFILL_SCRATCH_MB.name} must be a whole number of MiB, got {value!r}") from None
    if mb < 1:
        raise ValueError(f"{envs.PREFILL_SCRATCH_MB.name} must be >= 1 (MiB), got {mb}")
    return mb << 20


def use_dense(rows: int, experts: int, device: torch.device, weights: tuple[Packed, Packed] | None = None) -> bool:
    """Whether moe_layer_forward takes this path for `rows` = T * k routed rows over `experts` local experts
    (envs.HOPPER_PREFILL: "fused" never, "dense" always where it can run, "auto" from AUTO_MIN_ROWS_PER_EXPERT on
    CUDA). While the current stream captures a CUDA graph only a layer whose (w13, w2) `weights` fit the scratch in
    one chunk can (a chunked one reads the routing's offsets on the host). Cheap where it says no: the decode path
    asks on every call."""
    mode = envs.HOPPER_PREFILL.get()
    if mode == "fused" or not hasattr(torch, "_grouped_mm"):
        return False
    if mode == "dense":
        if not (device.type == "cuda" or interpreting()):
            return False
    elif not (device.type == "cuda" and rows >= AUTO_MIN_ROWS_PER_EXPERT * experts):
        return False
    capturing = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    return not (capturing and weights is not None and layer_bf16_bytes(*weights) > scratch_budget_bytes())


def layer_bf16_bytes(w13: Packed, w2: Packed) -> int:
    """Bytes of a layer's experts in bf16 (what one chunk of the scratch would hold for all of them)."""
    e, n13, h = weight_dims(*w13)
    _, h2, i = weight_dims(*w2)
    return e * (n13 * h + h2 * i) * 2


def dequantize_experts(codes: torch.Tensor, scales: torch.Tensor, experts: slice | None = None, *,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """bf16 [E', N, K] values of packed experts (canonical codes [E, N, K/2] or kb-major [E, K/32, N, 16], scales
    [E, N, K/32]); experts: a slice of them (default all); out: a contiguous bf16 buffer of at least E' * N * K
    elements to write into (its leading part is returned, viewed [E', N, K]). Exact: common.dequantize's values."""
    e, n, k = weight_dims(codes, scales)
    sel = range(e)[experts] if experts is not None else range(e)
    if sel.step != 1:
        raise ValueError(f"dequantize_experts: experts must be a contiguous slice, got {experts}")
    lo, count = sel.start, len(sel)
    need = count * n * k
    if out is None:
        out = torch.empty(need, dtype=torch.bfloat16, device=codes.device)
    elif out.dtype != torch.bfloat16 or not out.is_contiguous() or out.numel() < need:
        raise ShapeError(f"tensor 'out': expected a contiguous bf16 buffer of >= {need} elements, got {out.dtype} "
                         f"{tuple(out.shape)}")
    view = out.reshape(-1)[:need].view(count, n, k)
    if count == 0:
        return view
    if not codes.is_cuda and not interpreting():
        raise RuntimeError(f"dequantize_experts needs CUDA tensors (got {codes.device}); on CPU set "
                           "TRITON_INTERPRET=1 before importing triton, or use common.dequantize")
    kb = is_kb_major(codes)
    if codes.data_ptr() % 16:
        raise ValueError("dequantize_experts: the code buffer must be 16-byte aligned (it is read as int32 words)")
    words = codes.contiguous()[lo:lo + count].view(torch.int32)
    sc = scales.contiguous()[lo:lo + count]
    grid = (triton.cdiv(n, DEQUANT_BLOCK_N), triton.cdiv(k, DEQUANT_BLOCK_K), count)
    _dequant_experts_kernel[grid](words, sc, view, n, k, words.stride(0), words.stride(1), sc.stride(0),
                                  sc.stride(1), view.stride(0), view.stride(1), KB_MAJOR=kb,
                                  EVEN_K=k % DEQUANT_BLOCK_K == 0, BLOCK_N=DEQUANT_BLOCK_N,
                                  BLOCK_K=DEQUANT_BLOCK_K, num_warps=4)
    return view


def gated_rows(pre: torch.Tensor, activation: str, *, limit: float | None = None, bias: torch.Tensor | None = None,
               row_experts: torch.Tensor | None = None) -> torch.Tensor:
    """act [M, I] bf16 = activation(gate, up) of pre [M, 2I] ([gate | up] halves), in fp32 as the fused epilogue
    (_tiles._act_fwd); bias [E, 2I] is added first, row r taking expert row_experts[r]'s."""
    act, alpha, lim = A.kernel_constants(activation, limit)
    m, two_i = pre.shape
    if two_i % 2 or pre.stride(1) != 1:
        raise ShapeError(f"tensor 'pre': expected [M, 2I] with unit column stride, got {tuple(pre.shape)}")
    if (bias is None) != (row_experts is None):
        raise ValueError("gated_rows: give bias and row_experts together, or neither")
    if bias is not None and (bias.dim() != 2 or bias.shape[1] != two_i or row_experts.shape != (m,)):
        raise ShapeError(f"tensor 'bias': expected [E, {two_i}] with row_experts [{m}], got {tuple(bias.shape)} "
                         f"and {tuple(row_experts.shape)}")
    i = two_i // 2
    out = torch.empty(m, i, dtype=torch.bfloat16, device=pre.device)
    if m == 0:
        return out
    bias = bias.contiguous() if bias is not None else None
    grid = (triton.cdiv(m, ACT_BLOCK_M), triton.cdiv(i, ACT_BLOCK_I))
    _gated_rows_kernel[grid](pre, bias if bias is not None else pre, row_experts if row_experts is not None else pre,
                             out, m, i, pre.stride(0), bias.stride(0) if bias is not None else 0, out.stride(0),
                             ACT=act, ALPHA=alpha, LIMIT=lim, HAS_BIAS=bias is not None, BLOCK_M=ACT_BLOCK_M,
                             BLOCK_I=ACT_BLOCK_I, num_warps=4)
    return out


def expert_chunks(experts: int, bytes_per_expert: int, budget: int) -> list[tuple[int, int]]:
    """[lo, hi) expert ranges whose bf16 weights fit the budget (at least one expert per chunk)."""
    per = max(1, budget // max(1, bytes_per_expert))
    return [(lo, min(experts, lo + per)) for lo in range(0, experts, per)]


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w_e^T per group (w [G, N, K] bf16, ends int32 [G] cumulative) in bf16. cuBLAS on CUDA; under
    the interpreter (CPU tests) torch._grouped_mm's CPU kernel where it has one."""
    return torch._grouped_mm(x, w.transpose(1, 2), offs=ends)


def _experts_mm(inp: torch.Tensor, w: Packed, scratch: torch.Tensor, lo: int, hi: int, offs: torch.Tensor,
                factors: tuple[torch.Tensor, torch.Tensor] | None, scaling: float) -> torch.Tensor:
    """inp_e @ W_e^T (+ scaling * (inp_e A_e^T) B_e^T) for experts lo..hi (rows grouped by offs, starting at 0),
    through the bf16 scratch: one projection of the layer."""
    out = _grouped_mm(inp, dequantize_experts(*w, slice(lo, hi), out=scratch), offs[1:])
    if factors is not None:
        a, b = factors
        out = out + _grouped_mm(L.project(inp, offs, a[lo:hi], scaling), b[lo:hi].to(torch.bfloat16), offs[1:])
    return out


def moe_layer_forward_dense(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: Packed,
                            w2: Packed, *, activation: str, bias13: torch.Tensor | None = None,
                            bias2: torch.Tensor | None = None,
                            lora: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float] | None = None,
                            limit: float | None = None, scratch_bytes: int | None = None) -> torch.Tensor:
    """mlp.moe_layer_forward's contract (x [T, H] bf16, the router's choice, w13 [gate; up] halves, kb-major or
    canonical codes, unmerged LoRA factors with their scaling) through dequantized weights and cuBLAS; see the
    module docstring for what differs. scratch_bytes: the bf16 weight budget (default scratch_budget_bytes())."""
    t, k = topk_ids.shape
    scaling = lora[4] if lora is not None else 1.0
    e, n13, h = weight_dims(*w13)
    e2, h2, i = weight_dims(*w2)
    if e2 != e or h2 != h or n13 != 2 * i:
        raise ShapeError(f"tensor 'w2': expected [{e}, {h}, {n13 // 2}] to follow w13 [{e}, {n13}, {h}], got "
                         f"[{e2}, {h2}, {i}]")
    if x.dtype != torch.bfloat16 or x.shape != (t, h):
        raise ShapeError(f"tensor 'x': expected bfloat16 [{t}, {h}], got {x.dtype} {tuple(x.shape)}")
    routing = route(topk_ids, e)
    m = t * k
    flat_ids = topk_ids.reshape(-1)
    xs = x.index_select(0, routing.token)  # expert-sorted rows, the grouped GEMM's A operand
    row_experts = flat_ids.index_select(0, routing.source) if bias13 is not None else None
    y = None
    budget = scratch_budget_bytes() if scratch_bytes is None else scratch_bytes
    chunks = expert_chunks(e, (n13 * h + h * i) * 2, budget)
    per = chunks[0][1] - chunks[0][0]
    scratch13 = torch.empty(per * n13 * h, dtype=torch.bfloat16, device=x.device)
    scratch2 = torch.empty(per * h * i, dtype=torch.bfloat16, device=x.device)
    # one chunk: every group boundary stays on the device; several: one host read of the offsets slices the rows
    host = routing.offsets.tolist() if len(chunks) > 1 else None
    for lo, hi in chunks:
        r0, r1 = (0, m) if host is None else (host[lo], host[hi])
        if r1 == r0:
            continue
        offs = routing.offsets[lo:hi + 1] - routing.offsets[lo]  # int32 [E'+1], starting at 0
        pre = _experts_mm(xs[r0:r1], w13, scratch13, lo, hi, offs, None if lora is None else lora[0:2], scaling)
        act = gated_rows(pre, activation, limit=limit,
                         bias=None if bias13 is None else bias13[lo:hi],
                         row_experts=None if row_experts is None else row_experts[r0:r1] - lo)
        del pre
        yc = _experts_mm(act, w2, scratch2, lo, hi, offs, None if lora is None else lora[2:4], scaling)
        if host is None:
            y = yc
        else:
            if y is None:
                y = torch.empty(m, h, dtype=torch.bfloat16, device=x.device)
            y[r0:r1] = yc
    if y is None:  # pragma: no cover - m > 0 always gives some chunk rows
        raise RuntimeError("moe_layer_forward_dense: no rows were computed")
    return combine_rows(y, routing.inverse, topk_weights.float(), x.dtype,
                        bias=bias2, expert_ids=flat_ids if bias2 is not None else None)

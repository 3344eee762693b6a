"""Token permutation for grouped MoE GEMMs: top-k routing -> expert-sorted rows, and the weighted un-permute.

Free of host syncs on CUDA (no bincount/nonzero/.item()), so the engine can capture it in a CUDA graph. route()
sorts with small Triton kernels (common/grouped_gemm/_routing_kernels.py: one launch for decode-sized batches,
three beyond) on CUDA or under TRITON_INTERPRET=1; route_torch() is the pure-torch reference and the CPU path,
and gives the same result bit for bit.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import DTypeError, ShapeError
from ..kernels import interpreting
from ._routing_kernels import MAX_EXPERTS, sort_by_expert


@dataclasses.dataclass(frozen=True)
class Routing:
    """token: source token of each sorted row [T*k]; inverse: sorted row of each (token, slot), flat [T*k];
    offsets: int32 [E+1] rows per expert, cumulative; top_k: k; source: flat (token * k + slot) index of each
    sorted row [T*k] (the stable argsort itself: token == source // k, inverse[source] == arange(T*k))."""

    token: torch.Tensor
    inverse: torch.Tensor
    offsets: torch.Tensor
    top_k: int
    source: torch.Tensor


def _check(topk_ids: torch.Tensor, num_experts: int, validate: bool | None) -> None:
    """dtype/shape always; the id range only with validate (default: off on CUDA, where it would sync the host)."""
    if topk_ids.dim() != 2 or topk_ids.dtype not in (torch.int32, torch.int64):
        raise DTypeError(f"tensor 'topk_ids': expected int32/int64 [T, k], got {topk_ids.dtype} "
                         f"{tuple(topk_ids.shape)}")
    if validate is None:
        validate = not topk_ids.is_cuda
    if validate and topk_ids.numel():
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi >= num_experts:
            raise ShapeError(f"tensor 'topk_ids': expert ids must lie in [0, {num_experts}), got [{lo}, {hi}]")


def route(topk_ids: torch.Tensor, num_experts: int, *, validate: bool | None = None) -> Routing:
    """Sort the T*k (token, slot) pairs by expert (stable: tokens keep their order inside an expert).

    Triton kernels for CUDA ids (and on CPU under TRITON_INTERPRET=1), else route_torch; the results are equal.
    Unvalidated ids outside [0, num_experts) leave the kernels' rows for them unwritten (never out of bounds).
    """
    _check(topk_ids, num_experts, validate)
    if (topk_ids.is_cuda or interpreting()) and num_experts <= MAX_EXPERTS:
        source, token, inverse, offsets = sort_by_expert(topk_ids, num_experts)
        return Routing(token=token, inverse=inverse, offsets=offsets, top_k=topk_ids.shape[1], source=source)
    return _sort_torch(topk_ids, num_experts)


def route_torch(topk_ids: torch.Tensor, num_experts: int, *, validate: bool | None = None) -> Routing:
    """route() in plain torch ops (a stable torch.sort): the reference of the kernels, and the CPU path."""
    _check(topk_ids, num_experts, validate)
    return _sort_torch(topk_ids, num_experts)


def _sort_torch(topk_ids: torch.Tensor, num_experts: int) -> Routing:
    t, k = topk_ids.shape
    flat = topk_ids.reshape(-1).to(torch.int64)
    _, order = torch.sort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=flat.device)
    offsets[1:] = counts.cumsum(0)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return Routing(token=order // k, inverse=inverse, offsets=offsets, top_k=k, source=order)


def permute(x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """x [T, H] -> expert-sorted rows [T*k, H] (each token repeated once per chosen expert)."""
    return x.index_select(0, routing.token)


def unpermute(y_sorted: torch.Tensor, routing: Routing, topk_weights: torch.Tensor) -> torch.Tensor:
    """sum_j topk_weights[t, j] * y_sorted[row of (t, j)] -> [T, H], accumulated in fp32, in y_sorted's dtype.
    Differentiable in y_sorted and topk_weights (gather + weighted sum)."""
    t, k = topk_weights.shape
    if k != routing.top_k or y_sorted.shape[0] != t * k:
        raise ShapeError(f"unpermute: topk_weights {tuple(topk_weights.shape)} and y_sorted "
                         f"{tuple(y_sorted.shape)} do not match the routing (k={routing.top_k})")
    y = y_sorted.index_select(0, routing.inverse).view(t, k, -1).float()
    return (y * topk_weights.float().unsqueeze(-1)).sum(1).to(y_sorted.dtype)

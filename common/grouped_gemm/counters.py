"""Tile counters of the kernels whose programs sum fp32 partials in a fixed order, the last of them finishing the
tile: the split-K LoRA projections (lora.project) and the gated GEMM's fused next projection (ops, project=).

Each kernel counts its programs in per tile and the last one puts the count back to zero, so the buffer is zero
between launches. One buffer per device and stream: one stream's kernels run one after the other (with PDL too:
each waits for the one before it, pdl.py), two streams' may overlap. Grown, never shrunk; a replaced buffer is kept
alive, since a captured CUDA graph may still use it.
"""

from __future__ import annotations

import torch

_COUNTS: dict[tuple[torch.device, int], list[torch.Tensor]] = {}


def counter_key(device: torch.device) -> tuple[torch.device, int]:
    return device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """An int32 buffer of at least `tiles` zeros for the current stream of `device`."""
    kept = _COUNTS.setdefault(counter_key(device), [])
    if not kept or kept[-1].numel() < tiles:
        kept.append(torch.zeros(max(tiles, 1024), dtype=torch.int32, device=device))
    return kept[-1]


def current(device: torch.device) -> torch.Tensor | None:
    """The buffer tile_counters last gave for this device's current stream (tests check it is back at zero)."""
    kept = _COUNTS.get(counter_key(device))
    return kept[-1] if kept else None

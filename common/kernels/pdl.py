"""Programmatic dependent launch (PDL, sm_90+) of the MoE layer's kernels: routing, the LoRA projections, the forward
grouped GEMMs and the slot sum (learner and engine alike).

A kernel launched with PDL may be scheduled before the kernel ahead of it in the stream has finished; it starts
with `griddepcontrol.wait`, which returns once every earlier kernel has completed and its memory is visible, so
every load and store after it sees the same data as without PDL (the wait comes before the first access of any
kernel here: no reordering, only the launch gap between two kernels of the chain is hidden). A kernel may also
signal `griddepcontrol.launch_dependents` to let the next one be scheduled before it ends. Both instructions are
no-ops in a kernel launched without PDL. CUDA graphs capture the programmatic edges.

Modes (MXFP4_PDL, common.envs): off; wait; early (each kernel also signals at its start); loop (the grouped GEMMs
signal after their K loop instead, the small kernels at their start).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import envs
from .launch import interpreting

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    AVAILABLE = True
except ImportError:  # a Triton without grid dependency control: PDL stays off
    AVAILABLE = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass

MODES = {"off": 0, "wait": 1, "early": 2, "loop": 3}


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def mode(t: torch.Tensor) -> int:
    """The PDL mode of a launch on t's device: 0 under the interpreter, off CUDA and before sm_90."""
    # every launch of these kernels asks: one environment lookup, the rest remembered per value and device
    m = _parsed(envs.PDL.raw())
    if not m or not t.is_cuda:
        return 0
    return m if _capable(t.device.index if t.device.index is not None else torch.cuda.current_device()) else 0


@functools.cache
def _parsed(raw: str | None) -> int:
    """MXFP4_PDL's mode for its raw value (a bad value raises, and is not remembered); 0 where PDL cannot run."""
    m = MODES[envs.PDL.default if raw is None else envs.PDL.get()]
    return 0 if interpreting() or not AVAILABLE else m


def launch_options(m: int, small: bool = False) -> dict:
    """Keywords of a launch in mode m: the kernel's PDL constexpr and Triton's launch_pdl option. small: a kernel
    without a K loop, which signals at its start in mode "loop"."""
    if not m:
        return {"PDL": 0}
    return {"PDL": min(m, MODES["early"]) if small else m, "launch_pdl": True}


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """First statement of a kernel: wait for the kernels before it (PDL >= 1); signal the next one (PDL == 2)."""
    if PDL >= 1:
        gdc_wait()
    if PDL == 2:
        gdc_launch_dependents()


@triton.jit
def pdl_after_loop(PDL: tl.constexpr):
    """After a GEMM's K loop: signal the next kernel (PDL == 3)."""
    if PDL == 3:
        gdc_launch_dependents()

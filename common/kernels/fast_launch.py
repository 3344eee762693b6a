"""Repeat launches of a @triton.jit kernel without JITFunction.run's per-call work.

Triton's launch path binds and specializes every argument, builds a cache key and reads its runtime knobs on each
call. A decode-size learner step launches 12 kernels and, eager, is bound by host time (bench/host_profile.py).
`launch` keeps the compiled kernel of a call and starts later calls with an equal key through that compiled
kernel's own launcher (`CompiledKernel[grid]`, the entry Triton's ahead-of-time users call): 90-110 us less host
time per learner step on an H100 host (bench/RESULTS.md, ninth round).

The key is at least as fine as Triton's specialization, or a kernel compiled for 16-byte aligned pointers or for
a stride equal to 1 could run on other arguments: tensors by dtype and 16-byte alignment, ints by (== 1,
divisible by 16, int32 range, uint64 range), floats by type, every other argument and keyword (constexprs,
launch options) by value, plus the current device. tests/common/test_fast_launch.py checks it against Triton's
own specializer. MXFP4_FAST_LAUNCH=0 (common.envs.FAST_LAUNCH) turns it off (every call through kernel[grid]); the
interpreter never uses it.
"""

from __future__ import annotations

import warnings

import torch

from .. import envs
from .launch import interpreting

_CACHE: dict[tuple, tuple] = {}  # key -> (compiled kernel, keyword values in parameter order)
_STATS = {"hits": 0, "misses": 0}
_BROKEN = False

_I32 = (-(1 << 31), 1 << 31)
_U64_FROM = 1 << 63


def enabled() -> bool:
    return envs.FAST_LAUNCH.get()


def arg_key(a) -> tuple:
    """What a compiled kernel depends on in one positional argument (see the module docstring)."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if type(a) is int:
        return (int, a == 1, a % 16 == 0, _I32[0] <= a < _I32[1], a >= _U64_FROM)
    if type(a) is float:
        return (float,)  # passed as fp32, never specialized on its value
    return (type(a), a)


def _param_names(kernel) -> tuple[str, ...] | None:
    names = getattr(kernel, "arg_names", None)
    return tuple(names) if names is not None else None


def _disable(exc: Exception) -> None:
    """A Triton whose CompiledKernel launches differently: every later launch takes the regular path."""
    global _BROKEN
    _BROKEN = True
    _CACHE.clear()
    warnings.warn(f"fast_launch: this triton's compiled-kernel launcher refused a cached launch ({exc!r}); "
                  "launching through kernel[grid] from now on", RuntimeWarning, stacklevel=3)


def stats() -> dict[str, int]:
    """Launches served from the cache (hits) and through Triton's own path (misses), since import."""
    return dict(_STATS)


def launch(kernel, grid: tuple[int, ...], *args, **kw) -> None:
    """kernel[grid](*args, **kw) for a raw @triton.jit kernel whose parameters after the positional ones are all
    given by keyword (constexprs), plus Triton launch options (num_warps, num_stages, maxnreg) by keyword."""
    first = args[0] if args else None
    if _BROKEN or not (isinstance(first, torch.Tensor) and first.is_cuda) or not enabled() or interpreting():
        kernel[grid](*args, **kw)
        return
    key = (kernel, torch.cuda.current_device(), tuple(kw.items()), tuple(map(arg_key, args)))
    hit = _CACHE.get(key)
    if hit is not None:
        compiled, tail = hit
        try:
            compiled[(*grid, 1, 1)[:3]](*args, *tail)
        except (TypeError, AttributeError) as exc:  # the compiled kernel's interface is not the one known here
            _disable(exc)
            kernel[grid](*args, **kw)
            return
        _STATS["hits"] += 1
        return
    _STATS["misses"] += 1
    compiled = kernel[grid](*args, **kw)
    names = _param_names(kernel)
    runnable = hasattr(compiled, "run") and callable(getattr(type(compiled), "__getitem__", None))
    if names is None or not runnable or not all(n in kw for n in names[len(args):]):
        return  # an unknown Triton or a parameter left to its default: keep the regular path
    _CACHE[key] = (compiled, tuple(kw[n] for n in names[len(args):]))

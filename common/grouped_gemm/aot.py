"""Ahead-of-time compilation of the grouped GEMM kernels for sm_90 on any machine: Triton's bundled ptxas, no GPU.

The inline-PTX decodes never run under the interpreter, so CI compiles them this way (the sm_90 compile test of
tests/common/test_grouped_gemm.py) and bench/sass_loop.py counts the K loop's SASS of the result. Both need the
signature a real launch would specialize; this module is the one place that builds it. Import it in a process
where TRITON_INTERPRET is unset (the test runs it in a child process).
"""

from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

SM90 = GPUTarget("cuda", 90, 32)


def compile_sm90(kernel, const: dict, ptr_types: dict[str, str], ints: dict[str, int] | None = None, *,
                 num_warps: int = 4, num_stages: int = 3):
    """triton.compile of a raw @triton.jit kernel (common/grouped_gemm/_kernels.py) for sm_90.

    const: constexpr values by parameter name (names the kernel lacks are ignored, so one dict serves both
    kernels); ptr_types: Triton types by parameter name (default "*bf16" for the pointers, `*_ptr`, and "i32" for
    every other parameter; e.g. "fp32" for a scale factor). Pointers carry the 16-byte divisibility a torch
    allocation has, and so do the ints whose runtime value in `ints` divides by 16, as the JIT would specialize
    them."""
    sig, constexprs, attrs = {}, {}, {}
    for idx, name in enumerate(kernel.arg_names):
        if name in const:
            sig[name], constexprs[(idx,)] = "constexpr", const[name]
            continue
        pointer = name.endswith("_ptr")
        sig[name] = ptr_types.get(name, "*bf16" if pointer else "i32")
        if pointer or (ints is not None and ints.get(name, 1) % 16 == 0):
            attrs[(idx,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(kernel, sig, constexprs, attrs), target=SM90,
                          options=dict(num_warps=num_warps, num_stages=num_stages))

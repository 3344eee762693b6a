"""Grouped MoE GEMMs with MXFP4 weights dequantized in the kernel (learner forward/backward, engine Hopper path).

The pure-torch modules import without triton: `reference` (the fp32 twins of the grouped GEMMs, of the gated
activation's backward and of the whole expert MLP), `layout` (the kb-major code layout), `activations`,
`interleave` and `configs`. The names below other than `TileConfig` load their Triton modules on first access;
set TRITON_INTERPRET=1 before that to run the kernels on CPU. Routing's twin is `routing.route_torch`; the LoRA
kernels (`lora`) and the top-k sum (`combine`) have none in the package: their tests spell out the contract as
fp32 loops. docs/kernels.md describes the seam.
"""

import importlib

from .configs import TileConfig

# name -> the submodule that defines it; imported on first access (PEP 562), so that importing a pure-torch
# submodule, which runs this file first, does not import triton
_LAZY = {
    "MXFP4GroupedMLP": ".mlp",
    "moe_layer_forward": ".mlp",
    "moe_mlp_forward": ".mlp",
    "check_offsets": ".ops",
    "grouped_mm_mxfp4": ".ops",
    "grouped_mm_mxfp4_dx": ".ops",
    "grouped_mm_mxfp4_gated": ".ops",
    "Routing": ".routing",
    "permute": ".routing",
    "route": ".routing",
    "unpermute": ".routing",
}

__all__ = [
    "MXFP4GroupedMLP",
    "Routing",
    "TileConfig",
    "check_offsets",
    "grouped_mm_mxfp4",
    "grouped_mm_mxfp4_dx",
    "grouped_mm_mxfp4_gated",
    "moe_layer_forward",
    "moe_mlp_forward",
    "permute",
    "route",
    "unpermute",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

"""Grouped MoE GEMMs with MXFP4 weights dequantized in the kernel (learner forward/backward, engine Hopper path).

Importing this package imports triton: set TRITON_INTERPRET=1 before the import to run the kernels on CPU.
Pure-torch twins of every kernel live in common.grouped_gemm.reference. docs/kernels.md describes the seam.
"""

from .configs import TileConfig
from .mlp import MXFP4GroupedMLP, moe_layer_forward, moe_mlp_forward
from .ops import check_offsets, grouped_mm_mxfp4, grouped_mm_mxfp4_dx, grouped_mm_mxfp4_gated
from .routing import Routing, permute, route, unpermute

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

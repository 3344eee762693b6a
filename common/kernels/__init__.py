"""Triton kernels of the MXFP4/MXFP8 codec, byte-identical to common.reference (GPU; CPU with TRITON_INTERPRET=1).

Importing this package imports triton: set TRITON_INTERPRET=1 before the import to run the kernels on CPU.
"""

from .launch import dequantize_mxfp4_triton, interpreting, quantize_mxfp4_triton, quantize_mxfp8_triton

__all__ = ["dequantize_mxfp4_triton", "interpreting", "quantize_mxfp4_triton", "quantize_mxfp8_triton"]

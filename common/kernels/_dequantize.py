"""@triton.jit kernel: MXFP4 dequantization of [n_blocks, 16] packed codes + [n_blocks] scales to [n_blocks, 32].

Exact, as common.reference.dequantize_mxfp4: E2M1 value * 2^(scale - 127) in fp32 (an IEEE multiply that keeps
subnormal products), then the cast. The fp32 product always fits bf16 exactly (2 significant bits, fp32's
exponent range), so the bf16 output is the top half of the fp32 bits; fp16 uses the round-to-nearest-even cast.
"""

import triton
import triton.language as tl

from ._elements import _e2m1_bits
from ._scale import _scale_value

OUT_FP32 = tl.constexpr(0)
OUT_BF16 = tl.constexpr(1)
OUT_FP16 = tl.constexpr(2)


@triton.jit
def _dequantize_mxfp4_kernel(codes_ptr, scales_ptr, out_ptr, n_blocks,
                             OUT_KIND: tl.constexpr, BLOCKS: tl.constexpr):
    pid = tl.program_id(0)
    first = pid.to(tl.int64) * BLOCKS
    rows = tl.arange(0, BLOCKS)
    row_ok = rows < n_blocks - first
    cols16 = tl.arange(0, 16)
    packed = tl.load(codes_ptr + first * 16 + rows[:, None] * 16 + cols16[None, :], mask=row_ok[:, None], other=0)
    packed = packed.to(tl.uint32)
    nib = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCKS, 32))
    code = tl.load(scales_ptr + first + rows, mask=row_ok, other=127).to(tl.int32)
    values = _e2m1_bits(nib).to(tl.float32, bitcast=True) * _scale_value(code)[:, None]
    cols = tl.arange(0, 32)
    out_ptrs = out_ptr + first * 32 + rows[:, None] * 32 + cols[None, :]
    if OUT_KIND == OUT_BF16:
        # out_ptr is the bf16 output viewed as int16
        bits = (values.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16).to(tl.int16, bitcast=True)
        tl.store(out_ptrs, bits, mask=row_ok[:, None])
    elif OUT_KIND == OUT_FP16:
        tl.store(out_ptrs, values.to(tl.float16), mask=row_ok[:, None])
    else:
        tl.store(out_ptrs, values, mask=row_ok[:, None])

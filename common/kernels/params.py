"""Profile -> kernel compile-time constants, and the launch configurations.

Pure Python (no triton import), so it can be unit-tested and read without a GPU.
"""

from __future__ import annotations

import struct

import torch

from .. import constants as C
from ..formats import ElementFormat
from ..profiles import Profile, ScaleRule, TieRule

_RULES = {ScaleRule.RCEIL: 0, ScaleRule.FLOOR: 1, ScaleRule.EVEN: 2, ScaleRule.CEIL_QUOTIENT: 3}
IN_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
OUT_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def f32_bits(value: float) -> int:
    """Bit pattern of value rounded to fp32."""
    return struct.unpack("<I", struct.pack("<f", value))[0]


def scale_constants(profile: Profile, fmt: ElementFormat) -> dict[str, int]:
    """Constants of the scale rule (see common/kernels/_scale.py::_scale_byte)."""
    if int(fmt.max_value) % 2:
        # CEIL_QUOTIENT's zero test needs (max / 2) * 2^-149 to be an fp32 value (3 for E2M1, 224 for E4M3).
        raise ValueError(f"element format {fmt.name}: max_value {fmt.max_value} must be an even integer")
    floor_bits = 0 if profile.amax_floor is None else f32_bits(profile.amax_floor)
    if floor_bits >= 0x7F800000:
        raise ValueError(f"profile {profile.name!r}: amax_floor must be finite, got {profile.amax_floor}")
    return dict(
        RULE=_RULES[profile.scale_rule],
        EMAX=fmt.emax,
        RCEIL_THRESHOLD=fmt.rceil_threshold,
        EVEN_ROUND=1 << (C.F32_MANT_BITS - fmt.mbits - 1),
        AMAX_FLOOR_BITS=floor_bits,
        CQ_NORMAL_MIN_BITS=f32_bits(fmt.max_value * 2.0**-126),
        CQ_ZERO_MAX_BITS=int(fmt.max_value) // 2,
        INF_SCALE=profile.inf_scale,
        NAN_SCALE=profile.nan_scale,
        CODE0_EXP=-1 if profile.code0_exponent is None else profile.code0_exponent,
    )


def mxfp4_constants(profile: Profile, fmt: ElementFormat) -> dict[str, int]:
    return dict(scale_constants(profile, fmt), TIE_AWAY=profile.tie_rule is TieRule.AWAY,
                NAN_ELEMENT=profile.nan_element)


# Launch configurations: (scale blocks per program, warps). GPU values chosen by `bench/codec.py --sweep` on an
# H100 80GB HBM3 with triton 3.6 (bench/RESULTS.md: 0.85 / 0.97 / 0.96 of copy bandwidth). The interpreter
# runs one program at a time with ~ms of fixed cost each, so it gets large programs to keep CI fast.
GPU_CONFIG = {"quantize_mxfp4": (128, 4), "dequantize_mxfp4": (32, 4), "quantize_mxfp8": (128, 4)}
INTERPRETER_BLOCKS = 512

"""The shared MXFP4 codec of mxfp4-rl: one format definition for the rollout engine and the learner."""

from .api import (
    dequantize,
    dequantize_mxfp8,
    fake_quant,
    fake_quant_mxfp8,
    quantize,
    quantize_mxfp8,
)
from .errors import DTypeError, MXFP4Error, NonFiniteError, ShapeError, UnknownProfileError
from .profiles import DEFAULT_PROFILE, Profile, ScaleRule, TieRule, get_profile, profile_names
from .tensor import MXFP4Tensor

__all__ = [
    "DEFAULT_PROFILE",
    "DTypeError",
    "MXFP4Error",
    "MXFP4Tensor",
    "NonFiniteError",
    "Profile",
    "ScaleRule",
    "ShapeError",
    "TieRule",
    "UnknownProfileError",
    "dequantize",
    "dequantize_mxfp8",
    "fake_quant",
    "fake_quant_mxfp8",
    "get_profile",
    "profile_names",
    "quantize",
    "quantize_mxfp8",
]

"""Named MXFP4/MXFP8 quantizer profiles.

A profile pins every choice where real quantizers differ: how the block scale is derived from the block
absmax, how elements round, and what all-zero, tiny, Inf and NaN blocks become. One function
(`common.reference.quantize_mxfp4` / `quantize_mxfp8`, and their Triton twins in common.kernels) implements all of
them; the profile is data. A profile is chosen once per model
and recorded in the checkpoint's `quantization_config` and in the engine's config; both sides read it from
there, never from a default.

Scale rules (amax = largest |x| of the 32-element block, as fp32; E, M = its exponent and mantissa fields):
  RCEIL          code = ceil(log2(amax / emax_value)) + 127, computed exactly from the bits of amax:
                 E - emax_exp + (M > mantissa of emax_value). (cuBLAS/TRT-LLM "RCEIL", `cvt.rp.ue8m0`.)
  FLOOR          code = floor(log2(amax)) - emax_exp + 127 = E - emax_exp. (OCP MX v1.0 section 6.3.)
  EVEN           FLOOR of amax rounded to the element's mantissa width first (add half an element ulp to the
                 bits, truncate): E' - emax_exp. (Quark / compressed-tensors "even", torchao EVEN.)
  CEIL_QUOTIENT  q = fl(amax / emax_value) (fp32 division, round to nearest even), then the next power of two
                 at or above q from q's bits: (bits(q) + 0x7FFFFF) & 0x7F800000. (OpenAI triton_kernels
                 ROUND_UP, DeepSeek `fast_round_scale`.) Equal to RCEIL wherever q is normal (checked on every
                 finite fp32 amax); differs only for subnormal q, i.e. amax < emax_value * 2^-126.
Codes are clamped to [0, 254]. Elements are x * 2^(127 - code) in fp32, rounded to the element grid and
saturated; a code-0 block uses 2^code0_exponent instead of 2^127 where a peer does so.
"""

from __future__ import annotations

import dataclasses
import enum

from .errors import UnknownProfileError


class ScaleRule(enum.Enum):
    RCEIL = "rceil"
    FLOOR = "floor"
    EVEN = "even"
    CEIL_QUOTIENT = "ceil_quotient"


class TieRule(enum.Enum):
    EVEN = "even"  # round half to even (IEEE default, `cvt.rn`)
    AWAY = "away"  # round half away from zero


@dataclasses.dataclass(frozen=True)
class Profile:
    """One quantizer's complete rule set. See the module docstring for the scale rules."""

    name: str
    scale_rule: ScaleRule
    tie_rule: TieRule = TieRule.EVEN
    # The block amax is raised to at least this value before the scale rule (None: no floor).
    amax_floor: float | None = None
    # Elements of a block whose scale code is 0 are multiplied by 2^code0_exponent. 127 is the exact OCP rule;
    # some peers use a smaller multiplier there (they avoid a subnormal fp32 scale); None zeroes the elements
    # (keeping their sign), as kernels do that compute the multiplier as rcp(scale) with flush-to-zero.
    code0_exponent: int | None = 127
    # Scale byte of a block whose amax is +Inf, and of a block holding a NaN (only with nonfinite="profile").
    # In an Inf block elements are x * 2^(127 - min(byte, 254)), so Inf saturates to +-6 and finite values
    # usually round to +-0. In a NaN block finite elements become +-0 and NaN/Inf elements sign | nan_element.
    inf_scale: int = 0xFE
    nan_scale: int = 0xFF
    # Element magnitude code written for a NaN element (only with nonfinite="profile"); the sign bit is kept.
    nan_element: int = 0x7
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.scale_rule, ScaleRule):
            raise TypeError(f"profile {self.name!r}: scale_rule must be a ScaleRule, got {self.scale_rule!r}")
        if not isinstance(self.tie_rule, TieRule):
            raise TypeError(f"profile {self.name!r}: tie_rule must be a TieRule, got {self.tie_rule!r}")
        if self.code0_exponent is not None and not 0 <= self.code0_exponent <= 127:
            raise ValueError(f"profile {self.name!r}: code0_exponent must be in [0, 127], got {self.code0_exponent}")
        for field in ("inf_scale", "nan_scale"):
            value = getattr(self, field)
            if not 0 <= value <= 255:
                raise ValueError(f"profile {self.name!r}: {field} must be a byte, got {value}")
        if not 0 <= self.nan_element <= 7:
            raise ValueError(f"profile {self.name!r}: nan_element must be in [0, 7], got {self.nan_element}")


_PROFILES: dict[str, Profile] = {}


def register_profile(profile: Profile) -> Profile:
    if profile.name in _PROFILES and _PROFILES[profile.name] != profile:
        raise ValueError(f"a different profile named {profile.name!r} is already registered")
    _PROFILES[profile.name] = profile
    return profile


def get_profile(profile: str | Profile) -> Profile:
    """The profile of that name (or the profile itself). Unknown names list the known ones."""
    if isinstance(profile, Profile):
        return profile
    try:
        return _PROFILES[profile]
    except (KeyError, TypeError):
        known = ", ".join(sorted(_PROFILES))
        raise UnknownProfileError(f"unknown MXFP4 profile {profile!r}; known profiles: {known}") from None


def profile_names() -> list[str]:
    return sorted(_PROFILES)


def reserved_scale_bytes(profile: str | Profile) -> dict[int, str]:
    """{scale byte: why} of the bytes that no finite weight quantized with this profile can carry.

    0xFF is E8M0 NaN (OCP MX v1.0 section 5.4.1); the profile's `inf_scale` marks a block that held +-Inf; every byte
    above the largest code the scale rule gives a finite fp32 amax (3.4e38: 253 for RCEIL / CEIL_QUOTIENT / EVEN, 252
    for FLOOR) is unreachable. Loaders refuse them all: served, they dequantize to Inf/NaN (0xFE is 2^127, so a code
    of 4 or 6 overflows bf16) and the engine would return NaN log-probs. A NaN block of triton_kernels (byte 0) is
    indistinguishable from an all-zero block and stays allowed.
    """
    import torch

    from .formats import E2M1
    from .scale import scale_codes

    prof = get_profile(profile)
    top = int(scale_codes(torch.tensor([torch.finfo(torch.float32).max], dtype=torch.float32), prof, E2M1)[0])
    out = {b: f"above {top}, the largest byte a finite weight gets under profile {prof.name!r}"
           for b in range(top + 1, 256)}
    out[prof.inf_scale] = f"the Inf-block byte of profile {prof.name!r}"
    out[0xFF] = "E8M0 NaN"
    return dict(sorted(out.items()))


DEFAULT_PROFILE = "flashinfer"

FLASHINFER = register_profile(Profile(
    name="flashinfer",
    scale_rule=ScaleRule.RCEIL,
    code0_exponent=None,
    description="Default. RCEIL scale (cvt.rp.satfinite.ue8m0 of amax/6, as FlashInfer's cvt_warp_fp16_to_fp4 "
                "and cuBLAS derive it), round-half-to-even elements saturating at 6 (cvt.rn.satfinite.e2m1x2). "
                "amax <= 6*2^-127 -> scale 0 and +-0 elements (FlashInfer's multiplier is 0 there; torchao RCEIL "
                "agrees). Inf -> 0xFE. Not emulated: FlashInfer's flush-to-zero, which also zeroes blocks with "
                "amax in (6*2^-127, 6*2^-126) and subnormal elements (compiled with -use_fast_math).",
))
OCP = register_profile(Profile(
    name="ocp",
    scale_rule=ScaleRule.FLOOR,
    inf_scale=0xFD,
    description="OCP MX v1.0 section 6.3: X = 2^(floor(log2 amax) - 2), elements x/X rounded half to even and "
                "clamped to +-6 (values up to 8X saturate). Code-0 blocks use the exact 2^127. Inf -> 0xFD.",
))
EVEN = register_profile(Profile(
    name="even",
    scale_rule=ScaleRule.EVEN,
    inf_scale=0xFD,
    description="AMD Quark / compressed-tensors / vLLM's own mxfp4_quantize 'even' rule: amax rounded to one "
                "mantissa bit (half up) before the floor, so blocks with amax in [7, 8) * 2^k do not saturate. "
                "Code-0 blocks use the exact 2^127 (vLLM's kernel; torchao's EVEN uses 2^126 there).",
))
TORCHAO = register_profile(Profile(
    name="torchao",
    scale_rule=ScaleRule.FLOOR,
    code0_exponent=126,
    inf_scale=0xFD,
    nan_element=0x3,
    description="torchao 0.18 to_mx default (ScaleCalculationMode.FLOOR): the OCP rule from the exponent bits, "
                "but code-0 blocks are multiplied by 2^126 (torchao clamps the fp32 scale to the smallest normal). "
                "Inf -> 0xFD; NaN block -> 0xFF with finite elements +-0 and NaN elements code 3.",
))
DEEPSEEK_V4 = register_profile(Profile(
    name="deepseek_v4",
    scale_rule=ScaleRule.CEIL_QUOTIENT,
    amax_floor=6.0 * 2.0**-126,
    description="DeepSeek-V4 fp4 activation quantizer (inference/kernel.py fp4_quant_kernel): amax floored at "
                "6*2^-126 (so the scale byte is at least 1), scale = next power of two at or above fl(amax/6) "
                "from its bits, elements clamped to +-6 and rounded half to even.",
))
TRITON_KERNELS = register_profile(Profile(
    name="triton_kernels",
    scale_rule=ScaleRule.CEIL_QUOTIENT,
    code0_exponent=None,
    inf_scale=0xFF,
    nan_scale=0x00,
    description="OpenAI triton_kernels downcast_to_mxfp, DequantScaleRoundingMode.ROUND_UP: byte = "
                "((bits(amax/6) + 0x7FFFFF) & 0x7F800000) >> 23, so any subnormal amax/6 gives byte 1; byte 0 only "
                "for all-zero blocks (multiplier 0). Elements rounded half to even (current triton_kernels; older "
                "releases rounded ties away). Inf -> 0xFF; a NaN amax overflows to byte 0.",
))

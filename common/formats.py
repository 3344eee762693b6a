"""Element formats of the MX family that the codec writes: E2M1 (MXFP4) and E4M3 (MXFP8)."""

from __future__ import annotations

import dataclasses

from . import constants as C


@dataclasses.dataclass(frozen=True)
class ElementFormat:
    name: str
    max_value: float  # largest finite magnitude
    emax: int  # exponent of max_value: max_value = (1 + max_mantissa / 2^mbits) * 2^emax
    mbits: int  # explicit mantissa bits
    max_mantissa: int  # mantissa field of max_value, as the top bits of an fp32 mantissa

    @property
    def rceil_threshold(self) -> int:
        """fp32 mantissa field above which amax / max_value exceeds the power of two 2^(E - 127 - emax)."""
        return self.max_mantissa << (C.F32_MANT_BITS - self.mbits)


E2M1 = ElementFormat(name="e2m1", max_value=C.E2M1_MAX, emax=C.E2M1_EMAX, mbits=1, max_mantissa=0b1)
E4M3 = ElementFormat(name="e4m3", max_value=C.E4M3_MAX, emax=C.E4M3_EMAX, mbits=3, max_mantissa=0b110)

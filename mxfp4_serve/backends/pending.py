"""Backends that are designed but not written yet. They are registered so that the oracle's error and log name
them and say why they were skipped; each becomes a real backend in its issue."""

from __future__ import annotations

from .base import DeviceInfo, MoEBackend


class _Pending(MoEBackend):
    min_capability: tuple[int, int] = (0, 0)
    issue: str = ""

    @classmethod
    def supports(cls, device: DeviceInfo) -> tuple[bool, str]:
        if device.kind != "cuda" or device.capability is None:
            return False, f"needs a CUDA device of capability >= sm{cls.min_capability[0]}{cls.min_capability[1]}"
        if device.capability < cls.min_capability:
            return False, f"needs capability >= sm{cls.min_capability[0]}{cls.min_capability[1]}, got {device}"
        return False, f"not implemented yet ({cls.issue})"

    def apply(self, *args, **kwargs):
        raise NotImplementedError(f"MoE backend {self.name!r} is not implemented yet ({self.issue})")


class SM100FlashInferBackend(_Pending):
    """SM100 FlashInfer TRT-LLM MXFP4 MoE (bf16 or MXFP8 activations)."""

    name = "sm100_flashinfer"
    min_capability = (10, 0)
    issue = "issue 8"

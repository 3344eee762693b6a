"""Choose the MoE backend: an explicit override, or the first supported one in priority order.

Every candidate answers (ok, reason); when nothing fits, the error lists each rejection, so a user sees why
the fast backends were skipped (pattern of vLLM's fused_moe/oracle). A checkpoint that serves expert LoRA
unmerged skips, in the automatic choice, the backends that cannot apply it (on a B200: FlashInfer's fused kernel
has no place for the gate/up term, so the Triton kernels serve it); an explicit override is kept and refused with
the backend's reason by the MoE method.
"""

from __future__ import annotations

import logging

from .base import DeviceInfo, MoEBackend
from .cpu_reference import CPUReferenceBackend
from .hopper_triton import HopperTritonBackend
from .sm100_flashinfer import SM100FlashInferBackend

logger = logging.getLogger(__name__)
_logged: set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _logged:  # one line per process, not one per MoE layer
        _logged.add(msg)
        logger.info(msg)

# Fastest first; the reference runs anywhere and closes the list.
PRIORITY: tuple[type[MoEBackend], ...] = (SM100FlashInferBackend, HopperTritonBackend, CPUReferenceBackend)


class BackendUnavailableError(RuntimeError):
    """No backend (or not the requested one) can run on this device."""


def available_backends(candidates: tuple[type[MoEBackend], ...] = PRIORITY) -> list[str]:
    return [c.name for c in candidates]


def select_backend(device: DeviceInfo, override: str | None = None,
                   candidates: tuple[type[MoEBackend], ...] = PRIORITY, needs_lora: bool = False) -> MoEBackend:
    """The backend instance to use on device. override: a backend name (from MXFP4_RL_MOE_BACKEND or the config);
    needs_lora: the layer serves expert adapters unmerged, so the automatic choice takes a backend that applies them."""
    by_name = {c.name: c for c in candidates}
    if override:
        cls = by_name.get(override)
        if cls is None:
            raise BackendUnavailableError(f"unknown MXFP4 MoE backend {override!r}; available: "
                                          f"{', '.join(by_name)}")
        ok, reason = cls.supports(device)
        if not ok:
            raise BackendUnavailableError(f"MXFP4 MoE backend {override!r} was requested but cannot run on {device}: "
                                          f"{reason}")
        _log_once(f"mxfp4_rl: MoE backend {cls.name} on {device} (requested)")
        return cls()
    rejections = []
    for cls in candidates:
        ok, reason = cls.supports(device)
        if ok and needs_lora and not cls.serves_lora:
            ok, reason = False, f"does not serve expert LoRA ({cls.lora_refusal})"
        if ok:
            skipped = f"; skipped: {'; '.join(rejections)}" if rejections else ""
            _log_once(f"mxfp4_rl: MoE backend {cls.name} on {device}{skipped}")
            return cls()
        rejections.append(f"{cls.name}: {reason}")
    raise BackendUnavailableError(f"no MXFP4 MoE backend can run on {device}: " + "; ".join(rejections))

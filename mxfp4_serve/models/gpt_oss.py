"""gpt-oss with our expert loader path.

vLLM's gpt-oss `load_weights` picks its loader from the checkpoint's quant_method and copies fused expert tensors
into the parameters itself (no per-expert weight_loader call), which would write gpt-oss-layout bytes or bf16
values into our packed parameters. This subclass takes the fused expert tensors out of the weight stream when the
model is served by mxfp4_rl and feeds them, one expert at a time, to the layer's ExpertWeightLoader; everything
else still goes through vLLM's loader. With any other quantization it is exactly vLLM's class.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.model_executor.models.gpt_oss import GptOssForCausalLM

from ..gpt_oss_layout import expert_pieces, native_or_fused_name, parse_name, tensor_name
from ..loader import ExpertWeightLoader


def _experts_by_layer(model: torch.nn.Module) -> dict[str, tuple[str, torch.nn.Module]]:
    """layer prefix ('model.layers.L.mlp.experts') -> (module path, module) for every layer with our loader."""
    out = {}
    for path, module in model.named_modules():
        loader = getattr(module, "mxfp4_rl_loader", None)
        if isinstance(loader, ExpertWeightLoader):
            out[loader.geometry.layer_name] = (path, module)
    return out


class MXFP4GptOssForCausalLM(GptOssForCausalLM):
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        layers = _experts_by_layer(self)
        if not layers:  # not served by mxfp4_rl
            return super().load_weights(weights)
        for _, module in layers.values():  # errors name the tensors of the checkpoint's own layout
            loader = module.mxfp4_rl_loader
            loader.tensor_name = native_or_fused_name if loader.settings.fmt == "native" else tensor_name
        loaded: set[str] = set()

        def others():
            for name, tensor in weights:
                parsed = parse_name(name)
                if parsed is None or parsed[0] not in layers:
                    yield name, tensor
                    continue
                layer, proj, kind, expert = parsed
                path, module = layers[layer]
                loader: ExpertWeightLoader = module.mxfp4_rl_loader
                wanted = {g for g in loader.local_to_global if g >= 0}
                if kind == "codes" and tensor.is_floating_point():
                    kind = "dense"  # bf16 per-expert weight (online mode)
                for e, shard, piece in expert_pieces(proj, kind, expert, tensor, wanted, name):
                    loader.load_expert(e, shard, kind, piece)
                stem = "w2" if proj == "down_proj" else "w13"
                params = {"bias": [f"{stem}_bias"], "codes": [f"{stem}_weight"], "scales": [f"{stem}_weight_scale"],
                          "dense": [f"{stem}_weight", f"{stem}_weight_scale"]}[kind]
                loaded.update(f"{path}.{p}" for p in params)

        return set(super().load_weights(others())) | loaded

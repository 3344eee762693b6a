"""Read the packed expert parameters a running engine serves (for byte-equality checks and audits).

Use with vLLM's public API: `llm.apply_model(packed_expert_params)` returns one dict per worker. The function is
module-level so that vLLM can pickle it to worker processes (multiprocessing engines also need
VLLM_ALLOW_INSECURE_SERIALIZATION=1 to ship the tensors back).
"""

from __future__ import annotations

import torch

from .backends.base import keeps_canonical
from .loader import ExpertWeightLoader


def packed_expert_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{'<layer_name>.<param>': CPU copy} for every MoE layer served by mxfp4_rl, e.g.
    'model.layers.0.mlp.experts.w13_weight' (uint8 [E_local, 2I/tp, H/2], rows [w1; w3]), always in the
    canonical layout: a backend that keeps its own layout (hopper_triton's kb-major codes, sm100's shuffled
    tiles) is read back through its `read_canonical`."""
    out = {}
    for module in model.modules():
        loader = getattr(module, "mxfp4_rl_loader", None)
        if isinstance(loader, ExpertWeightLoader):
            backend = getattr(getattr(module, "quant_method", None), "backend", None)
            canonical = keeps_canonical(backend)
            for name, p in loader.params.items():
                value = p.detach() if canonical else backend.read_canonical(module, name)
                out[f"{loader.geometry.layer_name}.{name}"] = value.to("cpu", copy=True)
    return out

"""What a LoRA-mode learner syncs: its adapters merged into the packed experts, re-quantized with the codec.

vLLM cannot serve our LoRA: its MoE LoRA path (lora/layers/fused_moe.py) needs a modular MoE kernel that mixes in
LoRAExpertsMixin, which our MXFP4 method (custom `apply`) does not have, and vLLM's CPU punica wrapper has no
fused-MoE LoRA ops at all. So before a sync, every expert adapter is folded into the base, ReLoRA-style:

    W_e <- quantize(dequantize(W_e) + scaling * B_e @ A_e)    (fp32 sum, the model's codec profile)
    B_e <- 0                                                   (A_e kept; optimizer state of A and B dropped)

After the merge the learner computes with exactly the bytes the engine will serve (B = 0 makes the adapter a no-op
bit for bit), so rollout and learner agree at the numerical floor. The price: an accumulated update smaller than
half a quantization step of its block rounds away at the merge (merging less often, or a larger learning rate for
the adapters, keeps more of it).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

import common

from ..conversion import experts_modules


@dataclasses.dataclass(frozen=True)
class MergeReport:
    modules: int
    experts_changed: int  # experts whose adapter was nonzero (only those are re-quantized)
    seconds: float


def _merged(codes: torch.Tensor, scales: torch.Tensor, delta: torch.Tensor, profile: str, name: str):
    w = common.dequantize((codes, scales), dtype=torch.float32) + delta.to(torch.float32)
    return common.quantize(w, profile=profile, name=name)


def merge_lora(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> MergeReport:
    """Fold every expert LoRA of a LoRA-mode model into its packed weights (in place) and zero the B matrices."""
    import time

    t0 = time.perf_counter()
    n_mod = n_exp = 0
    for name, mod in experts_modules(model):
        if mod.mode != "lora" or mod.lora_gate_up is None:
            continue
        n_mod += 1
        with torch.no_grad():
            active = (mod.lora_gate_up.B.flatten(1).abs().amax(1) > 0) | \
                     (mod.lora_down.B.flatten(1).abs().amax(1) > 0)
            experts = active.nonzero().flatten()
            n_exp += int(experts.numel())
            if experts.numel():
                for lora, codes, scales, label in ((mod.lora_gate_up, mod.w13_codes, mod.w13_scales, "gate_up"),
                                                   (mod.lora_down, mod.w2_codes, mod.w2_scales, "down")):
                    q = _merged(codes[experts], scales[experts], lora.delta_weight()[experts], mod.profile,
                                f"{name}.{label} (LoRA merged)")
                    codes.index_copy_(0, experts, q.codes)
                    scales.index_copy_(0, experts, q.scales)
                mod.lora_gate_up.B.zero_()
                mod.lora_down.B.zero_()
        if optimizer is not None:
            for p in (mod.lora_gate_up.A, mod.lora_gate_up.B, mod.lora_down.A, mod.lora_down.B):
                optimizer.state.pop(p, None)  # moments of the pre-merge adapter would push B off zero at once
    if n_mod == 0:
        raise ValueError("merge_lora: the model has no LoRA-mode MXFP4Experts (convert(model, 'lora', ...) first)")
    return MergeReport(modules=n_mod, experts_changed=n_exp, seconds=time.perf_counter() - t0)

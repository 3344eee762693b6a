"""LoRA adapters of the learner: per-expert adapters for the packed experts, and a plain one for dense linears.

Masters are fp32 (optimizer state stays exact); the product is computed in the activation dtype, as PEFT does for
bf16 models with `autocast_adapter_dtype`. Initialisation follows PEFT's default (`init_lora_weights=True`): A is
kaiming-uniform with a=sqrt(5) (bound 1/sqrt(in_features), what nn.Linear draws), B is zero, so a fresh adapter
leaves the model's function unchanged bit for bit.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from common.moe.params import from_peft


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """rank r, alpha (scaling = alpha / r, or alpha / sqrt(r) with rslora) and dropout on the adapter input."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive int, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def _kaiming_like_linear(t: torch.Tensor, in_features: int) -> None:
    # nn.Linear's default init (kaiming_uniform with a=sqrt(5)) reduces to U(-1/sqrt(in), 1/sqrt(in)).
    bound = 1.0 / math.sqrt(in_features)
    with torch.no_grad():
        t.uniform_(-bound, bound)


class ExpertLoRA(nn.Module):
    """One LoRA adapter per expert for a projection W_e [out, in]: delta_e = scaling * B_e @ A_e.

    A [E, r, in] and B [E, out, r] in fp32. `apply(x_e, e)` returns scaling * (drop(x_e) @ A_e^T) @ B_e^T in x's dtype.
    """

    def __init__(self, num_experts: int, in_features: int, out_features: int, spec: LoRASpec,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.A = nn.Parameter(torch.empty(num_experts, spec.r, in_features, dtype=torch.float32, device=device))
        self.B = nn.Parameter(torch.zeros(num_experts, out_features, spec.r, dtype=torch.float32, device=device))
        _kaiming_like_linear(self.A, in_features)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()

    def apply_expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        a = self.A[e].to(x.dtype)
        b = self.B[e].to(x.dtype)
        return nn.functional.linear(nn.functional.linear(self.dropout(x), a), b) * self.spec.scaling

    def delta_weight(self) -> torch.Tensor:
        """scaling * B_e @ A_e for every expert, fp32 [E, out, in] (for merging and for tests)."""
        return torch.bmm(self.B, self.A) * self.spec.scaling

    # PEFT's ParamWrapper keeps the experts in two nn.Linear: lora_A.weight [r*E, in] with expert-major rows and
    # lora_B.weight [out, r*E] whose column j*E + e is rank j of expert e (peft/tuners/lora/layer.py,
    # ParamWrapper.get_delta_weight). These two functions convert to and from that layout.
    def to_peft(self) -> tuple[torch.Tensor, torch.Tensor]:
        e, r = self.num_experts, self.spec.r
        a = self.A.detach().reshape(e * r, self.in_features)
        b = self.B.detach().permute(1, 2, 0).reshape(self.out_features, r * e)
        return a.contiguous(), b.contiguous()

    def load_peft(self, a: torch.Tensor, b: torch.Tensor) -> None:
        e, r = self.num_experts, self.spec.r
        want_a, want_b = (e * r, self.in_features), (self.out_features, r * e)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise ValueError(f"expert LoRA: expected lora_A {want_a} and lora_B {want_b}, got {tuple(a.shape)} and "
                             f"{tuple(b.shape)}")
        a, b = from_peft(a, b, e)  # the contract's reader, which the engine uses for a served adapter too
        with torch.no_grad():
            self.A.copy_(a)
            self.B.copy_(b)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus one LoRA adapter, with PEFT's attribute names (base_layer, lora_A, lora_B)."""

    def __init__(self, base: nn.Linear, spec: LoRASpec) -> None:
        super().__init__()
        self.base_layer = base
        self.spec = spec
        base.requires_grad_(False)
        dev = base.weight.device
        self.lora_A = nn.Linear(base.in_features, spec.r, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = nn.Linear(spec.r, base.out_features, bias=False, device=dev, dtype=torch.float32)
        _kaiming_like_linear(self.lora_A.weight, base.in_features)
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.lora_A.weight.to(x.dtype)
        b = self.lora_B.weight.to(x.dtype)
        delta = nn.functional.linear(nn.functional.linear(self.dropout(x), a), b) * self.spec.scaling
        return self.base_layer(x) + delta

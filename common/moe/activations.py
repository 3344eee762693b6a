"""The expert activations and the gate/up row order of a gated w13: one definition for the engine and the learner.

A gated MoE expert computes act(gate, up) from the rows of its fused gate/up projection w13 [2I, H]:
- `silu`: silu(gate) * up (Qwen3-MoE, DeepSeek-V3, GLM-4.x MoE; vLLM "silu", transformers' glu experts);
- `silu_clamp`: DeepSeek-V4's clamped silu, gate clamped above at `limit`, up to [-limit, limit], then
  silu(gate) * up (transformers DeepseekV4Experts._apply_gate and DeepseekV4MLP; vLLM "silu" with the layer's
  `swiglu_limit` set, computed by its silu_and_mul_with_clamp / SiluAndMulWithClamp(alpha=1, beta=0)). The limit is
  the model's `config.swiglu_limit` (10.0 in DeepSeek-V4-Flash's config.json), never a constant of ours;
- `swigluoai`: gpt-oss's clamped SwiGLU, gate clamped above at `limit`, up to [-limit, limit], then
  gate * sigmoid(alpha * gate) * (up + 1) (vLLM "swigluoai", transformers GptOssExperts, the Triton kernels'
  "swiglu_oai"); alpha 1.702 and limit 7.0 are the released gpt-oss models' values (model card / reference code).

Row order of w13 (GateUpOrder): `halves` = all gate rows, then all up rows (vLLM's w13 = [w1; w3], the engine's
parameters for every model); `interleaved` = (gate i, up i) row pairs (gpt-oss checkpoints, and the learner keeps
gpt-oss's w13 that way so it reads the checkpoint bytes in place). Nothing else is called "interleave" here: the
word decode's K order (common/grouped_gemm/interleave.py) is a column order inside a block, not a row order.
The row permutations themselves are byte layouts: common.layouts.gpt_oss.interleave_rows / deinterleave_rows.
"""

from __future__ import annotations

import dataclasses
import enum
import math

import torch

SWIGLU_ALPHA = 1.702  # gpt-oss clamp-SwiGLU sigmoid slope (gpt-oss model card, reference implementation)
SWIGLU_LIMIT = 7.0  # gpt-oss clamp-SwiGLU clamp bound


class GateUpOrder(str, enum.Enum):
    """Row order of a gated w13 (and the column order of its pre-activation and gradient)."""

    HALVES = "halves"  # [gate rows; up rows] = vLLM's [w1; w3]
    INTERLEAVED = "interleaved"  # (gate i, up i) row pairs: gpt-oss's checkpoint order

    @classmethod
    def of(cls, value: "str | GateUpOrder") -> "GateUpOrder":
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown gate_up layout {value!r}; choose one of "
                             f"{tuple(m.value for m in cls)}") from None


GATE_UP_ORDERS = tuple(m.value for m in GateUpOrder)


def split_gate_up(pre: torch.Tensor,
                  order: str | GateUpOrder = GateUpOrder.HALVES) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) columns of pre [..., 2I] in the given row order of w13."""
    if GateUpOrder.of(order) is GateUpOrder.INTERLEAVED:
        return pre[..., 0::2], pre[..., 1::2]
    return pre.chunk(2, dim=-1)


def clamp_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float = SWIGLU_ALPHA,
                 limit: float = SWIGLU_LIMIT) -> torch.Tensor:
    """gpt-oss: gate clamped to <= limit, up to [-limit, limit]; (up + 1) * gate * sigmoid(alpha * gate).
    torch.clamp's gradient passes where the input lies inside the closed interval (the fused backward matches it)."""
    g = gate.clamp(max=limit)
    u = up.clamp(min=-limit, max=limit)
    return (u + 1) * (g * torch.sigmoid(g * alpha))


def clamp_silu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """DeepSeek-V4: gate clamped to <= limit, up to [-limit, limit]; silu(gate) * up, op for op as transformers'
    DeepseekV4Experts._apply_gate (with ACT2FN["silu"] = torch's silu), so the engine's reference and the learner
    agree bit for bit. torch.clamp's gradient passes on the closed interval (the fused backward matches it)."""
    g = gate.clamp(max=limit)
    u = up.clamp(min=-limit, max=limit)
    return torch.nn.functional.silu(g) * u


class ActivationKind(str, enum.Enum):
    """The gated activations. silu and swigluoai are vLLM's names (the engine's `layer.activation`); silu_clamp is
    ours for what vLLM expresses as "silu" plus the layer's `swiglu_limit` (mxfp4_serve.compat.activation_spec)."""

    SILU = "silu"
    SWIGLUOAI = "swigluoai"
    SILU_CLAMP = "silu_clamp"


# ActivationKind -> the grouped-GEMM kernels' activation name (common.grouped_gemm.activations.ACTIVATIONS).
KERNEL_NAMES = {ActivationKind.SILU: "silu", ActivationKind.SWIGLUOAI: "swiglu_oai",
                ActivationKind.SILU_CLAMP: "silu_clamp"}


def check_limit(limit: float | None, what: str) -> float:
    """A clamp limit as the kernels take it: a finite positive float (a model's swiglu_limit)."""
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) or limit <= 0:
        raise ValueError(f"{what}: the clamp limit must be a finite positive number (the model's "
                         f"config.swiglu_limit), got {limit!r}")
    return float(limit)


@dataclasses.dataclass(frozen=True)
class ActivationSpec:
    """silu: silu(gate) * up. swigluoai: clamp_swiglu(gate, up, alpha, limit); limit None means gpt-oss's 7.0, and
    the fused kernels compile gpt-oss's values in (`fused_in_kernels`). silu_clamp: clamp_silu(gate, up, limit) with
    the limit taken from the model's config (required: there is no default to fall back on); the fused kernels take
    any limit. alpha belongs to swigluoai only; a limit given to plain silu is refused (that is silu_clamp)."""

    name: str = ActivationKind.SILU.value
    alpha: float = SWIGLU_ALPHA
    limit: float | None = None

    def __post_init__(self) -> None:
        names = tuple(k.value for k in ActivationKind)
        if self.name not in names:
            raise ValueError(f"unsupported MoE activation {self.name!r}; the MXFP4 backends implement {names}")
        kind = ActivationKind(self.name)
        if kind is ActivationKind.SWIGLUOAI and self.limit is None:
            object.__setattr__(self, "limit", SWIGLU_LIMIT)
        elif kind is ActivationKind.SILU_CLAMP:
            object.__setattr__(self, "limit", check_limit(self.limit, "MoE activation 'silu_clamp'"))
        elif kind is ActivationKind.SILU and self.limit is not None:
            raise ValueError(f"MoE activation 'silu' takes no clamp limit (got {self.limit!r}); a silu clamped at "
                             f"the model's swiglu_limit is 'silu_clamp'")

    @property
    def kind(self) -> ActivationKind:
        return ActivationKind(self.name)

    @property
    def kernel_name(self) -> str:
        return KERNEL_NAMES[self.kind]

    @property
    def kernel_limit(self) -> float | None:
        """The clamp limit the fused kernels are given (common.grouped_gemm `limit=`): silu_clamp's; None for the
        other kinds (swiglu_oai's limit is compiled in)."""
        return self.limit if self.kind is ActivationKind.SILU_CLAMP else None

    @property
    def fused_in_kernels(self) -> bool:
        """Whether the Triton kernels compute this activation (they bake gpt-oss's swigluoai alpha and limit in;
        silu_clamp's limit is a kernel argument)."""
        if self.kind is ActivationKind.SWIGLUOAI:
            return (self.alpha, self.limit) == (SWIGLU_ALPHA, SWIGLU_LIMIT)
        return True

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.kind is ActivationKind.SILU:
            return torch.nn.functional.silu(gate) * up
        if self.kind is ActivationKind.SILU_CLAMP:
            return clamp_silu(gate, up, self.limit)
        return clamp_swiglu(gate, up, self.alpha, self.limit)

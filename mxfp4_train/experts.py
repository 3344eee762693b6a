"""MXFP4Experts: a drop-in for a transformers 5 MoE experts block whose routed experts live as MXFP4.

Two modes, one module:
- "lora": codes uint8 [E, N, K/2] + E8M0 scales [E, N, K/32] as non-trainable buffers (4.25 bits per weight),
  dequantized per expert in forward and again in backward; per-expert LoRA on gate_up and down carries the update.
- "qat": bf16 master weights [E, N, K] as parameters; every forward uses the codec's fake quant of them with a
  straight-through backward, so training sees exactly the bytes the engine will serve after the next sync.
Weights are held in the canonical orientation [E, out, in] (quantized along `in`, as the checkpoint format and vLLM
store them); w13 rows are [gate; up] (glu) or gate/up interleaved (gpt-oss clamp_swiglu), as the source model had.
The call signature is that of the experts module it replaces (hidden_states, top_k_index, top_k_weights), so the
model's router and everything around it stay transformers' own code.
"""

from __future__ import annotations

import torch
from torch import nn

import common

from .grouped import Activation, ExpertOperands, grouped_mlp
from .lora import ExpertLoRA, LoRASpec
from .weights import FakeQuantExpertWeights, PackedExpertWeights

MODES = ("lora", "qat")


class MXFP4Experts(nn.Module):
    def __init__(self, *, mode: str, profile: str, activation: Activation, num_experts: int, hidden_size: int,
                 intermediate_size: int, has_bias: bool = False, act_quant: str | None = None,
                 backend: str = "auto") -> None:
        """Allocates empty storage; fill it with load_packed() (lora) or load_master() (qat)."""
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"MXFP4Experts mode must be one of {MODES}, got {mode!r}")
        if act_quant not in (None, "mxfp8"):
            raise ValueError(f"act_quant must be None or 'mxfp8', got {act_quant!r}")
        common.get_profile(profile)  # unknown profile names fail here, not at the first forward
        for label, dim in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
            if dim % 32:
                raise ValueError(f"MXFP4 blocks are 32 wide along the reduction axis; {label}={dim} is not a multiple "
                                 f"of 32")
        self.mode, self.profile, self.activation, self.backend, self.act_quant = mode, profile, activation, backend, \
            act_quant
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        e, h, i = num_experts, hidden_size, intermediate_size
        if mode == "lora":
            self.register_buffer("w13_codes", torch.zeros(e, 2 * i, h // 2, dtype=torch.uint8))
            self.register_buffer("w13_scales", torch.zeros(e, 2 * i, h // 32, dtype=torch.uint8))
            self.register_buffer("w2_codes", torch.zeros(e, h, i // 2, dtype=torch.uint8))
            self.register_buffer("w2_scales", torch.zeros(e, h, i // 32, dtype=torch.uint8))
        else:
            self.w13 = nn.Parameter(torch.zeros(e, 2 * i, h, dtype=torch.bfloat16))
            self.w2 = nn.Parameter(torch.zeros(e, h, i, dtype=torch.bfloat16))
        if not has_bias:
            self.b13: torch.Tensor | None = None
            self.b2: torch.Tensor | None = None
        else:
            for name, n in (("b13", 2 * i), ("b2", h)):
                zeros = torch.zeros(e, n, dtype=torch.bfloat16)
                if mode == "qat":
                    setattr(self, name, nn.Parameter(zeros))
                else:
                    self.register_buffer(name, zeros)
        self.lora_gate_up: ExpertLoRA | None = None
        self.lora_down: ExpertLoRA | None = None
        self._loaded_bytes: tuple[common.MXFP4Tensor, common.MXFP4Tensor] | None = None  # qat: see load_master

    # ----- filling -----
    def load_packed(self, w13: common.MXFP4Tensor, w2: common.MXFP4Tensor) -> None:
        """Take packed experts (canonical layout). The bytes are copied into the resident buffers, never widened."""
        if self.mode != "lora":
            raise ValueError("load_packed is for mode 'lora'; a QAT module holds bf16 masters (use load_master)")
        for name, q, buf in (("w13", w13, self.w13_codes), ("w2", w2, self.w2_codes)):
            if q.profile != self.profile:
                raise ValueError(f"experts {name}: packed with profile {q.profile!r} but this model uses "
                                 f"{self.profile!r}; requantizing silently would break train/serve parity")
            if tuple(q.codes.shape) != tuple(buf.shape):
                raise ValueError(f"experts {name}: expected codes {tuple(buf.shape)}, got {tuple(q.codes.shape)}")
        self.w13_codes.copy_(w13.codes)
        self.w13_scales.copy_(w13.scales)
        self.w2_codes.copy_(w2.codes)
        self.w2_scales.copy_(w2.scales)

    def load_master(self, w13: torch.Tensor, w2: torch.Tensor,
                    packed: tuple[common.MXFP4Tensor, common.MXFP4Tensor] | None = None) -> None:
        """Fill the bf16 masters. packed: the bytes they were dequantized from (a checkpoint's); packed() returns
        those bytes, not a re-quantization, for as long as the masters still equal their dequantization. Quantizing
        a dequantized block again may pick another scale for the same values (RCEIL gives a block whose largest
        element is 4 * 2^k the scale 2^(k-1) and elements up to 6), so re-quantizing would change ~25% of the code
        bytes with zero training and the first sync would report changes."""
        if self.mode != "qat":
            raise ValueError("load_master is for mode 'qat'; a LoRA module holds packed bytes (use load_packed)")
        with torch.no_grad():
            self.w13.copy_(w13)
            self.w2.copy_(w2)
        self._loaded_bytes = packed

    def load_bias(self, b13: torch.Tensor, b2: torch.Tensor) -> None:
        if self.b13 is None:
            raise ValueError("this experts module was built without biases (has_bias=False)")
        with torch.no_grad():
            self.b13.copy_(b13)
            self.b2.copy_(b2)

    def add_lora(self, spec: LoRASpec) -> None:
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        dev = self.w13_codes.device if self.mode == "lora" else self.w13.device
        self.lora_gate_up = ExpertLoRA(e, h, 2 * i, spec, device=dev)
        self.lora_down = ExpertLoRA(e, i, h, spec, device=dev)

    # ----- views -----
    def _weights(self):
        if self.mode == "lora":
            return (PackedExpertWeights(self.w13_codes, self.w13_scales),
                    PackedExpertWeights(self.w2_codes, self.w2_scales))
        return (FakeQuantExpertWeights(self.w13, self.profile, "experts.w13 (gate_up) master, expert"),
                FakeQuantExpertWeights(self.w2, self.profile, "experts.w2 (down) master, expert"))

    def packed(self) -> tuple[common.MXFP4Tensor, common.MXFP4Tensor]:
        """The exact bytes the engine must serve: the buffers (lora) or the codec's quantization of the masters."""
        if self.mode == "lora":
            return (common.MXFP4Tensor(self.w13_codes, self.w13_scales, self.profile),
                    common.MXFP4Tensor(self.w2_codes, self.w2_scales, self.profile))
        with torch.no_grad():
            if self._loaded_bytes is not None:
                if self._masters_unchanged():
                    return tuple(q.to(self.w13.device) for q in self._loaded_bytes)
                self._loaded_bytes = None  # a master changed: from now on its quantization is what gets served
            return (common.quantize(self.w13.detach(), profile=self.profile, name="experts.w13"),
                    common.quantize(self.w2.detach(), profile=self.profile, name="experts.w2"))

    def _masters_unchanged(self) -> bool:
        """Bit for bit (a -0 turned +0 counts as a change): each master equals the dequantized loaded bytes."""
        for master, q in zip((self.w13, self.w2), self._loaded_bytes):
            ref = common.dequantize(q.to(master.device), dtype=master.dtype)
            if not torch.equal(master.detach().view(torch.int16), ref.view(torch.int16)):
                return False
        return True

    def dequantized(self, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-stack dequantized weights [E, out, in] (for references and tests; the forward never builds these)."""
        w13, w2 = self._weights()
        return w13.dequantized(dtype), w2.dequantized(dtype)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        w13, w2 = self._weights()
        ops = ExpertOperands(w13=w13, w2=w2, activation=self.activation, num_experts=self.num_experts,
                             b13=self.b13, b2=self.b2, lora13=self.lora_gate_up, lora2=self.lora_down,
                             act_quant_profile=self.profile if self.act_quant else None)
        return grouped_mlp(hidden_states, top_k_index, top_k_weights, ops, backend=self.backend)

    def extra_repr(self) -> str:
        lora = f", lora_r={self.lora_gate_up.spec.r}" if self.lora_gate_up is not None else ""
        return (f"mode={self.mode}, profile={self.profile}, experts={self.num_experts}, hidden={self.hidden_size}, "
                f"intermediate={self.intermediate_size}, activation={self.activation.kind}{lora}")

"""Names and shapes of an MXFP4 MoE layer's parameters, and the checkpoint projection names that feed them.

The engine (vLLM's MoE layer with our method) and the learner's export (mxfp4_train.export) both name an expert
block's tensors after vLLM's fused MoE parameters; the sync and the audit hashes key on these names.

    w13_weight        uint8 [E, 2I, H/2]   packed E2M1 codes of [w1; w3] = [gate; up] (GateUpOrder.HALVES)
    w13_weight_scale  uint8 [E, 2I, H/32]  E8M0 scale bytes
    w2_weight         uint8 [E, H, I/2]    packed codes of the down projection
    w2_weight_scale   uint8 [E, H, I/32]
    w13_bias          [E, 2I]              gpt-oss only, rows like w13 (the model's dtype)
    w2_bias           [E, H]

Every checkpoint names the three projections its own way; `PROJ_ALIASES` maps each spelling to "gate" / "up" /
"down", and `VLLM_SHARD` gives vLLM's weight_loader shard id of each (w1 = gate, w3 = up, w2 = down).
"""

from __future__ import annotations

from ..constants import BLOCK_SIZE

W13 = "w13_weight"
W13_SCALE = "w13_weight_scale"
W2 = "w2_weight"
W2_SCALE = "w2_weight_scale"
W13_BIAS = "w13_bias"
W2_BIAS = "w2_bias"

# Expert LoRA factors the engine keeps next to the packed experts when it serves adapters unmerged
# (quantization_config "expert_lora"): A [E, R, K] and B [E, N, R] per packed weight, fp32, zero until a sync.
W13_LORA_A = "w13_lora_a"
W13_LORA_B = "w13_lora_b"
W2_LORA_A = "w2_lora_a"
W2_LORA_B = "w2_lora_b"
LORA_FACTORS = {W13: (W13_LORA_A, W13_LORA_B), W2: (W2_LORA_A, W2_LORA_B)}
LORA_RANK = "mxfp4_rl_lora_rank"  # int64 [1] buffer next to them: the adapters' active rank (0 = none yet)
BIAS_OF = {W13: W13_BIAS, W2: W2_BIAS}

PACKED_WEIGHTS = (W13, W2)  # each paired with its scale_name()
PACKED_PARAMS = (W13, W13_SCALE, W2, W2_SCALE)
BIAS_PARAMS = (W13_BIAS, W2_BIAS)
ALL_PARAMS = PACKED_PARAMS + BIAS_PARAMS

PROJS = ("gate", "up", "down")
# vLLM's MoE weight_loader shard ids (FusedMoE / RoutedExperts): "w1" fills w13 rows [0, I), "w3" rows [I, 2I).
VLLM_SHARD = {"gate": "w1", "up": "w3", "down": "w2"}
SHARD_PROJ = {s: p for p, s in VLLM_SHARD.items()}
# Checkpoint projection names of the per-expert layouts we read.
HF_PROJ_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}  # Qwen3-MoE, DeepSeek-V3, native
DEEPSEEK_V4_PROJ_NAMES = {"gate": "w1", "up": "w3", "down": "w2"}  # DeepSeek-V4's own checkpoint
GPT_OSS_FUSED_NAMES = {"gate_up": "gate_up_proj", "down": "down_proj"}  # gpt-oss: all experts in one tensor


def scale_name(weight: str) -> str:
    """'w13_weight' -> 'w13_weight_scale'."""
    return weight + "_scale"


def weight_of(param: str) -> str:
    """The packed weight a parameter belongs to: 'w2_weight_scale' -> 'w2_weight', 'w13_bias' -> 'w13_weight'."""
    return param.removesuffix("_scale").removesuffix("_bias").removesuffix("_weight") + "_weight"


def param_shapes(num_experts: int, hidden: int, intermediate: int, with_bias: bool = False) -> dict[str, tuple]:
    """Shapes of one layer's parameters for `num_experts` experts (local ones on an engine rank) and the given
    (per-partition) hidden / intermediate sizes."""
    e, h, i = num_experts, hidden, intermediate
    shapes = {W13: (e, 2 * i, h // 2), W13_SCALE: (e, 2 * i, h // BLOCK_SIZE),
              W2: (e, h, i // 2), W2_SCALE: (e, h, i // BLOCK_SIZE)}
    if with_bias:
        shapes.update({W13_BIAS: (e, 2 * i), W2_BIAS: (e, h)})
    return shapes


def lora_shapes(num_experts: int, hidden: int, intermediate: int, rank: int) -> dict[str, tuple]:
    """Shapes of one layer's expert LoRA factors (LORA_FACTORS) at rank `rank` for the given (per-partition)
    sizes: w13 (in H, out 2I rows [gate; up]) and w2 (in I, out H)."""
    e, h, i, r = num_experts, hidden, intermediate, rank
    return {W13_LORA_A: (e, r, h), W13_LORA_B: (e, 2 * i, r), W2_LORA_A: (e, r, i), W2_LORA_B: (e, h, r)}


# PEFT's ParamWrapper keeps a projection's experts in two nn.Linear: lora_A.weight [r*E, in] with expert-major rows
# and lora_B.weight [out, r*E] whose column j*E + e is rank j of expert e (peft/tuners/lora/layer.py,
# ParamWrapper.get_delta_weight). The learner saves that layout (mxfp4_train/adapters.py); an engine serving the
# adapter reads it back with this function.
PEFT_PREFIX = "base_model.model."


def peft_expert_names(experts: str) -> dict[str, tuple[str, str]]:
    """{packed weight: (lora_A name, lora_B name)} in a PEFT adapter of the experts module `experts` (PEFT nests the
    gate_up wrapper innermost, so its adapter sits under 'base_layer')."""
    base = f"{PEFT_PREFIX}{experts}"
    return {W13: (f"{base}.base_layer.lora_A.weight", f"{base}.base_layer.lora_B.weight"),
            W2: (f"{base}.lora_A.weight", f"{base}.lora_B.weight")}


def from_peft(a, b, num_experts: int):
    """PEFT's (lora_A [r*E, in], lora_B [out, r*E]) -> (A [E, r, in], B [E, out, r])."""
    rank = a.shape[0] // num_experts
    return (a.reshape(num_experts, rank, a.shape[1]),
            b.reshape(b.shape[0], rank, num_experts).permute(2, 0, 1).contiguous())

"""DeepSeek-V4-Flash as DeepSeek ships it: MXFP4 routed experts, FP8 block-quantized dense layers, read as they are.

The shipped layout (what transformers 5.19's `conversion_mapping["deepseek_v4"]` + FP8 quantizer and vLLM 0.32's
`models/deepseek_v4` load):

- config.json: `model_type` "deepseek_v4", `expert_dtype` "fp4" (vLLM's default when absent), and
  `quantization_config` = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "weight_block_size":
  [128, 128], "activation_scheme": "dynamic"} describing the DENSE layers only.
- routed experts: `layers.L.ffn.experts.E.w{1,2,3}.weight` int8 [out, in/2] (two E2M1 codes per byte, low nibble =
  even element) + `.scale` float8_e8m0fnu [out, in/32]: exactly our canonical bytes (common/layouts/deepseek_v4.py).
  Value = e2m1(nibble) * 2^(byte - 127) (transformers' `Fp8Dequantize._unpack_fp4`/`_dequantize_one`).
- FP8 dense layers (attention wq_a / wq_b / wkv / wo_a / wo_b, the indexer's wq_b, the shared expert's w1/w2/w3):
  `X.weight` float8_e4m3fn [out, in] + `X.scale` float8_e8m0fnu [ceil(out/128), ceil(in/128)]; value = e4m3 * 2^(byte
  - 127) over each 128x128 block. Everything else (embeddings, head, norms, router, compressor, hyper-connections)
  is bf16 / fp32 (tid2eid int32).

Reading it never re-quantizes: the experts' bytes are served and trained as shipped. The checkpoint reads as an
mxfp4_rl checkpoint in format "deepseek-v4" with profile `SHIPPED_PROFILE` (DeepSeek's own FP4 scale rule: the next
power of two >= amax / 6, never below 2^-126 * 6 / 6; the rule the codec's `deepseek_v4` profile implements, and the
one a QAT learner re-quantizes with once a master changes) and the shipped FP8 config as the delegate of every
other layer (`effective_quant_config`). The same header checks as every mxfp4_rl checkpoint apply
(validate.plan_packed / check_experts / check_scale_bytes), errors naming the tensor.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .. import constants as C
from ..errors import CheckpointError, DTypeError, ShapeError
from ..moe.params import DEEPSEEK_V4_PROJ_NAMES
from ..moe.quant_config import quantization_config
from .archs import ARCHS
from .safetensors_io import CheckpointReader
from .validate import ValidatedCheckpoint, check_experts, check_quant_config, expert_dims, plan_packed, read_config

MODEL_TYPE = "deepseek_v4"
SHIPPED_FORMAT = "deepseek-v4-flash"  # how inspect names the layout DeepSeek ships
SHIPPED_PROFILE = "deepseek_v4"
FMT = "deepseek-v4"  # our expert-layout name for the same bytes (common/layouts/deepseek_v4.py)
FP8_BLOCK = 128  # DeepSeek's weight_block_size [128, 128]
FP8_METHODS = ("fp8", "deepseek_v4_fp8")  # the HF name and vLLM's own name of the dense method
# DeepSeek-V4-Flash's config.json quantization_config (dense layers; experts are MXFP4 through `expert_dtype`).
SHIPPED_QUANT_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "weight_block_size": [128, 128],
                        "activation_scheme": "dynamic"}
PROJ_NAMES = dict(DEEPSEEK_V4_PROJ_NAMES)  # gate -> w1, up -> w3, down -> w2
_EXPERT = re.compile(r"layers\.(\d+)\.ffn\.experts\.(\d+)\.(w1|w2|w3)\.(weight|scale|weight_scale)")


def is_shipped(config: Mapping[str, Any]) -> bool:
    """A DeepSeek-V4 config as DeepSeek ships it: FP8 dense quantization_config and FP4 (MXFP4) experts."""
    qc = config.get("quantization_config")
    return (config.get("model_type") == MODEL_TYPE and isinstance(qc, Mapping)
            and qc.get("quant_method") in FP8_METHODS and config.get("expert_dtype", "fp4") == "fp4")


def is_shipped_checkpoint(ckpt_dir: str | Path) -> bool:
    """is_shipped(config.json) and its routed experts stored packed (int8), not bf16: a DeepSeek-V4 source whose
    config carries the FP8 dense config but whose experts are still bf16 is quantized as any bf16 checkpoint."""
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file() or not is_shipped(read_config(ckpt_dir)):
        return False
    with CheckpointReader(ckpt_dir) as reader:
        for name in reader.names():
            m = _EXPERT.fullmatch(name)
            if m is not None and m.group(4) == "weight":
                return reader.info[name].dtype not in (torch.bfloat16, torch.float16, torch.float32)
    return True  # no expert at all: validate_shipped says so, naming the checkpoint


def effective_quant_config(config: Mapping[str, Any]) -> dict:
    """The mxfp4_rl quantization_config the shipped checkpoint reads as: its experts' bytes in format deepseek-v4,
    profile deepseek_v4, its own FP8 config as the delegate of everything else."""
    qc = quantization_config(SHIPPED_PROFILE, FMT, delegate=config["quantization_config"])
    qc["source_format"] = SHIPPED_FORMAT
    return qc


def is_expert_tensor(name: str) -> bool:
    return _EXPERT.fullmatch(name) is not None


def _check_expert_headers(reader: CheckpointReader) -> None:
    """What plan_packed would report less directly, named after the codes tensor: its dtype, and K (twice the
    packed width) a multiple of 32."""
    for name in reader.names():
        m = _EXPERT.fullmatch(name)
        if m is None or m.group(4) != "weight":
            continue
        info = reader.info[name]
        if info.dtype != torch.int8:
            raise DTypeError(f"tensor '{name}': DeepSeek-V4 routed experts must be int8 packed E2M1 codes "
                             f"[out, in/2], got {info.dtype}")
        if len(info.shape) != 2 or (2 * info.shape[1]) % C.BLOCK_SIZE or info.shape[1] == 0:
            raise ShapeError(f"tensor '{name}': expected int8 [out, in/2] with in (K) a positive multiple of "
                             f"{C.BLOCK_SIZE}, got shape {info.shape} (K = {2 * info.shape[-1]})")


def validate_shipped(ckpt_dir: str | Path) -> ValidatedCheckpoint:
    """Header checks of a shipped DeepSeek-V4-Flash checkpoint (no tensor data read): the effective
    quantization_config, every expert's `.weight` int8 with K a multiple of 32 and its `.scale` float8_e8m0fnu
    partner of matching shape, expert ids / shapes / completeness against config.json."""
    config = read_config(ckpt_dir)
    where = str(Path(ckpt_dir) / "config.json")
    if not is_shipped(config):
        raise CheckpointError(f"{where}: not a DeepSeek-V4 checkpoint in DeepSeek's shipped layout (model_type "
                              f"{config.get('model_type')!r}, quantization_config "
                              f"{config.get('quantization_config')!r}, expert_dtype {config.get('expert_dtype')!r})")
    qc = check_quant_config(effective_quant_config(config), model_type=MODEL_TYPE,
                            where=f"{where}: quantization_config")
    spec = ARCHS[MODEL_TYPE]
    with CheckpointReader(ckpt_dir) as reader:
        _check_expert_headers(reader)
        entries = plan_packed(reader, spec, FMT, strict=True)
    if not entries:
        raise CheckpointError(f"'{ckpt_dir}' is a DeepSeek-V4 checkpoint but holds no routed-expert tensor "
                              f"'layers.L.ffn.experts.E.w1.weight' (+ '.scale')")
    check_experts([e.header for e in entries], expert_dims(config, where), complete=True)
    return ValidatedCheckpoint(config, qc, spec, entries)


# ------------------------------------------------------------------------------------------------ FP8 block dense
def fp8_scale_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    out, inp = shape
    return -(-out // FP8_BLOCK), -(-inp // FP8_BLOCK)


def dequantize_fp8_block(weight: torch.Tensor, scale: torch.Tensor, name: str = "weight",
                         dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """DeepSeek's FP8 block decode: e4m3 value times 2^(byte - 127) of its 128x128 block, in fp32, then cast.
    An e4m3 value times a power of two is exact in bf16 (3 mantissa bits <= 7), so the cast loses nothing."""
    if weight.dtype != torch.float8_e4m3fn:
        raise DTypeError(f"tensor '{name}': expected float8_e4m3fn FP8 weight, got {weight.dtype}")
    if scale.dtype != torch.float8_e8m0fnu:
        raise DTypeError(f"tensor '{name.removesuffix('.weight')}.scale': expected float8_e8m0fnu block scales "
                         f"(scale_fmt ue8m0), got {scale.dtype}")
    want = fp8_scale_shape(tuple(weight.shape)) if weight.dim() == 2 else "[ceil(out/128), ceil(in/128)]"
    if weight.dim() != 2 or tuple(scale.shape) != want:
        raise ShapeError(f"tensor '{name.removesuffix('.weight')}.scale': expected shape {want} for weight "
                         f"{tuple(weight.shape)}, got {tuple(scale.shape)}")
    s = scale.view(torch.uint8)
    if bool((s == 0xFF).any()):
        raise CheckpointError(f"tensor '{name.removesuffix('.weight')}.scale': scale byte 0xFF (E8M0 NaN)")
    factor = torch.pow(2.0, s.to(torch.float32) - C.E8M0_BIAS)
    factor = factor.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:weight.shape[0], :weight.shape[1]]
    return (weight.to(torch.float32) * factor).to(dtype)


def _pow2_ceil_exponent(x: torch.Tensor) -> torch.Tensor:
    """ceil(log2(x)) for positive fp32 x, exactly (frexp: x = m * 2^e with m in [0.5, 1); a power of two has
    m == 0.5)."""
    m, e = torch.frexp(x)
    return torch.where(m == 0.5, e - 1, e)


def quantize_fp8_block(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's ue8m0 FP8 weight quantizer (tests and the tiny builder only): per 128x128 block the scale is the
    power of two >= amax / 448, the elements w / scale cast to e4m3 (round to nearest even). All-zero block: 2^-127."""
    out, inp = w.shape
    rows, cols = fp8_scale_shape((out, inp))
    pad = torch.zeros(rows * FP8_BLOCK, cols * FP8_BLOCK, dtype=torch.float32)
    pad[:out, :inp] = w.float()
    blocks = pad.view(rows, FP8_BLOCK, cols, FP8_BLOCK)
    amax = blocks.abs().amax(dim=(1, 3))
    exp = torch.where(amax > 0, _pow2_ceil_exponent((amax / 448.0).clamp_min(2.0 ** -127)), -127)
    exp = exp.clamp(-127, 127)
    scale_bytes = (exp + C.E8M0_BIAS).to(torch.uint8)
    inv = torch.pow(2.0, -exp.to(torch.float32))
    q = (blocks * inv[:, None, :, None]).view(rows * FP8_BLOCK, cols * FP8_BLOCK)[:out, :inp]
    return q.to(torch.float8_e4m3fn), scale_bytes.view(torch.float8_e8m0fnu)


# --------------------------------------------------------------------------------- DeepSeek names -> transformers
# transformers 5.19 conversion_mapping["deepseek_v4"] (renamings applied in order, regex search), reproduced so the
# learner can read DeepSeek's names without transformers' FP8 quantizer; tests check it against from_pretrained.
_RENAMES = [
    (r"\.attn\.", ".self_attn."), (r"\.ffn\.", ".mlp."), (r"\.indexer\.compressor\.", ".compressor.indexer."),
    (r"^embed\.weight$", "embed_tokens.weight"), (r"^head\.weight$", "lm_head.weight"),
    (r"^hc_head_fn$", "hc_head.hc_fn"), (r"^hc_head_base$", "hc_head.hc_base"),
    (r"^hc_head_scale$", "hc_head.hc_scale"),
    (r"\.attn_norm\.", ".input_layernorm."), (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.hc_attn_fn$", ".attn_hc.fn"), (r"\.hc_attn_base$", ".attn_hc.base"), (r"\.hc_attn_scale$", ".attn_hc.scale"),
    (r"\.hc_ffn_fn$", ".ffn_hc.fn"), (r"\.hc_ffn_base$", ".ffn_hc.base"), (r"\.hc_ffn_scale$", ".ffn_hc.scale"),
    (r"\.attn_sink$", ".sinks"), (r"\.indexer\.weights_proj\.", ".compressor.indexer.scorer.weights_proj."),
    (r"\.indexer\.wq_b\.", ".compressor.indexer.q_b_proj."), (r"\.norm\.", ".kv_norm."), (r"\.ape$", ".position_bias"),
    (r"\.wq_a\.", ".q_a_proj."), (r"\.self_attn\.wq_b\.", ".self_attn.q_b_proj."), (r"\.wkv\.", ".kv_proj."),
    (r"\.wgate\.", ".gate_proj."), (r"\.wo_a\.", ".o_a_proj."), (r"\.wo_b\.", ".o_b_proj."),
    (r"\.q_norm\.", ".q_a_norm."), (r"\.gate\.bias$", ".gate.e_score_correction_bias"),
    (r"\.shared_experts\.w1\.", ".shared_experts.gate_proj."),
    (r"\.shared_experts\.w2\.", ".shared_experts.down_proj."),
    (r"\.shared_experts\.w3\.", ".shared_experts.up_proj."),
]
_RENAMES_RE = [(re.compile(p), r) for p, r in _RENAMES]


def hf_name(name: str) -> str:
    """A DeepSeek-V4 checkpoint name -> transformers' DeepseekV4ForCausalLM state_dict name (non-expert tensors)."""
    for pattern, repl in _RENAMES_RE:
        name = pattern.sub(repl, name)
    return name if name.startswith("lm_head.") else "model." + name


def iter_dense(ckpt_dir: str | Path,
               dtype: torch.dtype = torch.bfloat16) -> Iterator[tuple[str, torch.Tensor, str, bool]]:
    """(transformers name, tensor, checkpoint name, decoded from FP8) of every non-expert tensor of a DeepSeek-V4
    checkpoint (shipped, or mxfp4_rl in DeepSeek's names): FP8 weights decoded with their block scales into
    `dtype`, everything else as stored."""
    with CheckpointReader(ckpt_dir) as reader:
        names = set(reader.names())
        for name in reader.names():
            if is_expert_tensor(name):
                continue
            info = reader.info[name]
            if name.endswith(".scale") and f"{name.removesuffix('.scale')}.weight" in names and \
                    reader.info[f"{name.removesuffix('.scale')}.weight"].dtype == torch.float8_e4m3fn:
                continue  # consumed with its weight below
            if info.dtype == torch.float8_e4m3fn:
                sname = name.removesuffix(".weight") + ".scale"
                if not name.endswith(".weight") or sname not in names:
                    raise CheckpointError(f"tensor '{name}' is FP8 (float8_e4m3fn) but has no block scale '{sname}' "
                                          f"in '{ckpt_dir}'")
                yield hf_name(name), dequantize_fp8_block(reader.get(name), reader.get(sname), name, dtype), name, True
                continue
            yield hf_name(name), reader.get(name), name, False

"""Expert LoRA served unmerged: per-expert adapter factors kept next to the packed experts, applied by every backend.

The engine computes what the learner computes, y_e = act(x W13_e^T + b13 + s (x A13_e^T) B13_e^T) W2_e^T + b2 +
s (h A2_e^T) B2_e^T, from the same packed bytes and the same adapter factors (fp32, as the learner's masters), so an
RL learner's LoRA updates reach the rollouts however small they are (merging them into MXFP4 bytes rounds away any
update below half a quantization step).

A layer served with quantization_config "expert_lora" {max_rank R, scaling s} holds buffers A [E, R, K] and
B [E, N, R] per packed weight (common.moe.params.LORA_FACTORS), zero at start: adding the zero terms leaves every
output bitwise the base. A sync writes the factors in place (same storage: captured CUDA graphs see them), padded
with zeros beyond the adapter's rank, and records the active rank in a one-element tensor, which the reference
backend reads at run time (a Python int would be baked into vLLM's compiled graph). The scaling is fixed at engine
start (the fused kernels take it as a constant when graphs are captured); a learner with another one is refused.
Under TP each rank holds w13's B rows of its shard and all of A, and w2's A columns (K) of its shard and all of B
(common.moe.wire.lora_shard): the row-parallel partial sums then add up to the full term.

The fp32 buffers are the audited bytes (read, the sync's hashes, served_expert_params). The Triton kernels multiply
bf16 factors, which they used to round from the fp32 buffers on every forward (four launches per layer, some 40 MB
moved at dsv4's shape). Each layer therefore also keeps kernel copies (KERNEL_SUFFIX): the same factors rounded once
to bf16 by torch (round to nearest, the rounding the per-call cast did and the learner's MXFP4GroupedMLP does), with
the rank padded by zero columns to the kernels' tile (kernel_rank): bit for bit the operands the kernels got before.
`refresh` rewrites them from the fp32 buffers; `set_rank`, the last step of every write (a sync's, its undo's,
load_adapter's), calls it, so that no write path needs to know the copies exist.
"""

from __future__ import annotations

import dataclasses

import torch

from common.grouped_gemm.configs import padded_rank
from common.moe import params as P
from common.moe.quant_config import ExpertLoRAConfig
from common.moe.wire import SyncPayloadError

RANK_ATTR = P.LORA_RANK  # int64 [1] buffer: the adapters' active rank (0 = none yet)
CONFIG_ATTR = "mxfp4_rl_lora"  # the layer's ExpertLoRAConfig
KERNEL_SUFFIX = "_bf16"  # '<factor>_bf16': the kernels' copy of an fp32 factor buffer (module docstring)
KERNEL_DTYPE = torch.bfloat16  # the MMA operand dtype of common.grouped_gemm's LoRA kernels


def kernel_rank(max_rank: int) -> int:
    """The rank of the kernel copies: the kernels' own padded rank (common.grouped_gemm.configs.padded_rank, what
    they would pad a factor to on every call otherwise); the padding columns stay zero."""
    return padded_rank(max_rank)


@dataclasses.dataclass(frozen=True)
class LayerLoRA:
    """The factors of one layer as the backends take them (full max-rank buffers) and the fixed scaling."""

    a13: torch.Tensor
    b13: torch.Tensor
    a2: torch.Tensor
    b2: torch.Tensor
    rank: torch.Tensor
    scaling: float
    kernel: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # bf16 (A13, B13, A2, B2) at kernel_rank


def add_buffers(layer: torch.nn.Module, num_local_experts: int, hidden: int, intermediate_local: int,
                config: ExpertLoRAConfig, device: torch.device | str | None = None) -> None:
    """Create the layer's zero adapter buffers (not parameters: no checkpoint brings them, and vLLM's loader
    reports parameters that no checkpoint tensor filled)."""
    shapes = P.lora_shapes(num_local_experts, hidden, intermediate_local, config.max_rank)
    padded = P.lora_shapes(num_local_experts, hidden, intermediate_local, kernel_rank(config.max_rank))
    for name, shape in shapes.items():
        layer.register_buffer(name, torch.zeros(shape, dtype=torch.float32, device=device), persistent=False)
        layer.register_buffer(name + KERNEL_SUFFIX, torch.zeros(padded[name], dtype=KERNEL_DTYPE, device=device),
                              persistent=False)
    layer.register_buffer(RANK_ATTR, torch.zeros(1, dtype=torch.int64, device=device), persistent=False)
    setattr(layer, CONFIG_ATTR, config)


def config_of(layer: torch.nn.Module) -> ExpertLoRAConfig | None:
    cfg = getattr(layer, CONFIG_ATTR, None)
    return cfg if isinstance(cfg, ExpertLoRAConfig) else None


def factors(layer: torch.nn.Module) -> LayerLoRA | None:
    """The layer's adapters for a backend's apply, or None when the engine serves no expert LoRA."""
    cfg = config_of(layer)
    if cfg is None:
        return None
    names = (P.W13_LORA_A, P.W13_LORA_B, P.W2_LORA_A, P.W2_LORA_B)
    return LayerLoRA(*(getattr(layer, n) for n in names), getattr(layer, RANK_ATTR), float(cfg.scaling),
                     tuple(getattr(layer, n + KERNEL_SUFFIX) for n in names))


def active_rank(layer: torch.nn.Module) -> int:
    return int(getattr(layer, RANK_ATTR).item())


def read(layer: torch.nn.Module, weight: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [E_local, r, K], B [E_local, N, r]) of packed `weight` at the active rank r (copies)."""
    a_name, b_name = P.LORA_FACTORS[weight]
    r = active_rank(layer)
    return getattr(layer, a_name)[:, :r].clone(), getattr(layer, b_name)[..., :r].clone()


def check_factors(layer: torch.nn.Module, weight: str, a: torch.Tensor, b: torch.Tensor, where: str) -> None:
    """Refuse factors this layer cannot serve: no expert LoRA configured, rank above max_rank, shapes of another
    layer or shard, non-fp32 dtype, NaN/Inf."""
    cfg = config_of(layer)
    if cfg is None:
        raise SyncPayloadError(f"{where}: this engine serves no expert LoRA (start it from a checkpoint whose "
                               f"quantization_config has \"expert_lora\": {{\"max_rank\": R, \"scaling\": s}})")
    a_name, b_name = P.LORA_FACTORS[weight]
    a_buf, b_buf = getattr(layer, a_name), getattr(layer, b_name)
    for field, t in (("a", a), ("b", b)):
        if t.dtype != torch.float32:
            raise SyncPayloadError(f"{where}: LoRA factor '{field}' must be float32 (the learner's masters), got "
                                   f"{t.dtype}")
    r = a.shape[1] if a.dim() == 3 else -1
    if r > cfg.max_rank:
        raise SyncPayloadError(f"{where}: adapter rank {r} exceeds the engine's expert_lora max_rank "
                               f"{cfg.max_rank}; restart the engine with a larger max_rank")
    want_a = (a_buf.shape[0], r, a_buf.shape[2])
    want_b = (b_buf.shape[0], b_buf.shape[1], r)
    if a.dim() != 3 or tuple(a.shape) != want_a or tuple(b.shape) != want_b:
        raise SyncPayloadError(f"{where}: LoRA factors of this rank's shard must be a {list(want_a)} and b "
                               f"{list(want_b)}, got a {list(a.shape)} and b {list(b.shape)}")
    for field, t in (("a", a), ("b", b)):
        if not bool(torch.isfinite(t).all()):
            raise SyncPayloadError(f"{where}: LoRA factor '{field}' holds NaN or Inf")


def write(layer: torch.nn.Module, weight: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """Set the adapters of packed `weight` for every local expert in place, zero beyond their rank."""
    a_name, b_name = P.LORA_FACTORS[weight]
    a_buf, b_buf = getattr(layer, a_name), getattr(layer, b_name)
    r = a.shape[1]
    a_buf[:, r:].zero_()
    b_buf[..., r:].zero_()
    a_buf[:, :r].copy_(a)
    b_buf[..., :r].copy_(b)


def set_rank(layer: torch.nn.Module, rank: int) -> None:
    """Record the active rank; the commit point of a write: the kernel copies are refreshed here (`refresh`)."""
    getattr(layer, RANK_ATTR).fill_(int(rank))
    refresh(layer)


def refresh(layer: torch.nn.Module) -> None:
    """Rewrite the layer's bf16 kernel copies from its fp32 factor buffers, in place (captured CUDA graphs read the
    same storage). Call after changing the fp32 buffers by any other path than write + set_rank; set_rank calls it.
    A copy's rank columns beyond max_rank are never written: zero since add_buffers."""
    for a_name, b_name in P.LORA_FACTORS.values():
        a, b = getattr(layer, a_name), getattr(layer, b_name)
        getattr(layer, a_name + KERNEL_SUFFIX)[:, :a.shape[1]].copy_(a)
        getattr(layer, b_name + KERNEL_SUFFIX)[..., :b.shape[2]].copy_(b)


# ---- an adapter served from the start (quantization_config "expert_lora": {..., "adapter": dir}) ---------------
_ADAPTER_FILES: dict[str, dict] = {}  # adapter dir -> its tensors (read once per process, shared by the layers)


def _adapter_tensors(adapter_dir: str) -> dict:
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    if adapter_dir not in _ADAPTER_FILES:
        path = Path(adapter_dir)
        files = path / "adapter_model.safetensors", path / "adapter_config.json"
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"mxfp4_rl expert_lora adapter: {missing} not found (a PEFT adapter directory "
                                    f"as mxfp4_train.adapters.save_adapters writes it)")
        _ADAPTER_FILES[adapter_dir] = {"tensors": load_file(str(files[0])),
                                       "config": json.loads(files[1].read_text())}
    return _ADAPTER_FILES[adapter_dir]


def _peft_scaling(cfg: dict) -> float:
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    return alpha / (r ** 0.5 if cfg.get("use_rslora") else r)


def load_adapter(layer: torch.nn.Module, layer_name: str, interleaved: bool) -> None:
    """Serve the configured PEFT adapter's factors for this layer (this rank's shard), as a sync would write them."""
    from common.layouts import gpt_oss as gpt_oss_layout
    from common.moe.wire import lora_shard

    from .sync.layers import SyncedLayer

    cfg = config_of(layer)
    if cfg is None or cfg.adapter is None:
        return
    files = _adapter_tensors(cfg.adapter)
    scaling = _peft_scaling(files["config"])
    where = f"mxfp4_rl expert_lora adapter '{cfg.adapter}', layer '{layer_name}'"
    if abs(scaling - cfg.scaling) > 1e-12 * abs(cfg.scaling):
        raise ValueError(f"{where}: the adapter's scaling {scaling} (lora_alpha / r) differs from the checkpoint's "
                         f"expert_lora scaling {cfg.scaling}")
    synced = SyncedLayer(layer, layer.mxfp4_rl_loader, None)
    num_experts = synced.loader.geometry.num_experts
    ranks = set()
    for weight, (a_name, b_name) in P.peft_expert_names(layer_name).items():
        t = files["tensors"]
        if a_name not in t or b_name not in t:
            raise SyncPayloadError(f"{where}: the adapter has no '{a_name}' / '{b_name}'")
        a, b = P.from_peft(t[a_name].float(), t[b_name].float(), num_experts)
        if weight == P.W13 and interleaved:  # gpt-oss (gate, up) row pairs -> [gate; up]
            gate, up = gpt_oss_layout.deinterleave_rows(b)
            b = torch.cat((gate, up), dim=-2)
        device = getattr(layer, RANK_ATTR).device
        a, b = lora_shard(a.to(device), b.to(device), synced.descriptor(weight), weight)
        check_factors(layer, weight, a, b, where)
        write(layer, weight, a, b)
        ranks.add(a.shape[1])
    if len(ranks) != 1:
        raise SyncPayloadError(f"{where}: the gate_up and down adapters have different ranks {sorted(ranks)}")
    set_rank(layer, ranks.pop())

"""Read the packed MXFP4 experts of an mxfp4_rl checkpoint (any of its formats) as canonical MXFP4Tensors.

Used by the engine plugin and the learner: both get the same bytes from the same loader. The checkpoint first passes
`validate.validate_checkpoint` (quantization_config, code/scale pairs, expert geometry against config.json, from the
headers), then every scale tensor `validate.check_scale_bytes` as it is read; errors name the offending tensor.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import MXFP4Error
from ..layouts import deepseek_v4 as dsv4_layout
from ..layouts import gpt_oss as gpt_oss_layout
from ..tensor import MXFP4Tensor
from .safetensors_io import CheckpointReader
from .validate import (PackedEntry, ValidatedCheckpoint, check_decoded_range, check_scale_bytes, read_config,
                       validate_checkpoint)

ExpertKey = tuple[int, int, str]  # (layer, expert, proj) with proj in gate / up / down


def validated(ckpt_dir: str | Path) -> ValidatedCheckpoint:
    """validate.validate_checkpoint for an mxfp4_rl checkpoint; for DeepSeek-V4-Flash as DeepSeek ships it (FP8
    dense config, MXFP4 experts), the same header checks with the quantization_config it reads as
    (deepseek_v4.effective_quant_config: format deepseek-v4, profile deepseek_v4, the FP8 config as delegate)."""
    from . import deepseek_v4

    if deepseek_v4.is_shipped_checkpoint(ckpt_dir):
        return deepseek_v4.validate_shipped(ckpt_dir)
    return validate_checkpoint(ckpt_dir)


def read_quantization_config(ckpt_dir: str | Path) -> tuple[dict, dict]:
    """(config.json, its validated quantization_config) of an mxfp4_rl checkpoint (validate.validate_checkpoint:
    the same checks as the engine's and inspect's, headers included), or of a shipped DeepSeek-V4-Flash one."""
    v = validated(ckpt_dir)
    return v.config, v.quant_config


def _load(reader: CheckpointReader, entry: PackedEntry, profile: str) -> tuple[torch.Tensor, torch.Tensor]:
    codes, scales = reader.get(entry.codes), reader.get(entry.scales)
    check_scale_bytes(scales, profile, entry.scales)
    flat = codes.flatten(-2) if codes.dim() == 4 else codes  # gpt-oss blocks [E, N, K/32, 16]
    check_decoded_range(flat, scales, entry.codes)
    return codes, scales


def iter_packed_experts(ckpt_dir: str | Path) -> Iterator[tuple[ExpertKey, MXFP4Tensor]]:
    """Yield ((layer, expert, proj), MXFP4Tensor [N, K]) for every routed expert, one source tensor in memory at a time.

    proj is "gate", "up" or "down" whatever the checkpoint calls them (DeepSeek w1 / w3 / w2).
    """
    v = validated(ckpt_dir)
    profile = v.profile
    with CheckpointReader(ckpt_dir) as reader:
        if v.fmt == "gpt-oss":  # per layer: fused gate_up then down
            for gate_up, down in zip(v.entries[0::2], v.entries[1::2]):
                gate, up = gpt_oss_layout.from_gpt_oss_gate_up(*_load(reader, gate_up, profile), profile)
                down_q = gpt_oss_layout.from_gpt_oss_down(*_load(reader, down, profile), profile)
                layer = gate_up.header.layer
                for e in range(gate.codes.shape[0]):
                    yield (layer, e, "gate"), gate[e]
                    yield (layer, e, "up"), up[e]
                    yield (layer, e, "down"), down_q[e]
            return
        for entry in v.entries:
            hd = entry.header
            codes, scales = _load(reader, entry, profile)
            if v.fmt == "deepseek-v4":
                yield (hd.layer, hd.expert, hd.proj), dsv4_layout.from_deepseek_v4(codes, scales, profile,
                                                                                   name=entry.codes)
            else:
                yield (hd.layer, hd.expert, hd.proj), MXFP4Tensor(codes, scales, profile)


def load_packed_experts(ckpt_dir: str | Path) -> dict[ExpertKey, MXFP4Tensor]:
    """All routed experts of an mxfp4_rl checkpoint: {(layer, expert, proj): MXFP4Tensor}."""
    out = dict(iter_packed_experts(ckpt_dir))
    if not out:  # validate_checkpoint refuses this already; kept as the function's contract
        raise MXFP4Error(f"'{ckpt_dir}' holds no packed expert tensor")
    return out


__all__ = ["ExpertKey", "iter_packed_experts", "load_packed_experts", "read_config", "read_quantization_config"]

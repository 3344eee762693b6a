"""Bad variants of a tiny mxfp4_rl checkpoint: the "silent garbage" classes of issue 26, each with the message every
side (inspect, the learner's loader, the engine) must refuse it with. Shared by tests/common/test_validate.py and
tests/serve/test_checkpoint_refusals.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.checkpoint import quantize_checkpoint, write_tiny_checkpoint

PROFILE = "flashinfer"
UP5 = "model.layers.1.mlp.experts.5.up_proj"
GATE2 = "model.layers.0.mlp.experts.2.gate_proj"


def good_checkpoint(root: Path) -> Path:
    src = write_tiny_checkpoint(root / "bf16", arch="qwen3_moe", seed=0)
    return quantize_checkpoint(src, root / "good", profile=PROFILE, progress=False)


def variant(good: Path, dst: Path, edit_tensors=None, edit_config=None) -> Path:
    shutil.copytree(good, dst)
    if edit_tensors:
        tensors = load_file(str(dst / "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _set_scale(byte: int):
    def edit(t):
        t[f"{UP5}.weight_scale"][3, 2] = byte
    return edit


def _extra_expert(t):
    for proj in ("gate_proj", "up_proj", "down_proj"):
        for suffix in ("weight", "weight_scale"):
            t[f"model.layers.0.mlp.experts.8.{proj}.{suffix}"] = t[f"model.layers.0.mlp.experts.7.{proj}.{suffix}"].clone()


def _transposed(t):
    # gate of one expert stored as [H, I] = [128, 64] instead of [I, H] = [64, 128]: a consistent code / scale pair
    t[f"{GATE2}.weight"] = torch.zeros(128, 32, dtype=torch.uint8)
    t[f"{GATE2}.weight_scale"] = torch.full((128, 2), 127, dtype=torch.uint8)


def _qc(**kv):
    def edit(cfg):
        cfg["quantization_config"].update(kv)
    return edit


# id -> (edit_tensors, edit_config, the message every side gives)
CASES = {
    "scale_0xFE": (_set_scale(0xFE), None,
                   rf"tensor '{UP5}\.weight_scale': scale byte 0xFE \(the Inf-block byte of profile 'flashinfer'\) "
                   r"at index \(3,\) block 2"),
    "scale_0xFF": (_set_scale(0xFF), None, rf"tensor '{UP5}\.weight_scale': scale byte 0xFF \(E8M0 NaN\) at index "
                                           r"\(3,\) block 2"),
    "codec_version_99": (None, _qc(codec_version=99),
                         r"codec_version 99 is newer than this reader's codec \(version 1\)"),
    "gpt_oss_label_on_qwen3": (None, _qc(format="gpt-oss"),
                               r"format 'gpt-oss' is not available for model_type 'qwen3_moe'; available: native"),
    "expert_beyond_config": (_extra_expert, None,
                             r"tensor 'model\.layers\.0\.mlp\.experts\.8\.gate_proj\.weight': expert id 8 is not "
                             r"below the 8 routed experts of .*config\.json"),
    "unknown_profile": (None, _qc(profile="flashinfer_v2"),
                        r"quantization_config: unknown MXFP4 profile 'flashinfer_v2'; known profiles: "),
    # every expert consistent with its siblings, but not with config.json (moe_intermediate_size 32, tensors 64)
    "config_contradicts_experts": (None, lambda cfg: cfg.update(moe_intermediate_size=32),
                                   r"tensor 'model\.layers\.0\.mlp\.experts\.0\.gate_proj\.weight': layer 0 gate "
                                   r"must be \[N, K\] = \(32, 128\) per expert \(hidden_size 128, intermediate size 32 "
                                   r"from .*config\.json\), got \(64, 128\)"),
    "transposed_header": (_transposed, None,
                          rf"tensor '{GATE2}\.weight': layer 0 gate must be \[N, K\] = \(64, 128\) per expert .*"
                          r"got \(128, 64\) \(transposed\?\)"),
}


def make_case(good: Path, root: Path, case: str) -> Path:
    edit_tensors, edit_config, _ = CASES[case]
    return variant(good, root / case, edit_tensors, edit_config)

"""Bad checkpoints make the real engine fail at start with a message that names the tensor or layer.
Each case starts its own engine process (it dies before the KV cache is allocated: ~10 s each)."""

from __future__ import annotations

import pytest
import torch

from common.checkpoint import quantize_checkpoint, write_tiny_checkpoint
from tests.common.bad_checkpoints import variant
from tests.serve.reference import run_engine

pytestmark = pytest.mark.engine
SCALE = "model.layers.1.mlp.experts.5.up_proj.weight_scale"


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    src = write_tiny_checkpoint(root / "bf16", arch="qwen3_moe", seed=0)
    return root, quantize_checkpoint(src, root / "good", profile="flashinfer", progress=False)


def _variant(native, name, edit_tensors=None, edit_config=None):
    root, good = native
    return variant(good, root / name, edit_tensors, edit_config)


def _fails(path, root, name, pattern, env=None):
    proc, _, _ = run_engine({"model": str(path), "quantization": "mxfp4_rl"}, root / f"run_{name}", env=env)
    assert proc.returncode != 0
    import re

    assert re.search(pattern, proc.stderr + proc.stdout), (proc.stderr + proc.stdout)[-3000:]


def test_missing_scale_tensor(native):
    path = _variant(native, "missing", edit_tensors=lambda t: t.pop(SCALE))
    _fails(path, native[0], "missing", r"MoE layer 'model\.layers\.1\.mlp\.experts': 1 expert tensor\(s\) missing "
                                        rf"from the checkpoint: '{SCALE}'")


def test_wrong_scale_shape(native):
    def edit(t):
        t[SCALE] = t[SCALE][:, :-1].contiguous()

    path = _variant(native, "shape", edit_tensors=edit)
    _fails(path, native[0], "shape", rf"'{SCALE}': expected scales of shape \(64, 4\).*got \(64, 3\)")


def test_wrong_scale_dtype(native):
    def edit(t):
        t[SCALE] = t[SCALE].to(torch.float32)

    path = _variant(native, "dtype", edit_tensors=edit)
    _fails(path, native[0], "dtype", rf"'{SCALE}': MXFP4 scales must have dtype torch\.uint8.*got torch\.float32")


def test_unknown_profile(native):
    def edit(cfg):
        cfg["quantization_config"]["profile"] = "flashinfer_v2"

    path = _variant(native, "profile", edit_config=edit)
    _fails(path, native[0], "profile", r"unknown MXFP4 profile 'flashinfer_v2'; known profiles: ")


def test_k_not_multiple_of_32(native):
    """Online mode on a model whose moe_intermediate_size (the K of down_proj) is 48."""
    root = native[0]
    path = write_tiny_checkpoint(root / "k48", arch="qwen3_moe", moe_intermediate_size=48)
    _fails(path, root, "k48", r"MoE layer 'model\.layers\.0\.mlp\.experts': moe intermediate size 48 \(the K of "
                              r"w2, down_proj\) is not a multiple of the MXFP4 block size 32",
           env={"MXFP4_RL_PROFILE": "flashinfer"})


def test_inf_block_scale_byte(native):
    """Issue 26: 0xFE (2^127, the flashinfer profile's Inf-block byte) used to load and serve NaN log-probs."""
    def edit(t):
        t[SCALE][3, 2] = 0xFE

    path = _variant(native, "scale_fe", edit_tensors=edit)
    _fails(path, native[0], "scale_fe", rf"tensor '{SCALE}': scale byte 0xFE \(the Inf-block byte of profile "
                                        r"'flashinfer'\) at index \(3,\) block 2")


def test_expert_beyond_config_and_format_of_another_arch(native):
    """Issue 26: an expert id beyond num_experts was dropped silently; a qwen3 checkpoint labelled gpt-oss served.
    Both are refused before any weight is loaded, with the message of inspect and the learner."""
    def extra(t):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            for suffix in ("weight", "weight_scale"):
                name = f"model.layers.0.mlp.experts.{{}}.{proj}.{suffix}"
                t[name.format(8)] = t[name.format(7)].clone()

    path = _variant(native, "extra", edit_tensors=extra)
    _fails(path, native[0], "extra", r"'model\.layers\.0\.mlp\.experts\.8\.gate_proj\.weight': expert id 8 is not "
                                     r"below the 8 routed experts")
    path = _variant(native, "label", edit_config=lambda c: c["quantization_config"].update(format="gpt-oss"))
    _fails(path, native[0], "label", r"format 'gpt-oss' is not available for model_type 'qwen3_moe'")

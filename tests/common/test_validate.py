"""Issue 26, "silent garbage": the shared validation pass (common/checkpoint/validate.py) refuses, in inspect and the
packed loader, every checkpoint class that used to pass; the converter refuses the same geometry in its source; the
codec's non-finite rules are one rule on both backends. The learner and the engine refuse the same checkpoints with
the same message: tests/serve/test_checkpoint_refusals.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import common
from common import reference
from common.checkpoint import load_packed_experts, quantize_checkpoint, write_tiny_checkpoint
from common.checkpoint.inspect import inspect_checkpoint
from common.checkpoint.validate import check_quant_config
from common.cli import main
from common.errors import CheckpointError, MXFP4Error, NonFiniteError
from common.profiles import reserved_scale_bytes

from .bad_checkpoints import CASES, PROFILE, good_checkpoint, make_case


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate")
    return root, good_checkpoint(root)


@pytest.mark.parametrize("case", list(CASES))
def test_loader_and_inspect_refuse_with_the_same_message(good, case, capsys):
    root, ckpt = good
    bad = make_case(ckpt, root, case)
    pattern = CASES[case][2]
    with pytest.raises(MXFP4Error, match=pattern) as loader_exc:
        load_packed_experts(bad)
    with pytest.raises(MXFP4Error) as inspect_exc:
        inspect_checkpoint(bad)
    assert str(inspect_exc.value) == str(loader_exc.value)
    capsys.readouterr()
    assert main(["inspect", str(bad)]) == 2  # used to exit 0 (2^+128 exponents, 0 experts)
    err = capsys.readouterr().err
    assert err == f"mxfp4-rl: error: {loader_exc.value}\n"


def test_good_checkpoint_still_loads_and_inspects(good):
    _, ckpt = good
    assert len(load_packed_experts(ckpt)) == 48
    assert inspect_checkpoint(ckpt)["summary"]["expert_tensors"] == 48


@pytest.mark.parametrize("profile,reserved", [
    ("flashinfer", [0xFE, 0xFF]), ("ocp", [0xFD, 0xFE, 0xFF]), ("even", [0xFD, 0xFE, 0xFF]),
    ("torchao", [0xFD, 0xFE, 0xFF]), ("deepseek_v4", [0xFE, 0xFF]), ("triton_kernels", [0xFE, 0xFF]),
])
def test_reserved_scale_bytes_per_profile(profile, reserved):
    """The bytes no finite weight gets, plus the profile's Inf-block byte and 0xFF: quantizing the largest finite fp32
    under each profile gives the byte just below the reserved range (so a real checkpoint never holds one)."""
    assert list(reserved_scale_bytes(profile)) == reserved
    big = torch.full((1, 32), torch.finfo(torch.float32).max)
    assert int(common.quantize(big, profile=profile).scales.max()) < reserved[0] or profile == "even"
    inf_block = torch.full((1, 32), float("inf"))
    inf_byte = int(common.quantize(inf_block, profile=profile, nonfinite="profile").scales[0, 0])
    assert inf_byte in reserved


def test_quant_config_checks_name_the_value():
    base = {"quant_method": "mxfp4_rl", "profile": "ocp", "format": "native", "block_size": 32, "codec_version": 1}
    assert check_quant_config(base, model_type="qwen3_moe")["codec_version"] == 1
    for bad, msg in [({"codec_version": "1"}, r"codec_version must be a positive integer, got '1'"),
                     ({"codec_version": 2}, r"codec_version 2 is newer than this reader's codec \(version 1\)"),
                     ({"format": "deepseek-v4"}, r"format 'deepseek-v4' is not available for model_type 'qwen3_moe'"),
                     ({"block_size": 16}, r"block_size must be 32, got 16")]:
        with pytest.raises(CheckpointError, match=bad and msg):
            check_quant_config({**base, **bad}, model_type="qwen3_moe")


# ---------------------------------------------------------------------------------- the converter's bf16 source
def _source_variant(tmp_path, name, edit):
    src = write_tiny_checkpoint(tmp_path / f"{name}-src", arch="qwen3_moe", seed=1)
    t = load_file(str(src / "model.safetensors"))
    edit(t)
    save_file(t, str(src / "model.safetensors"), metadata={"format": "pt"})
    return src


@pytest.mark.parametrize("name,edit,msg", [
    ("transposed", lambda t: t.__setitem__("model.layers.1.mlp.experts.3.up_proj.weight",
                                           t["model.layers.1.mlp.experts.3.up_proj.weight"].t().contiguous()),
     r"tensor 'model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight': layer 1 up must be \[N, K\] = \(64, 128\) .*"
     r"got \(128, 64\) \(transposed\?\)"),
    ("extra_expert", lambda t: t.__setitem__("model.layers.0.mlp.experts.9.down_proj.weight",
                                             t["model.layers.0.mlp.experts.0.down_proj.weight"].clone()),
     r"'model\.layers\.0\.mlp\.experts\.9\.down_proj\.weight': expert id 9 is not below the 8 routed experts"),
    ("missing_expert", lambda t: t.pop("model.layers.1.mlp.experts.6.gate_proj.weight"),
     r"layer 1 lacks 1 of its 24 routed-expert tensors \(expert 6 gate\)"),
])
def test_quantize_refuses_source_geometry_before_writing(tmp_path, capsys, name, edit, msg):
    src = _source_variant(tmp_path, name, edit)
    with pytest.raises(MXFP4Error, match=msg):
        quantize_checkpoint(src, tmp_path / "out", profile=PROFILE, progress=False)
    assert main(["quantize", str(src), str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mxfp4-rl: error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}-src"]  # nothing written, no staging left


# ------------------------------------------------------------------------------------- the codec's non-finite rules
def test_dequantize_mxfp8_refuses_nan_scale_like_mxfp4():
    elements = torch.ones(2, 32).to(torch.float8_e4m3fn)
    scales = torch.tensor([[127], [255]], dtype=torch.uint8)
    with pytest.raises(NonFiniteError, match=r"'act'.*0xFF.*\(1, 0\)"):
        common.dequantize_mxfp8(elements, scales, name="act")
    with pytest.raises(NonFiniteError, match="0xFF"):
        reference.dequantize_mxfp8(elements, scales)
    with pytest.raises(NonFiniteError, match="0xFF"):
        common.dequantize((torch.zeros(2, 16, dtype=torch.uint8), scales))
    # the NaN block a caller asked for with nonfinite="profile" keeps the profile's NaN result
    x = torch.ones(1, 32)
    x[0, 3] = float("nan")
    assert torch.isnan(common.fake_quant_mxfp8(x, profile=PROFILE, nonfinite="profile")).all()


@pytest.mark.parametrize("profile", ["flashinfer", "even", "ocp"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_overflow_of_the_output_dtype_is_inf_never_saturated(profile, backend):
    """docs/codec.md "Non-finite results": exact in fp32, then the IEEE cast. fp16 60000 under flashinfer / even
    quantizes to 4 * 2^14 = 65536 > 65504 -> +inf (the same bits on both backends); ocp's FLOOR keeps it finite."""
    x = torch.full((2, 32), 60000.0, dtype=torch.float16)
    x[1] = -1.0
    got = common.fake_quant(x, profile=profile, backend=backend)
    want = common.quantize(x.float(), profile=profile, backend="torch").dequantize(torch.float32)
    assert torch.equal(got.view(torch.int16), want.to(torch.float16).view(torch.int16))
    assert torch.isinf(got[0]).all() == (profile != "ocp") and (got[1] == -1).all()
    assert math.isfinite(float(want[0, 0]))  # the codec's value exists: only float16 cannot hold it


def test_inspect_checkpoint_error_names_config_file(good, tmp_path):
    _, ckpt = good
    bad = tmp_path / "badjson"
    import shutil

    shutil.copytree(ckpt, bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        inspect_checkpoint(bad)
    (bad / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "quantization_config": [1]}))
    with pytest.raises(CheckpointError, match="quantization_config must be a JSON object, got list"):
        inspect_checkpoint(bad)


def test_reserved_bytes_do_not_depend_on_the_default_dtype():
    """vLLM loads weights under torch.set_default_dtype(float16): the profile's bytes must not change with it."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        assert list(reserved_scale_bytes("flashinfer")) == [0xFE, 0xFF]
    finally:
        torch.set_default_dtype(old)

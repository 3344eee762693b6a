"""DeepSeek-V4-Flash in DeepSeek's shipped format (common/checkpoint/deepseek_v4.py): the official decode of its
experts (nibble order, E8M0 semantics) and FP8 dense layers, the tiny builder against transformers' own loader,
reading the experts' bytes as they are, and refusals naming the tensor."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import common
from common.checkpoint import deepseek_v4 as ds
from common.checkpoint import load_packed_experts, quantize_checkpoint
from common.checkpoint.inspect import format_report, inspect_checkpoint
from common.checkpoint.packed import read_quantization_config
from common.checkpoint.tiny_deepseek_v4 import write_tiny_deepseek_v4
from common.errors import CheckpointError, DTypeError, ShapeError

# E2M1 as DeepSeek's decode reads a nibble: bit 3 sign, then the magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6.
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
W1 = "layers.1.ffn.experts.3.w1"


def official_decode(codes_i8: torch.Tensor, scale_e8m0: torch.Tensor) -> torch.Tensor:
    """Written down from the format: byte j holds element 2j in its LOW nibble and 2j+1 in its high nibble;
    value = e2m1 x 2^(e - 127), in fp32 (exact)."""
    u = codes_i8.view(torch.uint8).long()
    lut = torch.tensor(E2M1, dtype=torch.float32)
    vals = torch.stack((lut[u & 0xF], lut[u >> 4]), dim=-1).flatten(-2)
    e = scale_e8m0.view(torch.uint8).to(torch.float64) - 127
    return (vals.double() * torch.pow(2.0, e).repeat_interleave(32, dim=-1)).float()


def transformers_decode(codes_i8: torch.Tensor, scale_e8m0: torch.Tensor) -> torch.Tensor:
    """transformers 5.19's decode of DeepSeek-V4-Flash experts (Fp8Dequantize, the FP8 quantizer's dequantize=True)."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    return Fp8Dequantize(None)._dequantize_one(codes_i8, scale_e8m0, torch.float32)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds4")
    seed = int(torch.randint(0, 2**31 - 1, (1,)))  # fresh draws every run; printed on failure via the ids below
    return {"seed": seed, "shipped": write_tiny_deepseek_v4(root / "shipped", seed=seed),
            "bf16": write_tiny_deepseek_v4(root / "bf16", seed=seed, shipped=False), "root": root}


def test_nibble_order_and_e8m0_are_the_official_decode():
    # literal bytes: 0x1F = low nibble 0xF (-6, element 0), high nibble 0x1 (+0.5, element 1); 0x80 = (+0, -0)
    codes = torch.tensor([[0x1F, 0x80, 0x72, 0xE9] * 4], dtype=torch.uint8).view(torch.int8)
    want = torch.tensor([-6, 0.5, 0, -0.0, 1, 6, -0.5, -4] * 4) * 2.0
    scale = torch.tensor([[128]], dtype=torch.uint8).view(torch.float8_e8m0fnu)  # 2^(128-127) = 2
    for dec in (official_decode(codes, scale), transformers_decode(codes, scale),
                common.dequantize(common.MXFP4Tensor(codes.view(torch.uint8), scale.view(torch.uint8), "deepseek_v4"),
                                  dtype=torch.float32)):
        assert torch.equal(dec.view(torch.int32), want.view(1, 32).view(torch.int32)), dec
    # every byte value under scale bytes from the subnormal end (2^-127) to the largest one a checkpoint may hold
    every = torch.arange(256, dtype=torch.uint8).view(16, 16).repeat(1, 1).view(torch.int8)
    for s in (0, 1, 100, 127, 150, 0xFC):
        sc = torch.full((16, 1), s, dtype=torch.uint8).view(torch.float8_e8m0fnu)
        ours = common.dequantize(common.MXFP4Tensor(every.view(torch.uint8), sc.view(torch.uint8), "deepseek_v4"),
                                 dtype=torch.float32)
        assert torch.equal(ours.view(torch.int32), official_decode(every, sc).view(torch.int32)), s
        assert torch.equal(ours.view(torch.int32), transformers_decode(every, sc).view(torch.int32)), s


def _fp8_weights(gen, rows, cols):
    w = torch.randn(rows, cols, generator=gen) * 0.02
    w[:128, :128] = 0.0  # all-zero block: scale byte 0 (2^-127)
    w[128:256, 128:] *= 2.0 ** 100  # large block
    w[256:, :128] = 2.0 ** -140  # fp32 subnormals: exact scale at the bottom
    return w


def test_fp8_block_decode_is_transformers_decode():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    # whole 128x128 blocks (every FP8 weight of the release): transformers' decode is the oracle
    w = _fp8_weights(gen, 384, 256)
    q, s = ds.quantize_fp8_block(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu and s.shape == (3, 2)
    assert int(s.view(torch.uint8)[0, 0]) == 0
    ref = Fp8Dequantize(None)._dequantize_one(q, s, torch.float32)
    ours = ds.dequantize_fp8_block(q, s, "x.weight", torch.float32)
    assert torch.equal(ours.view(torch.int32), ref.view(torch.int32))
    # error bound of e4m3 rounding: half an ulp, 2^-4 relative for normals, 2^-10 x the block scale for subnormals
    step = torch.pow(2.0, s.view(torch.uint8).float() - 127).repeat_interleave(128, 0).repeat_interleave(128, 1)
    assert bool(((ours - w).abs() <= torch.maximum(w.abs() * 2.0 ** -4, step * 2.0 ** -10)).all())
    # partial blocks (300 x 200): transformers derives the block as rows / scale rows (100 here), so the definition
    # (block [i // 128, j // 128]) is checked in float64 instead
    w = _fp8_weights(gen, 300, 200)
    q, s = ds.quantize_fp8_block(w)
    e = s.view(torch.uint8).double() - 127
    ref = q.double() * torch.pow(2.0, e)[torch.arange(300) // 128][:, torch.arange(200) // 128]
    assert torch.equal(ds.dequantize_fp8_block(q, s, "x.weight", torch.float32), ref.float())


def test_bf16_variant_loads_in_transformers_under_deepseek_names(ckpts):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(ckpts["bf16"], dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    assert model.config.mlp_layer_types == ["hash_moe", "moe", "moe"]
    assert model.config.layer_types[1:] == ["compressed_sparse_attention", "heavily_compressed_attention"]
    sd, raw = model.state_dict(), load_file(str(ckpts["bf16"] / "model.safetensors"))
    for name, t in raw.items():  # our name map is transformers' conversion mapping
        if not ds.is_expert_tensor(name):
            assert torch.equal(sd[ds.hf_name(name)], t.to(sd[ds.hf_name(name)].dtype)), name
    gu = sd["model.layers.1.mlp.experts.gate_up_proj"][3]
    assert torch.equal(gu, torch.cat((raw[f"{W1}.weight"], raw["layers.1.ffn.experts.3.w3.weight"])).float())


def test_shipped_format_reads_as_is(ckpts):
    shipped, raw = ckpts["shipped"], load_file(str(ckpts["shipped"] / "model.safetensors"))
    cfg = json.loads((shipped / "config.json").read_text())
    assert cfg["expert_dtype"] == "fp4" and cfg["quantization_config"] == ds.SHIPPED_QUANT_CONFIG
    assert raw[f"{W1}.weight"].dtype == torch.int8 and raw[f"{W1}.weight"].shape == (64, 64)
    assert raw[f"{W1}.scale"].dtype == torch.float8_e8m0fnu and raw[f"{W1}.scale"].shape == (64, 4)
    assert raw["layers.0.attn.wq_b.weight"].dtype == torch.float8_e4m3fn
    assert raw["layers.0.attn.wq_b.scale"].shape == (2, 1)  # 256 x 64: two 128-row blocks, one partial column block
    assert raw["layers.0.ffn.shared_experts.w2.weight"].dtype == torch.float8_e4m3fn
    assert raw["layers.1.attn.compressor.wkv.weight"].dtype == torch.bfloat16
    _, qc = read_quantization_config(shipped)
    assert (qc["profile"], qc["format"], qc["delegate"], qc["source_format"]) == \
        ("deepseek_v4", "deepseek-v4", ds.SHIPPED_QUANT_CONFIG, "deepseek-v4-flash")
    experts = load_packed_experts(shipped)
    assert len(experts) == 3 * 8 * 3
    masters = load_file(str(ckpts["bf16"] / "model.safetensors"))
    for (layer, e, proj), q in experts.items():
        stem = f"layers.{layer}.ffn.experts.{e}.{ds.PROJ_NAMES[proj]}"
        # byte for byte the file's bytes (no re-quantization) ...
        assert torch.equal(q.codes, raw[f"{stem}.weight"].view(torch.uint8)), stem
        assert torch.equal(q.scales, raw[f"{stem}.scale"].view(torch.uint8)), stem
        # ... and the profile recorded reproduces them from the masters they were made from
        assert common.quantize(masters[f"{stem}.weight"], profile=qc["profile"]).equal(q), stem
    adv = experts[(0, 0, "gate")]
    assert int(adv.scales[0, 0]) == 1 and not adv.codes[0, :16].any()  # zero block: DeepSeek's floor 2^-126
    assert adv.codes[1, :16].any()  # subnormals survive at the floor scale


def test_inspect_names_the_shipped_format(ckpts):
    report = inspect_checkpoint(ckpts["shipped"])
    assert report["quantization_config"]["source_format"] == "deepseek-v4-flash"
    assert report["summary"]["expert_tensors"] == 72 and report["experts"][0]["format"] == "mxfp4/deepseek-v4"
    text = format_report(report)
    assert "deepseek-v4-flash" in text and "FP8" in text and "profile=deepseek_v4" in text
    raw = load_file(str(ckpts["shipped"] / "model.safetensors"))
    from common.audit import tensor_hash

    row = next(r for r in report["experts"] if (r["layer"], r["expert"], r["proj"]) == (1, 3, "gate"))
    assert row["hash"] == tensor_hash(common.MXFP4Tensor(raw[f"{W1}.weight"].view(torch.uint8),
                                                         raw[f"{W1}.scale"].view(torch.uint8), "deepseek_v4"))


def test_quantize_passes_shipped_experts_through_and_converts_bf16(ckpts):
    root = ckpts["root"]
    out = quantize_checkpoint(ckpts["shipped"], root / "pass", profile="deepseek_v4", fmt="deepseek-v4",
                              progress=False)
    a, b = load_file(str(ckpts["shipped"] / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8))
                                        if a[k].dtype.itemsize == 1 else torch.equal(a[k], b[k]) for k in a)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "mxfp4_rl" and qc["delegate"] == ds.SHIPPED_QUANT_CONFIG
    with pytest.raises(ValueError, match=r"already MXFP4.*deepseek_v4"):
        quantize_checkpoint(ckpts["shipped"], root / "bad", profile="flashinfer", fmt="deepseek-v4", progress=False)
    conv = quantize_checkpoint(ckpts["bf16"], root / "conv", profile="deepseek_v4", fmt="deepseek-v4", progress=False)
    got, want = load_packed_experts(conv), load_packed_experts(ckpts["shipped"])
    assert got.keys() == want.keys() and all(got[k].equal(want[k]) for k in want)


def _bad(ckpts, name, edit):
    dst = ckpts["root"] / name
    shutil.copytree(ckpts["shipped"], dst)
    t = load_file(str(dst / "model.safetensors"))
    edit(t)
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("case, err, msg", [
    # DeepSeek-V4-Flash-Base ships float32 scales: not this format, refused naming the tensor
    ("f32_scale", DTypeError, rf"'{W1}.scale': expected torch.float8_e8m0fnu .*got torch.float32"),
    ("odd_k", ShapeError, rf"'{W1}.weight': expected int8 \[out, in/2\] .*K = 72"),
    ("no_scale", CheckpointError, rf"'{W1}.weight' has no partner '{W1}.scale'"),
    ("uint8_codes", DTypeError, rf"'{W1}.weight': .*must be int8.*got torch.uint8"),
    ("nan_scale", CheckpointError, rf"'{W1}.scale': scale byte 0xFF"),
])
def test_bad_shipped_experts_are_refused_naming_the_tensor(ckpts, case, err, msg):
    def edit(t):
        if case == "f32_scale":
            t[f"{W1}.scale"] = t[f"{W1}.scale"].float()
        elif case == "odd_k":
            t[f"{W1}.weight"] = t[f"{W1}.weight"][:, :36].contiguous()
        elif case == "no_scale":
            del t[f"{W1}.scale"]
        elif case == "uint8_codes":
            t[f"{W1}.weight"] = t[f"{W1}.weight"].view(torch.uint8)
        else:
            s = t[f"{W1}.scale"].view(torch.uint8).clone()
            s[5, 1] = 0xFF
            t[f"{W1}.scale"] = s.view(torch.float8_e8m0fnu)
    bad = _bad(ckpts, case, edit)
    with pytest.raises(err, match=msg):
        load_packed_experts(bad)
    with pytest.raises(err, match=msg):
        inspect_checkpoint(bad)

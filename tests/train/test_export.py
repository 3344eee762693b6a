"""export_for_engine: vLLM parameter names, [w1; w3] rows, bytes equal to the checkpoint's, stable audit hashes."""

from __future__ import annotations

import pytest
import torch

import common
from common.checkpoint import load_packed_experts
from mxfp4_train import convert, load_mxfp4_model
from mxfp4_train.export import engine_hashes, export_for_engine, export_hashes

from .conftest import load_bf16


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_export_matches_checkpoint_bytes_in_vllm_layout(arch, tiny_mxfp4_ckpts):
    model = load_mxfp4_model(tiny_mxfp4_ckpts[arch], "lora", lora=None)
    out = {n: t for n, t, _ in export_for_engine(model)}
    ref = load_packed_experts(tiny_mxfp4_ckpts[arch])
    names = {f"model.layers.{L}.mlp.experts.{p}" for L in (0, 1)
             for p in ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale")}
    if arch == "gpt_oss":
        names |= {f"model.layers.{L}.mlp.experts.{p}" for L in (0, 1) for p in ("w13_bias", "w2_bias")}
    assert set(out) == names
    i = 64
    for L in (0, 1):
        p = f"model.layers.{L}.mlp.experts"
        w13, s13 = out[f"{p}.w13_weight"], out[f"{p}.w13_weight_scale"]
        assert w13.dtype == torch.uint8 and tuple(w13.shape) == (8, 2 * i, 128 // 2)
        for e in range(8):
            assert torch.equal(w13[e, :i], ref[(L, e, "gate")].codes)  # rows [w1; w3]
            assert torch.equal(w13[e, i:], ref[(L, e, "up")].codes)
            assert torch.equal(s13[e, i:], ref[(L, e, "up")].scales)
            assert torch.equal(out[f"{p}.w2_weight"][e], ref[(L, e, "down")].codes)
    if arch == "gpt_oss":
        # the fused bias [E, 2I] is interleaved like the rows in the checkpoint; exported [gate biases; up biases]
        b13 = model.model.layers[0].mlp.experts.b13
        assert torch.equal(out["model.layers.0.mlp.experts.w13_bias"][:, :i], b13[:, 0::2])
        assert torch.equal(out["model.layers.0.mlp.experts.w13_bias"][:, i:], b13[:, 1::2])


def test_hashes_are_recomputable_from_readback_and_detect_one_nibble(tiny_mxfp4_ckpts):
    model = load_mxfp4_model(tiny_mxfp4_ckpts["qwen3_moe"], "lora", lora=None)
    params = {n: t.clone() for n, t, _ in export_for_engine(model)}
    mine = export_hashes(model)
    assert engine_hashes(params, "flashinfer") == mine
    assert mine["model.layers.0.mlp.experts.w13_weight"] == mine["model.layers.0.mlp.experts.w13_weight_scale"]
    params["model.layers.1.mlp.experts.w2_weight"][3, 5, 7] ^= 0x10  # one 4-bit code of one expert
    changed = {k for k, v in engine_hashes(params, "flashinfer").items() if v != mine[k]}
    assert changed == {"model.layers.1.mlp.experts.w2_weight", "model.layers.1.mlp.experts.w2_weight_scale"}
    assert engine_hashes(params, "ocp") != mine  # the profile is part of the hash


def test_qat_export_is_the_codec_quantization_of_the_masters(tiny_ckpts, tiny_mxfp4_ckpts):
    qat = convert(load_bf16(tiny_ckpts["qwen3_moe"]), "qat", profile="flashinfer")
    packed = load_mxfp4_model(tiny_mxfp4_ckpts["qwen3_moe"], "lora", lora=None)
    # untrained masters = the bf16 checkpoint, so the export equals the quantized checkpoint's
    assert export_hashes(qat) == export_hashes(packed)
    with torch.no_grad():
        qat.model.layers[0].mlp.experts.w13[2, 3, :32] += 0.5
    diff = {k for k, v in export_hashes(qat).items() if v != export_hashes(packed)[k]}
    assert diff == {"model.layers.0.mlp.experts.w13_weight", "model.layers.0.mlp.experts.w13_weight_scale"}


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_fresh_qat_learner_exports_the_checkpoint_bytes_until_an_optimizer_step(arch, tiny_mxfp4_ckpts):
    """Issue 26: re-quantizing a checkpoint's own dequantized experts changes ~25% of the code bytes (another scale
    for the same values), so a fresh QAT learner's first sync reported changes after zero training. It serves the
    loaded bytes until a master changes, then the codec's quantization of the masters."""
    ckpt = tiny_mxfp4_ckpts[arch]
    checkpoint = {name: t for name, t, _ in export_for_engine(load_mxfp4_model(ckpt, "lora", lora=None))}
    qat = load_mxfp4_model(ckpt, "qat")
    fresh = {name: t for name, t, _ in export_for_engine(qat)}
    assert fresh.keys() == checkpoint.keys()
    for name, t in checkpoint.items():
        assert torch.equal(fresh[name], t), name
    experts = qat.model.layers[0].mlp.experts
    opt = torch.optim.SGD([experts.w13], lr=1.0)
    ids = torch.arange(1, 17).unsqueeze(0)
    qat(input_ids=ids).logits.float().pow(2).mean().backward()
    opt.step()
    stepped = {name: t for name, t, _ in export_for_engine(qat)}
    changed = {n for n in stepped if not torch.equal(stepped[n], checkpoint[n])}
    assert "model.layers.0.mlp.experts.w13_weight" in changed
    assert not any(n.startswith("model.layers.1.") for n in changed)  # untouched masters keep their bytes
    w13, _ = experts.packed()
    assert w13.equal(common.quantize(experts.w13.detach(), profile="flashinfer"))

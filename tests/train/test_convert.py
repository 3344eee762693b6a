"""convert / load / save on real transformers models (Qwen3-MoE, gpt-oss, DeepSeek-V3 tiny checkpoints)."""

from __future__ import annotations

import pytest
import torch

import common
from mxfp4_train import convert
from mxfp4_train.checkpoint_io import load_mxfp4_model, save_mxfp4_checkpoint
from mxfp4_train import experts_modules

from .conftest import ARCHS, load_bf16, token_batch
from .helpers import rel_err


def _with_dequantized_experts(ref, converted):
    """The bf16 transformers model whose experts hold exactly the weights the converted model computes with."""
    for name, mod in experts_modules(converted):
        w13, w2 = mod.dequantized(torch.bfloat16)
        hf = ref.get_submodule(name)
        if hf.is_transposed:  # gpt-oss keeps [E, in, out]
            w13, w2 = w13.transpose(1, 2), w2.transpose(1, 2)
        with torch.no_grad():
            hf.gate_up_proj.copy_(w13)
            hf.down_proj.copy_(w2)
    return ref


@pytest.mark.parametrize("mode", ["lora", "qat"])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_equal_model_with_dequantized_experts(arch, mode, tiny_ckpts):
    model = convert(load_bf16(tiny_ckpts[arch]), mode, profile="flashinfer")
    ref = _with_dequantized_experts(load_bf16(tiny_ckpts[arch]), model)
    ids = token_batch()
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    # Same ops in the same order as transformers' eager experts loop, and a fresh LoRA adds exact zeros: bitwise.
    assert torch.equal(got, want)
    # ...and quantization really happened: the original bf16 model differs.
    with torch.no_grad():
        assert not torch.equal(load_bf16(tiny_ckpts[arch])(ids).logits, got)


def test_logits_close_to_default_grouped_mm_experts(tiny_ckpts):
    model = convert(load_bf16(tiny_ckpts["qwen3_moe"]), "lora", profile="flashinfer")
    ref = _with_dequantized_experts(load_bf16(tiny_ckpts["qwen3_moe"], eager=False), model)
    ids = token_batch()
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    # grouped_mm accumulates in another order; both round to bf16 (u = 2^-9 ~ 2e-3) at ~10 places through 2 layers:
    # 1e-2 norm-wise. Quantization itself moves the logits by far more (checked above: not equal, ~5e-2).
    assert rel_err(got, want) < 1e-2


def test_convert_freezes_everything_but_adapters(tiny_ckpts):
    model = convert(load_bf16(tiny_ckpts["deepseek_v3"]), "lora", profile="flashinfer", lora_rank=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert any("shared_experts.gate_proj.lora_A" in n for n in trainable)
    for _, mod in experts_modules(model):
        assert mod.w13_codes.dtype == torch.uint8 and not any(p.dtype == torch.bfloat16 for p in mod.parameters())


def test_convert_requires_profile_and_finds_experts(tiny_ckpts):
    model = load_bf16(tiny_ckpts["qwen3_moe"])
    with pytest.raises(ValueError, match="profile is required"):
        convert(model, "lora", profile=None)
    with pytest.raises(common.UnknownProfileError):
        convert(model, "lora", profile="nvfp4")
    with pytest.raises(ValueError, match="no transformers MoE experts block"):
        convert(model, "lora", profile="flashinfer", target=r"layers\.99\.")
    convert(model, "lora", profile="flashinfer", target=r"layers\.1\.")
    assert [n for n, _ in experts_modules(model)] == ["model.layers.1.mlp.experts"]


@pytest.mark.parametrize("arch", ARCHS)
def test_load_packed_from_checkpoint_matches_convert(arch, tiny_ckpts, tiny_mxfp4_ckpts):
    loaded = load_mxfp4_model(tiny_mxfp4_ckpts[arch], "lora")
    converted = convert(load_bf16(tiny_ckpts[arch]), "lora", profile="flashinfer")
    for (n1, a), (n2, b) in zip(experts_modules(loaded), experts_modules(converted)):
        assert n1 == n2
        for qa, qb in zip(a.packed(), b.packed()):
            assert qa.equal(qb)  # the checkpoint's bytes are the codec's bytes
    # nothing in the loaded model is a widened expert stack
    e, h, i = 8, 128, 64
    stacks = {(e, 2 * i, h), (e, h, i), (e, h, 2 * i), (e, i, h)}
    for name, t in list(loaded.named_parameters()) + list(loaded.named_buffers()):
        assert not (t.is_floating_point() and tuple(t.shape) in stacks), name
    ids = token_batch(2)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, converted(ids).logits)
    # both paths give the same trainable adapters (shared experts included for DeepSeek-V3)
    def trainable(m):
        return {n: tuple(p.shape) for n, p in m.named_parameters() if p.requires_grad}

    assert trainable(loaded) == trainable(converted) and trainable(loaded)


def test_qat_step_then_save_serves_the_trained_bytes(tiny_ckpts, tmp_path):
    model = convert(load_bf16(tiny_ckpts["qwen3_moe"]), "qat", profile="flashinfer")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = token_batch(3)
    before = [m.packed()[0].codes.clone() for _, m in experts_modules(model)]
    model(ids, labels=ids).loss.backward()
    opt.step()
    after = [m.packed()[0].codes for _, m in experts_modules(model)]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))  # the step moved some codes
    save_mxfp4_checkpoint(model, tmp_path / "qat")
    served = load_mxfp4_model(tmp_path / "qat", "lora", lora=None)
    with torch.no_grad():
        assert torch.equal(served(ids).logits, model(ids).logits)

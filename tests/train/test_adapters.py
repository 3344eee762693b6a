"""Adapters saved by the learner load in PEFT (on the bf16 model with the same expert weights) and give the same
function; and they load back into the learner bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

from mxfp4_train import convert, experts_modules, load_adapters, save_adapters

from .conftest import load_bf16, token_batch
from .helpers import rel_err
from .test_convert import _with_dequantized_experts


def _randomise_adapters(model, seed=0, std=0.1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n or n.endswith((".A", ".B")):
                p.normal_(0, std, generator=gen)


def _fp32(path):
    return load_bf16(path).float()


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_peft_loads_our_adapters_and_computes_the_same_function(arch, tiny_ckpts, tmp_path):
    peft = pytest.importorskip("peft")
    # Shared-expert adapters are left out here: PEFT 0.21 on transformers 5 rewrites a target_modules entry ending in
    # ".gate_proj"/".up_proj" into the fused routed `gate_up_proj` (its v4 -> v5 MoE config conversion), so PEFT
    # itself cannot adapt DeepSeek-V3's shared experts by name. Their file names follow PEFT's nn.Linear convention.
    model = convert(_fp32(tiny_ckpts[arch]), "lora", profile="flashinfer", lora_rank=4, lora_alpha=8,
                    shared_experts_lora=False)
    _randomise_adapters(model)
    save_adapters(model, tmp_path / "adapter", base_model_name_or_path=str(tiny_ckpts[arch]))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert cfg["target_modules"] == []

    base = _with_dequantized_experts(_fp32(tiny_ckpts[arch]), model)
    ids = token_batch(4)
    with torch.no_grad():
        no_adapter = base(ids).logits.clone()
        pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
        theirs, ours = pm(ids).logits, model(ids).logits
    effect = rel_err(no_adapter, ours)
    # fp32 on purpose: PEFT folds W + s*B@A into one weight while we add s*(x A^T) B^T to x W^T; in bf16 those
    # different roundings flip some top-k routing decisions and the comparison measures the flips, not the adapters.
    # In fp32 (u = 6e-8, a few tens of ops per logit) 1e-5 is a safe ceiling (measured 5e-7). The adapters (std 0.1)
    # move the logits by > 10%, so a wrong expert/rank order or a swapped gate_up/down adapter cannot pass.
    assert effect > 0.1
    assert rel_err(theirs, ours) < 1e-5


def test_adapters_round_trip_bitwise(tiny_ckpts, tmp_path):
    a = convert(load_bf16(tiny_ckpts["deepseek_v3"]), "lora", profile="flashinfer", lora_rank=4)
    _randomise_adapters(a, seed=1)
    save_adapters(a, tmp_path / "ad")
    b = convert(load_bf16(tiny_ckpts["deepseek_v3"]), "lora", profile="flashinfer", lora_rank=4)
    load_adapters(b, tmp_path / "ad")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    c = convert(load_bf16(tiny_ckpts["deepseek_v3"]), "lora", profile="flashinfer", lora_rank=8)
    with pytest.raises(ValueError, match="expected lora_A"):
        load_adapters(c, tmp_path / "ad")


def test_expert_lora_peft_layout_is_expert_major_rows_rank_major_columns():
    from mxfp4_train.lora import ExpertLoRA, LoRASpec

    lora = ExpertLoRA(3, 32, 64, LoRASpec(r=2, alpha=2))
    with torch.no_grad():
        lora.B.copy_(torch.arange(3 * 64 * 2, dtype=torch.float32).reshape(3, 64, 2))
    a, b = lora.to_peft()
    # lora_A row e*r + j is rank j of expert e; lora_B column j*E + e is rank j of expert e (PEFT ParamWrapper)
    assert torch.equal(a[1 * 2 + 1], lora.A[1, 1])
    assert torch.equal(b[:, 1 * 3 + 2], lora.B[2, :, 1])
    # and PEFT's own delta formula on these tensors equals ours
    delta = torch.einsum("orE,Eri->Eoi", b.reshape(64, 2, 3), a.reshape(3, 2, 32)) * lora.spec.scaling
    assert torch.allclose(delta, lora.delta_weight(), rtol=0, atol=0)


def test_dense_lora_linear_matches_peft_lora_linear(tiny_ckpts, tmp_path):
    """LoRALinear (used for shared experts) = PEFT's lora.Linear: same names, same function. Checked on attention
    projections, where PEFT's MoE renaming (see above) does not interfere."""
    peft = pytest.importorskip("peft")
    from mxfp4_train.lora import LoRALinear, LoRASpec

    model = convert(_fp32(tiny_ckpts["qwen3_moe"]), "lora", profile="flashinfer", lora_rank=4, lora_alpha=8)
    for layer in model.model.layers:
        layer.self_attn.q_proj = LoRALinear(layer.self_attn.q_proj, LoRASpec(r=4, alpha=8))
    _randomise_adapters(model, seed=2)
    save_adapters(model, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["self_attn.q_proj"]
    base = _with_dequantized_experts(_fp32(tiny_ckpts["qwen3_moe"]), model)
    ids = token_batch(5)
    with torch.no_grad():
        plain = base(ids).logits.clone()
        theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "ad"))(ids).logits
        ours = model(ids).logits
    assert rel_err(plain, ours) > 0.1 and rel_err(theirs, ours) < 1e-5  # bounds as in the test above

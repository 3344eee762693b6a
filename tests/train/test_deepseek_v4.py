"""The learner on DeepSeek-V4 (transformers 5.19 DeepseekV4ForCausalLM): loaded from a tiny checkpoint in
DeepSeek-V4-Flash's shipped format, its experts are the file's bytes and its logits are, bit for bit, those of
transformers' own model loaded from the same checkpoint with transformers' FP8/FP4 decoder (eager experts); hash
routing and the top-k router both run through the packed experts; LoRA (routed + shared expert) and QAT steps run."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import common
import mxfp4_train
from common.checkpoint.tiny_deepseek_v4 import write_tiny_deepseek_v4
from mxfp4_train.lora import LoRALinear


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds4_train")
    seed = int(torch.randint(0, 2**31 - 1, (1,)))  # fresh weights each run
    return {"shipped": write_tiny_deepseek_v4(root / "shipped", seed=seed),
            "bf16": write_tiny_deepseek_v4(root / "bf16", seed=seed, shipped=False)}


def _transformers_model(path, **kw):
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    qc = FineGrainedFP8Config(dequantize=True, scale_fmt="ue8m0") if "quantization_config" not in kw else None
    kw = {"dtype": torch.bfloat16, "experts_implementation": "eager", **kw}
    if qc is not None:
        kw["quantization_config"] = qc
    return AutoModelForCausalLM.from_pretrained(path, **kw).eval()


def _ids(gen, batch=2, seq=12):
    return torch.randint(2, 256, (batch, seq), generator=gen)


def test_shipped_checkpoint_loads_bit_exact_against_transformers(ckpts):
    ours = mxfp4_train.load_mxfp4_model(ckpts["shipped"], "lora", lora=None).eval()
    ref = _transformers_model(ckpts["shipped"])
    raw = load_file(str(ckpts["shipped"] / "model.safetensors"))
    blocks = [layer.mlp for layer in ours.model.layers]
    assert [b.is_hash for b in blocks] == [True, False, False]  # hash-routed layer 0, top-k router after
    for i, block in enumerate(blocks):
        exp = block.experts
        assert isinstance(exp, mxfp4_train.MXFP4Experts) and exp.profile == "deepseek_v4" and exp.activation.clamp == 10
        # resident bytes are the file's bytes: w13 rows [w1; w3] of each expert, w2 as is
        w1 = raw[f"layers.{i}.ffn.experts.5.w1.weight"].view(torch.uint8)
        w3s = raw[f"layers.{i}.ffn.experts.5.w3.scale"].view(torch.uint8)
        assert torch.equal(exp.w13_codes[5, :64], w1) and torch.equal(exp.w13_scales[5, 64:], w3s)
        assert torch.equal(exp.w2_codes[5], raw[f"layers.{i}.ffn.experts.5.w2.weight"].view(torch.uint8))
        # the learner's dequantized experts are transformers' official decode of the same bytes, bit for bit
        w13, w2 = exp.dequantized(torch.bfloat16)
        hf = ref.model.layers[i].mlp.experts
        assert torch.equal(w13.view(torch.int16), hf.gate_up_proj.view(torch.int16)), i
        assert torch.equal(w2.view(torch.int16), hf.down_proj.view(torch.int16)), i
    sd_ours, sd_ref = ours.state_dict(), ref.state_dict()
    for name, t in sd_ref.items():  # dense layers: FP8 decoded the same way, every dtype as transformers keeps it
        if ".experts." not in name:
            assert t.dtype == sd_ours[name].dtype and torch.equal(t, sd_ours[name]), name
    ids = _ids(torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).logits, ref(ids).logits
    assert torch.equal(a, b)
    # the routed experts matter: zeroing one layer's bytes moves the logits
    with torch.no_grad():
        blocks[1].experts.w2_codes.zero_()
        assert not torch.equal(ours(ids).logits, b)


def test_lora_step_on_routed_and_shared_experts(ckpts):
    model = mxfp4_train.load_mxfp4_model(ckpts["shipped"], "lora", lora=mxfp4_train.LoRASpec(r=4, alpha=8))
    shared = model.model.layers[0].mlp.shared_experts
    assert all(isinstance(getattr(shared, p), LoRALinear) for p in ("gate_proj", "up_proj", "down_proj"))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n for n in trainable)
    assert any(".mlp.experts." in n for n in trainable) and any("shared_experts" in n for n in trainable)
    before_bytes = [m.w13_codes.clone() for _, m in mxfp4_train.experts_modules(model)]
    before = {n: p.detach().clone() for n, p in trainable.items()}
    opt = torch.optim.SGD(trainable.values(), lr=1e-2)  # no weight decay: only a gradient moves a factor
    ids = _ids(torch.Generator().manual_seed(1))
    loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()
    moved = [n for n, p in trainable.items() if not torch.equal(p, before[n])]
    assert any("mlp.experts" in n for n in moved) and any("shared_experts" in n for n in moved)
    assert all(torch.equal(m.w13_codes, b) for (_, m), b in zip(mxfp4_train.experts_modules(model), before_bytes))


def test_qat_serves_the_shipped_bytes_until_a_step(ckpts, tmp_path):
    model = mxfp4_train.load_mxfp4_model(ckpts["shipped"], "qat")
    exp = model.model.layers[1].mlp.experts
    raw = load_file(str(ckpts["shipped"] / "model.safetensors"))
    w13, _ = exp.packed()
    assert torch.equal(w13.codes[2, 64:], raw["layers.1.ffn.experts.2.w3.weight"].view(torch.uint8))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    ids = _ids(torch.Generator().manual_seed(2))
    model(ids, labels=ids).loss.backward()
    assert exp.w13.grad is not None and bool(exp.w13.grad.abs().sum() > 0)  # straight-through reaches the masters
    opt.step()
    w13_after, _ = exp.packed()
    assert not w13_after.equal(w13)
    assert w13_after.equal(common.quantize(exp.w13.detach(), profile="deepseek_v4"))
    # saved under DeepSeek's names (format deepseek-v4) and read back: the trained bytes, the same logits
    saved = mxfp4_train.save_mxfp4_checkpoint(model, tmp_path / "saved")
    back = mxfp4_train.load_mxfp4_model(saved, "lora", lora=None).eval()
    assert back.model.layers[1].mlp.experts.packed()[0].equal(w13_after)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model.eval()(ids).logits)


def test_convert_a_bf16_transformers_model(ckpts):
    """convert() on transformers' own model (hash + top-k layers): logits equal the same model whose experts hold
    the dequantized packed weights (LoRA mode; QAT masters are bf16 by design, QAT runs in the test above).
    fp32: transformers 5.19's DeepSeek-V4 loaded in bf16 from an unquantized checkpoint keeps its norms in fp32
    (_keep_in_fp32_modules_strict) and its forward then fails (fp32 norm output into a bf16 linear), with or
    without us."""
    ref = _transformers_model(ckpts["bf16"], quantization_config=None, dtype=torch.float32)
    ids = _ids(torch.Generator().manual_seed(3))
    for mode in ("lora",):
        model = _transformers_model(ckpts["bf16"], quantization_config=None, dtype=torch.float32)
        mxfp4_train.convert(model, mode, profile="deepseek_v4", lora_rank=4)
        with torch.no_grad():
            for layer, hf in zip(model.model.layers, ref.model.layers):
                w13, w2 = layer.mlp.experts.dequantized(torch.float32)
                hf.mlp.experts.gate_up_proj.copy_(w13)
                hf.mlp.experts.down_proj.copy_(w2)
            assert torch.equal(model(ids).logits, ref(ids).logits), mode


def test_demo_deepseek_v4_learner_rows():
    """`mxfp4-rl demo --model deepseek_v4`: the MXFP4 learner row is exact, the bf16 (common practice) row is not."""
    from mxfp4_train.deepseek_v4_demo import format_result, run_deepseek_v4_demo

    res = run_deepseek_v4_demo(seed=int(torch.randint(0, 2**31 - 1, (1,))), tokens=8)
    ours, common_row = res["rows"].values()
    assert res["identical"] and ours.max_abs_dlogp == 0.0 and ours.mismatch_kl == 0.0
    assert common_row.mean_abs_dlogp > 0.0
    assert "identical to transformers' decode of the shipped bytes: YES" in format_result(res)


def test_release_yarn_rope_scaling_loads_bit_exact(tmp_path):
    """The checkpoint with DeepSeek-V4-Flash's YaRN `rope_scaling` (what vLLM 0.25's DeepSeek-V4 kernels need: its
    default rope builds a bf16 cos/sin cache that its fused inverse-RoPE kernel refuses) loads into the learner bit
    for bit against transformers; transformers applies the YaRN to the compressed layers only (as vLLM 0.32 does;
    vLLM 0.25 applies it to every layer, bench/RESULTS.md), and it changes the logits (long-wavelength rotations)."""
    from common.checkpoint.tiny_deepseek_v4 import FLASH_ROPE_SCALING

    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    yarn = write_tiny_deepseek_v4(tmp_path / "yarn", seed=seed, rope_scaling=FLASH_ROPE_SCALING)
    plain = write_tiny_deepseek_v4(tmp_path / "plain", seed=seed)
    ours = mxfp4_train.load_mxfp4_model(yarn, "lora", lora=None).eval()
    rope = ours.config.rope_parameters
    assert rope["main"]["rope_type"] == "default" and rope["compress"]["rope_type"] == "yarn"
    assert rope["compress"]["factor"] == FLASH_ROPE_SCALING["factor"]
    ids = _ids(torch.Generator().manual_seed(1), seq=40)
    with torch.no_grad():
        a = ours(ids).logits
        b = _transformers_model(yarn)(ids).logits
        c = mxfp4_train.load_mxfp4_model(plain, "lora", lora=None).eval()(ids).logits
    assert torch.equal(a, b)
    assert not torch.equal(a, c)

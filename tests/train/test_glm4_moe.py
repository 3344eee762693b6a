"""GLM-4.x MoE (transformers Glm4MoeForCausalLM, GLM-4.5 / 4.6 / 4.7-Flash class) through the Qwen3-MoE path:
`mxfp4-rl quantize` of a tiny bf16 checkpoint, `load_mxfp4_model` with the bytes resident, logits equal bit for
bit transformers' model whose experts hold the dequantized bytes, shared-expert LoRA, a LoRA step."""

from __future__ import annotations

import torch

import mxfp4_train
from common.checkpoint import load_packed_experts, quantize_checkpoint, write_tiny_checkpoint
from mxfp4_train.lora import LoRALinear


def test_glm4_moe_quantize_load_and_step(tmp_path):
    from transformers import AutoModelForCausalLM

    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    src = write_tiny_checkpoint(tmp_path / "bf16", arch="glm4_moe", seed=seed)
    ckpt = quantize_checkpoint(src, tmp_path / "q", profile="flashinfer", progress=False)
    packed = load_packed_experts(ckpt)
    assert len(packed) == 8 * 3 and all(k[0] == 1 for k in packed)  # layer 0 is dense (first_k_dense_replace)
    ours = mxfp4_train.load_mxfp4_model(ckpt, "lora", lora=None, dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, experts_implementation="eager").eval()
    exp = ours.model.layers[1].mlp.experts
    assert torch.equal(exp.w13_codes[3, :64], packed[(1, 3, "gate")].codes)
    with torch.no_grad():
        w13, w2 = exp.dequantized(torch.float32)
        ref.model.layers[1].mlp.experts.gate_up_proj.copy_(w13)
        ref.model.layers[1].mlp.experts.down_proj.copy_(w2)
        ids = torch.randint(2, 256, (2, 16), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(ours(ids).logits, ref(ids).logits)
    model = mxfp4_train.load_mxfp4_model(ckpt, "lora", lora=mxfp4_train.LoRASpec(r=4, alpha=8), dtype=torch.float32)
    assert isinstance(model.model.layers[1].mlp.shared_experts.up_proj, LoRALinear)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    model(ids, labels=ids).loss.backward()
    torch.optim.SGD(params.values(), lr=1e-2).step()  # no weight decay: only a gradient moves a factor
    moved = {n for n, p in params.items() if not torch.equal(p, before[n])}
    assert any("mlp.experts" in n for n in moved) and any("shared_experts" in n for n in moved), sorted(moved)

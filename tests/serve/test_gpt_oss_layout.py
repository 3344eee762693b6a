"""gpt-oss fused expert tensors -> per-expert canonical pieces (the plugin's gpt-oss loader path)."""

from __future__ import annotations

import pytest
import torch

from common import quantize
from common.layouts.gpt_oss import to_gpt_oss_down, to_gpt_oss_gate_up
from mxfp4_serve.gpt_oss_layout import expert_pieces, parse_name, split_experts

E, H, I = 3, 64, 32


@pytest.mark.parametrize("name,parsed", [
    ("model.layers.3.mlp.experts.gate_up_proj_blocks", ("model.layers.3.mlp.experts", "gate_up_proj", "codes", None)),
    ("model.layers.3.mlp.experts.down_proj_scales", ("model.layers.3.mlp.experts", "down_proj", "scales", None)),
    ("model.layers.0.mlp.experts.gate_up_proj_bias", ("model.layers.0.mlp.experts", "gate_up_proj", "bias", None)),
    ("model.layers.0.mlp.experts.down_proj", ("model.layers.0.mlp.experts", "down_proj", "dense", None)),
    ("model.layers.1.mlp.experts.7.up_proj.weight_scale", ("model.layers.1.mlp.experts", "up_proj", "scales", 7)),
    ("model.layers.1.mlp.router.weight", None),
    ("model.layers.1.self_attn.sinks", None),
])
def test_parse_name(name, parsed):
    assert parse_name(name) == parsed


def _packed():
    g = torch.Generator().manual_seed(0)
    gate = quantize(torch.randn(E, I, H, generator=g), profile="flashinfer")
    up = quantize(torch.randn(E, I, H, generator=g), profile="flashinfer")
    down = quantize(torch.randn(E, H, I, generator=g), profile="flashinfer")
    return gate, up, down


def test_blocks_and_scales_split_back_to_canonical_bytes():
    gate, up, down = _packed()
    blocks, scales = to_gpt_oss_gate_up(gate, up)  # the codec's own canonical -> gpt-oss conversion
    got = {(e, s): t for e, s, t in split_experts("gate_up_proj", "codes", blocks)}
    got_s = {(e, s): t for e, s, t in split_experts("gate_up_proj", "scales", scales)}
    for e in range(E):
        assert torch.equal(got[e, "w1"], gate.codes[e]) and torch.equal(got[e, "w3"], up.codes[e])
        assert torch.equal(got_s[e, "w1"], gate.scales[e]) and torch.equal(got_s[e, "w3"], up.scales[e])
    dblocks, dscales = to_gpt_oss_down(down)
    for e, shard, t in split_experts("down_proj", "codes", dblocks):
        assert shard == "w2" and torch.equal(t, down.codes[e])


def test_bf16_hub_layout_and_biases_and_ep_filter():
    g = torch.Generator().manual_seed(1)
    w1, w3 = torch.randn(E, I, H, generator=g), torch.randn(E, I, H, generator=g)
    fused = torch.stack((w1, w3), dim=2).flatten(1, 2).transpose(1, 2)  # hub: [E, H, 2I], columns g0,u0,g1,...
    got = list(split_experts("gate_up_proj", "dense", fused, wanted={1}))
    assert [(e, s) for e, s, _ in got] == [(1, "w1"), (1, "w3")]  # other experts not even read
    assert torch.equal(got[0][2], w1[1]) and torch.equal(got[1][2], w3[1])
    bias = torch.stack((w1[:, :, 0], w3[:, :, 0]), dim=2).flatten(1, 2)  # [E, 2I] interleaved
    pieces = {(e, s): t for e, s, t in split_experts("gate_up_proj", "bias", bias)}
    assert torch.equal(pieces[2, "w1"], w1[2, :, 0]) and torch.equal(pieces[2, "w3"], w3[2, :, 0])
    per_expert = list(expert_pieces("up_proj", "codes", 5, torch.zeros(4, 2, dtype=torch.uint8), wanted={5}))
    assert [(e, s) for e, s, _ in per_expert] == [(5, "w3")]
    assert list(expert_pieces("up_proj", "codes", 5, torch.zeros(4, 2), wanted={0})) == []


def test_wrong_block_dtype_names_the_tensor():
    with pytest.raises(Exception, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj_blocks\[0\]"):
        list(split_experts("gate_up_proj", "codes", torch.zeros(1, 4, 2, 16, dtype=torch.float32),
                           name="model.layers.0.mlp.experts.gate_up_proj_blocks"))

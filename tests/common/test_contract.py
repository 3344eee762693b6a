"""The learner-engine contract (common/moe, common/envs): each item has one definition in production code, and the
layouts it defines read and write canonical bytes exactly. (Environment reads: tests/common/test_kernel_envs.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from common import envs, moe
from common.moe import params as P

ROOT = Path(__file__).resolve().parents[2]
PRODUCTION = ("common", "mxfp4_serve", "mxfp4_train")


def _sources() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for pkg in PRODUCTION for p in sorted((ROOT / pkg).rglob("*.py"))}


def _defined_in(pattern: str) -> list[str]:
    return [f for f, text in _sources().items() if re.search(pattern, text, re.MULTILINE)]


@pytest.mark.parametrize("what,pattern,owner", [
    ("the clamp-SwiGLU alpha", r"1\.702", "common/moe/activations.py"),
    ("the clamp-SwiGLU limit", r"^\s*\w*LIMIT\w* = 7\.0", "common/moe/activations.py"),
    ("the MoE parameter names", r"[\"']w13_weight_scale[\"']", "common/moe/params.py"),
    ("the sync protocol id", r"^PROTOCOL = ", "common/moe/wire.py"),
    ("the sync error types", r"^class Sync\w*Error", "common/moe/wire.py"),
    ("the mxfp4_rl quant method name", r"^QUANT_METHOD = ", "common/moe/quant_config.py"),
])
def test_each_contract_item_has_one_definition(what, pattern, owner):
    assert _defined_in(pattern) == [owner], f"{what}: defined in {_defined_in(pattern)}, expected only {owner}"


def test_readme_lists_every_switch_from_the_declarations():
    readme = (ROOT / "README.md").read_text()
    assert envs.markdown_table() in readme, "README's 'Environment switches' table is stale: paste the output of " \
                                           "`python -m common.envs`"


def test_switches_parse_one_way(monkeypatch):
    monkeypatch.setenv(envs.HOPPER_ONE_MUL.name, "0")
    assert envs.HOPPER_ONE_MUL.get() is False
    monkeypatch.setenv(envs.HOPPER_ONE_MUL.name, "true")
    with pytest.raises(ValueError, match="MXFP4_RL_HOPPER_ONE_MUL must be 0 or 1, got 'true'"):
        envs.HOPPER_ONE_MUL.get()
    monkeypatch.setenv(envs.MOE_ACTIVATIONS.name, "fp4")
    with pytest.raises(ValueError, match=r"MXFP4_RL_MOE_ACTIVATIONS must be one of \('bf16', 'mxfp8'\), got 'fp4'"):
        envs.MOE_ACTIVATIONS.get()
    monkeypatch.delenv(envs.PROFILE.name, raising=False)
    assert envs.PROFILE.get() is None and envs.FAST_LAUNCH.get() is True


# ---- layouts as objects ----------------------------------------------------------------------------------------
def _layer(e=3, h=256, i=128, bias=True, seed=None) -> torch.nn.Module:
    """A canonical MoE layer at FlashInfer's alignment (hidden % 256, intermediate % 128) so every layout applies."""
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    layer = torch.nn.Module()
    for name, shape in P.param_shapes(e, h, i, with_bias=bias).items():
        if name in P.BIAS_PARAMS:
            t = torch.randn(shape, generator=g).to(torch.bfloat16)
        else:
            t = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        layer.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
    moe.register_layer(layer, "model.layers.7.mlp.experts", "flashinfer")
    return layer


@pytest.mark.parametrize("layout", [moe.CANONICAL, moe.KB_MAJOR, moe.FLASHINFER_TRTLLM], ids=lambda x: x.name)
def test_layouts_read_and_write_canonical_bytes_in_place(layout):
    layer = _layer()
    canonical = {n: p.data.clone() for n, p in layer.named_parameters()}
    ptrs = {n: p.data_ptr() for n, p in layer.named_parameters()}
    moe.convert_layer(layer, layout)
    assert moe.layout_of(layer) is layout
    for n, want in canonical.items():
        assert torch.equal(moe.read_canonical(layer, n), want), n
    # a refit writes new canonical bytes of experts 2 and 0 (in that order); the others keep theirs, storage stays
    experts = torch.tensor([2, 0])
    for n in (P.W13, P.W2_SCALE, P.W13_BIAS):
        new = _layer(seed=5).get_parameter(n).data[:2].clone()
        given = new.clone()
        moe.write_canonical(layer, n, experts, new)
        assert torch.equal(new, given), "the caller's values must not be modified"
        canonical[n][experts] = new
        for m, want in canonical.items():
            assert torch.equal(moe.read_canonical(layer, m), want), (n, m)
    assert ptrs == {n: p.data_ptr() for n, p in layer.named_parameters()}
    served = moe.served_expert_params(layer)
    assert set(served) == {f"model.layers.7.mlp.experts.{n}" for n in canonical}
    assert all(torch.equal(served[f"model.layers.7.mlp.experts.{n}"], v) for n, v in canonical.items())


def test_a_layer_is_never_converted_twice():
    layer = _layer(bias=False)
    moe.convert_layer(layer, moe.KB_MAJOR)
    with pytest.raises(RuntimeError, match=r"already holds the 'kb_major' layout; converting again would scramble"):
        moe.convert_layer(layer, moe.FLASHINFER_TRTLLM)


def test_kb_major_layout_stores_the_kernels_bytes():
    from common.grouped_gemm.layout import to_kb_major

    layer = _layer(bias=False)
    codes = layer.w13_weight.data.clone()
    moe.convert_layer(layer, moe.KB_MAJOR)
    assert torch.equal(layer.w13_weight.data.view(-1), to_kb_major(codes).view(-1))


def test_activation_spec_and_gate_up_order():
    x = torch.randn(4, 2 * 8, dtype=torch.float32) * 6
    gate, up = moe.activations.split_gate_up(x, "interleaved")
    assert torch.equal(gate, x[:, 0::2]) and torch.equal(up, x[:, 1::2])
    spec = moe.ActivationSpec("swigluoai")
    assert spec.kernel_name == "swiglu_oai" and spec.fused_in_kernels
    assert not moe.ActivationSpec("swigluoai", limit=10.0).fused_in_kernels
    # the engine's reference activation equals the learner's (transformers' op order) bit for bit
    from mxfp4_train.grouped import Activation

    assert torch.equal(spec(*x.chunk(2, dim=-1)), Activation("clamp_swiglu")(
        torch.stack(x.chunk(2, dim=-1), dim=-1).flatten(-2)))
    with pytest.raises(ValueError, match=r"unknown gate_up layout 'stacked'; choose one of \('halves', 'interleaved'\)"):
        moe.GateUpOrder.of("stacked")


def test_a_retired_switch_still_set_is_reported(monkeypatch, caplog):
    monkeypatch.setattr(envs, "_warned_retired", False)
    monkeypatch.setenv("MXFP4_GG_DOT_SCALED", "only")
    with caplog.at_level("WARNING", logger="common.envs"):
        envs.FAST_LAUNCH.get()
        envs.FAST_LAUNCH.get()
    msgs = [r.getMessage() for r in caplog.records if "MXFP4_GG_DOT_SCALED" in r.getMessage()]
    assert msgs == ["MXFP4_GG_DOT_SCALED is set but no longer read: tl.dot_scaled was removed (1.2-1.6x slower on "
                    "Hopper, bench/RESULTS.md)"]

"""The grouped-MLP seam: backend selection (with rejecting backends), input checks, activation definitions."""

from __future__ import annotations

import argparse

import pytest
import torch

from mxfp4_train import grouped
from mxfp4_train.grouped import Activation, grouped_mlp, register_backend, select_backend

from .helpers import packed_experts, routing


@pytest.fixture
def restore_registry():
    saved = dict(grouped._BACKENDS), list(grouped._PRIORITY)
    yield
    grouped._BACKENDS.clear()
    grouped._BACKENDS.update(saved[0])
    grouped._PRIORITY[:] = saved[1]


def _ops_and_inputs():
    mod = packed_experts(4, 64, 32)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=gen)
    ids, w = routing(8, 4, 2, gen)
    w13, w2 = mod._weights()
    ops = grouped.ExpertOperands(w13=w13, w2=w2, activation=mod.activation, num_experts=4,
                                 lora13=mod.lora_gate_up, lora2=mod.lora_down)
    return mod, ops, x, ids, w


def test_auto_skips_rejecting_backends_and_explicit_choice_explains(restore_registry):
    mod, ops, x, ids, w = _ops_and_inputs()
    register_backend("never", lambda *a: None, lambda x, ops: (False, "needs a CUDA device"))
    assert grouped.backend_names()[0] == "never"
    assert select_backend(x, ops) == "reference"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        select_backend(x, ops, "never")
    with pytest.raises(ValueError, match="unknown grouped-MLP backend 'nope'; registered: never, triton, reference"):
        select_backend(x, ops, "nope")


def test_preferred_backend_runs_and_all_rejections_are_listed(restore_registry):
    mod, ops, x, ids, w = _ops_and_inputs()
    calls = []

    def spy(x, ids, w, ops):
        calls.append(x.shape)
        return grouped.reference_grouped_mlp(x, ids, w, ops)

    register_backend("spy", spy, lambda x, ops: (True, "ok"))
    assert torch.equal(grouped_mlp(x, ids, w, ops), grouped.reference_grouped_mlp(x, ids, w, ops))
    assert calls == [x.shape]
    grouped._BACKENDS["spy"] = (spy, lambda x, ops: (False, "busy"))
    grouped._BACKENDS["reference"] = (grouped.reference_grouped_mlp, lambda x, ops: (False, "disabled"))
    with pytest.raises(ValueError, match="spy: busy; triton: needs CUDA tensors; reference: disabled"):
        select_backend(x, ops)


def test_bad_shapes_are_named():
    mod, ops, x, ids, w = _ops_and_inputs()
    with pytest.raises(ValueError, match=r"got x \(8, 64\), topk_ids \(8, 2\), topk_weights \(8, 3\)"):
        grouped_mlp(x, ids, torch.ones(8, 3), ops)


def test_activation_definitions():
    gu = torch.tensor([[1.0, 2.0, 9.0, -9.0]])
    glu = Activation("glu", act_fn=torch.nn.functional.silu)(gu)
    assert torch.allclose(glu, torch.nn.functional.silu(gu[:, :2]) * gu[:, 2:])
    # clamp_swiglu on interleaved rows: gate = cols 0, 2 -> (1, 9 clamped to 7); up = cols 1, 3 -> (2, -9 -> -7)
    sw = Activation("clamp_swiglu", alpha=1.702, limit=7.0)(gu)
    g, u = torch.tensor([1.0, 7.0]), torch.tensor([2.0, -7.0])
    assert torch.allclose(sw[0], (u + 1) * g * torch.sigmoid(1.702 * g))
    with pytest.raises(ValueError, match="unknown activation kind"):
        Activation("gelu")
    with pytest.raises(ValueError, match="needs act_fn"):
        Activation("glu")


def test_module_argument_checks():
    from mxfp4_train.experts import MXFP4Experts

    act = Activation("glu", act_fn=torch.nn.functional.silu)
    with pytest.raises(ValueError, match="intermediate_size=48 is not a multiple of 32"):
        MXFP4Experts(mode="lora", profile="flashinfer", activation=act, num_experts=2, hidden_size=64,
                     intermediate_size=48)
    with pytest.raises(ValueError, match="mode must be one of"):
        MXFP4Experts(mode="int4", profile="flashinfer", activation=act, num_experts=2, hidden_size=64,
                     intermediate_size=32)
    mod = packed_experts(4, 64, 32, lora_r=0)
    import common

    other = common.quantize(torch.randn(4, 64, 64).bfloat16(), profile="ocp")
    with pytest.raises(ValueError, match="profile 'ocp' but this model uses 'flashinfer'"):
        mod.load_packed(other, other)


def test_demo_registers_its_cli_subcommand():
    from mxfp4_train.demo import register

    parser = argparse.ArgumentParser(prog="mxfp4-rl")
    register(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["demo", "--prompts", "4", "--max-tokens", "8"])
    assert args.prompts == 4 and args.max_tokens == 8 and args.profile == "flashinfer" and callable(args.func)

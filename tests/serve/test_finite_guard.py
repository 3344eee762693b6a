"""Issue 26: a MoE layer that computes NaN/Inf stops the engine with an error naming the layer (mxfp4_serve/
finite_guard.py), instead of handing NaN log-probs to clients. Here on the CPU reference backend with real packed
experts, eagerly and under torch.compile(fullgraph=True); tests/e2e/test_engine_nonfinite.py runs a real server."""

from __future__ import annotations

import pytest
import torch

from common import quantize
from mxfp4_serve.backends import ActivationSpec, CPUReferenceBackend
from mxfp4_serve.finite_guard import NonFiniteOutputError, checked, enabled_for

T, H, I, E, TOPK = 5, 64, 32, 4, 2
NAME = "model.layers.1.mlp.experts"


def _layer(down_shift: int):
    """Packed experts; `down_shift` raises every down_proj scale byte (x 2^shift, still a valid finite byte)."""
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Module()
    w13 = quantize(torch.randn(E, 2 * I, H, generator=g) * 0.1, profile="flashinfer")
    w2 = quantize(torch.randn(E, H, I, generator=g) * 0.1, profile="flashinfer")
    for name, t in (("w13_weight", w13.codes), ("w13_weight_scale", w13.scales), ("w2_weight", w2.codes),
                    ("w2_weight_scale", w2.scales + down_shift)):
        layer.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
    assert int(layer.w2_weight_scale.max()) < 0xFD  # no byte the loaders refuse: the overflow is the dtype's
    return layer


def _inputs(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, H, generator=g).to(dtype)
    w = torch.softmax(torch.randn(T, TOPK, generator=g), -1)
    ids = torch.stack([torch.randperm(E, generator=g)[:TOPK] for _ in range(T)])
    return x, w, ids


def _moe(layer, x, w, ids):
    out = CPUReferenceBackend().apply(layer, x, w, ids, ActivationSpec("silu"), None)
    return checked(out, x, NAME, "cpu_reference")


def test_finite_output_is_returned_untouched():
    layer = _layer(0)
    x, w, ids = _inputs(torch.float16)
    want = CPUReferenceBackend().apply(layer, x, w, ids, ActivationSpec("silu"), None)
    got = _moe(layer, x, w, ids)
    assert torch.equal(got, want) and torch.isfinite(got).all()


def test_overflow_of_the_engine_dtype_names_layer_backend_and_cause():
    """Valid experts x 2^24 served in float16: the fp32 result exceeds 65504 and the cast gives Inf."""
    layer = _layer(24)
    x, w, ids = _inputs(torch.float16)
    assert torch.isfinite(_moe(layer, x.float(), w, ids)).all()  # fp32 holds it: only float16 cannot
    with pytest.raises(NonFiniteOutputError, match=rf"MoE layer '{NAME}' \(backend cpu_reference\) computed a "
                                                   r"non-finite output: \d+ of 320 values \(0 NaN, \d+ \+Inf, \d+ "
                                                   r"-Inf\) in 5 of 5 token row\(s\), first row 0; its input was "
                                                   r"finite, so the expert weights or the backend overflowed "
                                                   r"torch\.float16 \(largest finite value 65504\)"):
        _moe(layer, x, w, ids)


def test_non_finite_input_is_reported_as_upstream():
    layer = _layer(0)
    x, w, ids = _inputs(torch.float32)
    x[2, 7] = float("nan")
    with pytest.raises(NonFiniteOutputError, match=r"first row 2; its input already held 1 non-finite value\(s\): "
                                                   r"the cause is upstream of this layer"):
        _moe(layer, x, w, ids)


def test_the_error_is_not_a_value_error():
    # vLLM's server answers 400 (the client's fault) for a ValueError; this one must end in a 5xx
    assert not issubclass(NonFiniteOutputError, ValueError) and issubclass(NonFiniteOutputError, RuntimeError)


def test_switch_off_serves_what_the_backend_computed(monkeypatch):
    monkeypatch.setenv("MXFP4_RL_FINITE_GUARD", "0")
    layer = _layer(24)
    x, w, ids = _inputs(torch.float16)
    assert torch.isinf(_moe(layer, x, w, ids)).any()
    monkeypatch.setenv("MXFP4_RL_FINITE_GUARD", "yes")
    with pytest.raises(ValueError, match=r"MXFP4_RL_FINITE_GUARD must be one of \('auto', '0', '1'\), got 'yes'"):
        _moe(layer, x, w, ids)


def test_cuda_outputs_are_checked_only_when_asked(monkeypatch):
    """auto: no host sync on GPUs; 1: eager CUDA layers (never while a CUDA graph is captured, see the module)."""
    assert enabled_for(torch.zeros(1))
    if not torch.cuda.is_available():
        return
    out = torch.full((2, 4), float("inf"), device="cuda")
    assert not enabled_for(out)
    monkeypatch.setenv("MXFP4_RL_FINITE_GUARD", "1")
    assert enabled_for(out)
    with pytest.raises(NonFiniteOutputError):
        checked(out, out, NAME, "hopper_triton")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = checked(out * 2, out, NAME, "hopper_triton")  # no sync, no raise while capturing
    graph.replay()
    assert torch.isinf(captured).all()


def test_guard_runs_inside_torch_compile_fullgraph():
    """vLLM traces the CPU MoE forward unless --enforce-eager: the check must neither break the graph nor vanish."""
    layer = _layer(24)
    x, w, ids = _inputs(torch.float16)
    fn = torch.compile(lambda a, b, c: _moe(layer, a, b, c), fullgraph=True, backend="eager")
    with pytest.raises(NonFiniteOutputError, match=rf"MoE layer '{NAME}'"):
        fn(x, w, ids)
    ok = _layer(0)
    fn_ok = torch.compile(lambda a, b, c: _moe(ok, a, b, c), fullgraph=True, backend="eager")
    assert torch.equal(fn_ok(x, w, ids), CPUReferenceBackend().apply(ok, x, w, ids, ActivationSpec("silu"), None))

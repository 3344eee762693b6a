"""The SM100 FlashInfer backend on CPU: oracle choice and refusals, in-place weight preparation (whole layer and
refit-style per expert), and the pieces of `apply` that do not need a B200 (activation quantization, SwiGLU
parameters, expert-range resolution). The kernel itself was not run: no SM100 GPU is lent (docs/backends.md)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from common import ShapeError, dequantize_mxfp8, fake_quant_mxfp8, quantize_mxfp8
from common.layouts import flashinfer_trtllm as L
from mxfp4_serve.backends import (ActivationSpec, BackendUnavailableError, CPUReferenceBackend, DeviceInfo,
                                  select_backend)
from mxfp4_serve.backends import sm100_flashinfer as sm100
from mxfp4_serve.backends.sm100_flashinfer import SM100FlashInferBackend

B200 = DeviceInfo("cuda", (10, 0))
CANDIDATES = (SM100FlashInferBackend, CPUReferenceBackend)


@pytest.fixture
def no_flashinfer(monkeypatch):
    """sys.modules[name] = None makes `import name` raise ImportError: FlashInfer absent even if installed."""
    monkeypatch.setitem(sys.modules, "flashinfer", None)
    monkeypatch.setitem(sys.modules, "flashinfer.fused_moe", None)


def test_oracle_picks_flashinfer_on_simulated_sm100(monkeypatch):
    # The one place with a stand-in: FlashInfer cannot be installed next to the CPU torch of CI, and the oracle only
    # asks whether its entry point is importable. A real module object (not a mock) that has that entry point is
    # exactly what `supports` inspects; nothing calls it here.
    fake = types.ModuleType("flashinfer")
    fake_moe = types.ModuleType("flashinfer.fused_moe")
    fake_moe.trtllm_fp4_block_scale_routed_moe = lambda **kw: None
    fake.fused_moe = fake_moe
    monkeypatch.setitem(sys.modules, "flashinfer", fake)
    monkeypatch.setitem(sys.modules, "flashinfer.fused_moe", fake_moe)
    assert isinstance(select_backend(B200, candidates=CANDIDATES), SM100FlashInferBackend)
    b300 = DeviceInfo("cuda", (10, 3))
    assert isinstance(select_backend(b300, "sm100_flashinfer", CANDIDATES), SM100FlashInferBackend)
    # Hopper and Blackwell consumer parts are refused even with FlashInfer present: the cubins are SM100-only.
    for dev in (DeviceInfo("cuda", (9, 0)), DeviceInfo("cuda", (12, 0))):
        assert isinstance(select_backend(dev, candidates=CANDIDATES), CPUReferenceBackend)
    del fake_moe.trtllm_fp4_block_scale_routed_moe
    ok, reason = SM100FlashInferBackend.supports(B200)
    assert not ok and "no fused_moe.trtllm_fp4_block_scale_routed_moe" in reason


def test_refuses_clearly_without_flashinfer(no_flashinfer):
    ok, reason = SM100FlashInferBackend.supports(B200)
    assert not ok and "flashinfer is not importable" in reason and "flashinfer-python" in reason
    with pytest.raises(BackendUnavailableError, match=r"'sm100_flashinfer' was requested but cannot run on cuda sm100: "
                                                      r"flashinfer is not importable"):
        select_backend(B200, "sm100_flashinfer", CANDIDATES)
    assert isinstance(select_backend(B200, candidates=CANDIDATES), CPUReferenceBackend)
    for dev, text in ((DeviceInfo("cpu"), "needs a CUDA device of capability 10.x"),
                      (DeviceInfo("cuda", (9, 0)), "capability 10.x only, got cuda sm90")):
        ok, reason = SM100FlashInferBackend.supports(dev)
        assert not ok and text in reason


def test_unknown_activation_mode():
    with pytest.raises(ValueError, match=r"unknown activation mode 'fp4'; expected one of \('bf16', 'mxfp8'\)"):
        SM100FlashInferBackend("fp4")


# ---------------------------------------------------------------- weights


def _layer(e: int = 3, i: int = 128, h: int = 256, bias: bool = True, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Module()
    shapes = {"w13_weight": (e, 2 * i, h // 2), "w13_weight_scale": (e, 2 * i, h // 32),
              "w2_weight": (e, h, i // 2), "w2_weight_scale": (e, h, i // 32)}
    for n, s in shapes.items():
        layer.register_parameter(n, torch.nn.Parameter(torch.randint(0, 255, s, generator=g, dtype=torch.uint8),
                                                       requires_grad=False))
    if bias:
        layer.w13_bias = torch.nn.Parameter(torch.randn(e, 2 * i, generator=g).bfloat16(), requires_grad=False)
        layer.w2_bias = torch.nn.Parameter(torch.randn(e, h, generator=g).bfloat16(), requires_grad=False)
    return layer


def _snapshot(layer) -> dict[str, torch.Tensor]:
    return {n: p.data.clone() for n, p in layer.named_parameters()}


def test_prepare_converts_in_place_keeping_storage():
    layer = _layer()
    before = _snapshot(layer)
    ptrs = {n: p.data_ptr() for n, p in layer.named_parameters()}
    SM100FlashInferBackend().prepare(layer)
    want = L.convert_experts(before)
    for n, p in layer.named_parameters():
        assert p.data_ptr() == ptrs[n] and p.shape == before[n].shape and p.dtype == before[n].dtype, n
        assert torch.equal(p.data, want[n]), n
    back = L.revert_experts(_snapshot(layer))
    assert all(torch.equal(back[n], before[n]) for n in before)


def test_prepare_experts_touches_only_the_given_experts():
    """Refit path: canonical bytes rewritten for expert 2 of an already prepared layer; only it is converted."""
    layer = _layer(e=4)
    backend = SM100FlashInferBackend()
    backend.prepare(layer)
    prepared = _snapshot(layer)
    fresh = _layer(e=4, seed=1)
    for n, p in layer.named_parameters():
        p.data[2] = getattr(fresh, n).data[2]
    backend.prepare_experts(layer, [2])
    want = L.convert_experts({n: getattr(fresh, n).data for n in prepared})
    for n, p in layer.named_parameters():
        assert torch.equal(p.data[2], want[n][2]), n
        assert torch.equal(p.data[[0, 1, 3]], prepared[n][[0, 1, 3]]), n


def test_prepare_refuses_unaligned_dims_with_padding_hint():
    with pytest.raises(ShapeError, match="hidden=128, intermediate=64.*padded to hidden=256, intermediate=128"):
        SM100FlashInferBackend().prepare(_layer(e=2, i=64, h=128, bias=False))


# ---------------------------------------------------------------- pieces of apply


def test_mxfp8_activations_come_from_our_codec_and_match_the_learner():
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(5, 256, generator=g) * 3).bfloat16()
    x[0, :32] = 0.0  # an all-zero block
    x[1, 32:64] *= 2.0**-100  # a tiny block
    elems, scales = sm100.quantize_activations(x, "mxfp8", "flashinfer")
    want_e, want_s = quantize_mxfp8(x, profile="flashinfer")
    assert elems.dtype == torch.float8_e4m3fn and scales.dtype == torch.float8_e4m3fn and scales.shape == (5, 8)
    assert torch.equal(elems.view(torch.uint8), want_e.view(torch.uint8))
    assert torch.equal(scales.view(torch.uint8), want_s)
    # what the experts compute with == what the learner's fake quant gives (W4A8 parity)
    assert torch.equal(dequantize_mxfp8(elems, scales.view(torch.uint8), torch.bfloat16),
                       fake_quant_mxfp8(x, profile="flashinfer"))
    bf, none = sm100.quantize_activations(x.float(), "bf16", None)
    assert bf.dtype == torch.bfloat16 and none is None and torch.equal(bf, x)
    with pytest.raises(ValueError, match="MXFP8 activations need the model's codec profile"):
        sm100.quantize_activations(x, "mxfp8", None)


def test_swiglu_parameters():
    assert sm100.activation_params(ActivationSpec("silu"), 4, torch.device("cpu")) == \
        {"gemm1_alpha": None, "gemm1_beta": None, "gemm1_clamp_limit": None}
    p = sm100.activation_params(ActivationSpec("swigluoai"), 4, torch.device("cpu"))
    assert p["gemm1_alpha"].tolist() == [pytest.approx(1.702)] * 4 and p["gemm1_beta"].tolist() == [1.0] * 4
    assert p["gemm1_clamp_limit"].tolist() == [7.0] * 4 and p["gemm1_alpha"].dtype == torch.float32
    # DeepSeek-V4: silu(min(gate, L)) * clamp(up, -L, L) = the kernel's gate*sigmoid(alpha*gate)*(up+beta), alpha 1,
    # beta 0, with the model's limit
    p = sm100.activation_params(ActivationSpec("silu_clamp", limit=10.0), 4, torch.device("cpu"))
    assert [p[k].tolist() for k in ("gemm1_alpha", "gemm1_beta", "gemm1_clamp_limit")] == [[1.0] * 4, [0.0] * 4,
                                                                                         [10.0] * 4]


def test_local_expert_range():
    assert sm100.local_expert_range(None, 8) == (8, 0)
    m = torch.full((16,), -1)
    m[4:8] = torch.arange(4)
    assert sm100.local_expert_range(m, 4) == (16, 4)
    rr = torch.full((16,), -1)
    rr[0::4] = torch.arange(4)  # round-robin placement
    with pytest.raises(ValueError, match="one contiguous, ordered block"):
        sm100.local_expert_range(rr, 4)
    with pytest.raises(ValueError, match="gives this rank 4 experts but the layer holds 3"):
        sm100.local_expert_range(m, 3)


def test_apply_without_flashinfer_raises_import_error(no_flashinfer):
    layer = _layer(e=1, bias=False)
    with pytest.raises(ImportError):
        SM100FlashInferBackend().apply(layer, torch.zeros(1, 256), torch.ones(1, 1),
                                       torch.zeros(1, 1, dtype=torch.long), ActivationSpec(), None)


def test_refit_writes_touched_experts_in_kernel_layout_and_reads_back_canonical():
    # The sync path (mxfp4_serve.sync.layers) writes canonical bytes per expert through write_experts and hashes
    # read_canonical; after every call the layer must equal convert_experts(canonical) for ALL experts.
    from common.layouts import flashinfer_trtllm as fl
    from mxfp4_serve.backends.sm100_flashinfer import SM100FlashInferBackend

    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    e, h, i = 3, 256, 128  # the kernel's alignment (hidden % 256, intermediate % 128)
    shapes = {"w13_weight": (e, 2 * i, h // 2), "w13_weight_scale": (e, 2 * i, h // 32),
              "w2_weight": (e, h, i // 2), "w2_weight_scale": (e, h, i // 32)}
    canonical = {n: torch.randint(0, 256, s, generator=gen, dtype=torch.uint8) for n, s in shapes.items()}
    layer = torch.nn.Module()
    for n, t in canonical.items():
        layer.register_parameter(n, torch.nn.Parameter(t.clone(), requires_grad=False))
    backend = SM100FlashInferBackend()
    backend.prepare(layer)
    storage = {n: getattr(layer, n).data_ptr() for n in shapes}
    for n in shapes:
        assert torch.equal(backend.read_canonical(layer, n), canonical[n])
    experts = torch.tensor([2, 0])
    for n in ("w13_weight", "w13_weight_scale", "w2_weight"):
        new = torch.randint(0, 256, (2, *shapes[n][1:]), generator=gen, dtype=torch.uint8)
        backend.write_experts(layer, n, experts, new)
        canonical[n][experts] = new
        want = fl.convert_experts(canonical)
        for m in shapes:
            assert torch.equal(getattr(layer, m).data, want[m].reshape(shapes[m])), (n, m)
            assert torch.equal(backend.read_canonical(layer, m), canonical[m])
    assert storage == {n: getattr(layer, n).data_ptr() for n in shapes}  # in place: CUDA graphs stay valid


def test_settings_refuse_an_unknown_activation_format_and_backends_name_their_w4a8():
    from mxfp4_serve.backends import CPUReferenceBackend
    from mxfp4_serve.backends.hopper_triton import HopperTritonBackend
    from mxfp4_serve.settings import ServeSettings

    with pytest.raises(ValueError, match="unknown expert activation format 'fp8'"):
        ServeSettings(profile="flashinfer", activations="fp8")
    # real W4A8 where the MMAs read MXFP8, an emulation (named so) where only the inputs are rounded
    assert sm100.SM100FlashInferBackend.activation_names["mxfp8"] == "W4A8"
    for backend in (CPUReferenceBackend, HopperTritonBackend):
        assert backend.activation_modes == ("bf16", "mxfp8")
        assert backend.activation_names["mxfp8"].startswith("W4A8 emulation")


def test_w4a8_emulation_without_a_profile_is_refused_naming_the_backend():
    from mxfp4_serve.backends.base import act_quant_profile
    from mxfp4_serve.backends.hopper_triton import HopperTritonBackend

    backend = HopperTritonBackend()
    layer = torch.nn.Module()
    assert act_quant_profile(backend, layer) is None  # bf16: nothing to round
    backend.activations = "mxfp8"
    with pytest.raises(ValueError, match="hopper_triton: MXFP8 expert activations need the model's codec profile"):
        act_quant_profile(backend, layer)
    layer.mxfp4_rl_profile = "flashinfer"
    assert act_quant_profile(backend, layer) == "flashinfer"


def test_moe_method_refuses_activations_its_backend_cannot_run(monkeypatch):
    # W4A8 requested of a backend that runs bf16 only: refused at engine start, naming both. Every backend runs
    # "mxfp8" now (sm100_flashinfer for real, the others as an emulation, named so), so one is narrowed here.
    from mxfp4_serve.backends.cpu_reference import CPUReferenceBackend
    from mxfp4_serve.moe_method import MXFP4MoEMethodMixin
    from mxfp4_serve.settings import ServeSettings

    class _Base:
        def __init__(self, moe_config):
            pass

    method_cls = type("M", (MXFP4MoEMethodMixin, _Base), {})
    cpu = types.SimpleNamespace(device="cpu")
    w4a8 = method_cls(cpu, ServeSettings(profile="flashinfer", activations="mxfp8"))
    assert (w4a8.backend.name, w4a8.backend.activations, w4a8.backend.profile) == ("cpu_reference", "mxfp8",
                                                                                  "flashinfer")
    assert w4a8.activation_name.startswith("W4A8 emulation")
    assert method_cls(cpu, ServeSettings(profile="flashinfer")).backend.activations == "bf16"
    monkeypatch.setattr(CPUReferenceBackend, "activation_modes", ("bf16",))
    with pytest.raises(ValueError, match=r"activations 'mxfp8'.*'cpu_reference' runs only \('bf16',\)"):
        method_cls(cpu, ServeSettings(profile="flashinfer", activations="mxfp8"))

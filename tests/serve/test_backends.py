"""MoE backends: the oracle's choice and errors, and the CPU reference's numerics against independent references
(float64 math on the codec's dequantized weights; transformers' own Qwen3-MoE and gpt-oss expert modules)."""

from __future__ import annotations

import pytest
import torch

from common import dequantize, quantize
from mxfp4_serve.backends import ActivationSpec, BackendUnavailableError, CPUReferenceBackend, DeviceInfo, MoEBackend
from mxfp4_serve.backends import select_backend

T, H, I, E, TOPK = 37, 128, 64, 8, 2
PROFILE = "flashinfer"


# ---- oracle ----------------------------------------------------------------------------------------------------------
class _AlwaysRejects(MoEBackend):
    name = "always_rejects"

    @classmethod
    def supports(cls, device):
        return False, "rejects everything (test backend)"

    def apply(self, *a, **k):
        raise AssertionError("never selected")


def test_cpu_picks_reference_and_logs_why_others_were_skipped():
    assert isinstance(select_backend(DeviceInfo("cpu")), CPUReferenceBackend)


def test_hopper_picks_triton_and_older_gpus_fall_back_to_the_reference():
    from mxfp4_serve.backends.hopper_triton import HopperTritonBackend

    assert isinstance(select_backend(DeviceInfo("cuda", (9, 0))), HopperTritonBackend)
    assert isinstance(select_backend(DeviceInfo("cuda", (8, 0))), CPUReferenceBackend)
    with pytest.raises(BackendUnavailableError, match=r"'hopper_triton' was requested but cannot run on cuda sm80"):
        select_backend(DeviceInfo("cuda", (8, 0)), override="hopper_triton")


def test_expert_lora_skips_a_backend_that_cannot_apply_it_unless_requested():
    """On a B200 (FlashInfer importable) a checkpoint with expert adapters served unmerged gets the Triton kernels,
    with the reason logged; without adapters FlashInfer's kernel; asked for by name, FlashInfer is kept (the MoE
    method then refuses it with its reason)."""
    from mxfp4_serve.backends.hopper_triton import HopperTritonBackend
    from mxfp4_serve.backends.sm100_flashinfer import SM100FlashInferBackend

    class _B200Ready(SM100FlashInferBackend):  # supports() as on a B200 with FlashInfer installed
        @classmethod
        def supports(cls, device):
            return True, ""

    b200 = DeviceInfo("cuda", (10, 0))
    order = (_B200Ready, HopperTritonBackend, CPUReferenceBackend)
    assert type(select_backend(b200, candidates=order)) is _B200Ready
    assert type(select_backend(b200, candidates=order, needs_lora=True)) is HopperTritonBackend
    assert type(select_backend(b200, "sm100_flashinfer", candidates=order, needs_lora=True)) is _B200Ready
    with pytest.raises(BackendUnavailableError, match=r"sm100_flashinfer: does not serve expert LoRA \(FlashInfer's "
                                                      r"TRT-LLM MoE computes both expert GEMMs"):
        select_backend(b200, candidates=order[:1], needs_lora=True)


def test_unknown_override_lists_available():
    with pytest.raises(BackendUnavailableError, match=r"unknown MXFP4 MoE backend 'marlin'; available: "
                                                      r"sm100_flashinfer, hopper_triton, cpu_reference"):
        select_backend(DeviceInfo("cpu"), override="marlin")


def test_no_candidate_lists_every_rejection():
    from mxfp4_serve.backends.hopper_triton import HopperTritonBackend

    with pytest.raises(BackendUnavailableError, match=r"no MXFP4 MoE backend can run on cpu: always_rejects: rejects "
                                                      r"everything \(test backend\); hopper_triton: needs a CUDA"):
        select_backend(DeviceInfo("cpu"), candidates=(_AlwaysRejects, HopperTritonBackend))


def test_env_override_reaches_settings(monkeypatch):
    from mxfp4_serve.settings import settings_from_quant_config

    monkeypatch.setenv("MXFP4_RL_MOE_BACKEND", "hopper_triton")
    s = settings_from_quant_config({"quant_method": "mxfp4_rl", "profile": PROFILE})
    with pytest.raises(BackendUnavailableError, match="cannot run on cpu"):
        select_backend(DeviceInfo("cpu"), s.backend)


# ---- CPU reference numerics -----------------------------------------------------------------------------------------
def _layer(with_bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Module()
    w13 = quantize(torch.randn(E, 2 * I, H, generator=g) * 0.1, profile=PROFILE)
    w2 = quantize(torch.randn(E, H, I, generator=g) * 0.1, profile=PROFILE)
    for name, t in (("w13_weight", w13.codes), ("w13_weight_scale", w13.scales), ("w2_weight", w2.codes),
                    ("w2_weight_scale", w2.scales)):
        layer.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
    if with_bias:
        layer.w13_bias = torch.nn.Parameter(torch.randn(E, 2 * I, generator=g) * 0.1, requires_grad=False)
        layer.w2_bias = torch.nn.Parameter(torch.randn(E, H, generator=g) * 0.1, requires_grad=False)
    return layer, dequantize(w13, torch.float64), dequantize(w2, torch.float64)


def _routing(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    x[0] = 0.0  # a zero token
    x[1] *= 100.0  # a large one: drives gpt-oss's clamp
    logits = torch.randn(T, E, generator=g)
    w, ids = torch.softmax(logits, -1).topk(TOPK, dim=-1)
    return x, w / w.sum(-1, keepdim=True), ids


def _float64_moe(x, w, ids, w13, w2, act: ActivationSpec, b13=None, b2=None):
    out = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for j in range(TOPK):
            e = int(ids[t, j])
            h = w13[e] @ x[t].double() + (0 if b13 is None else b13[e].double())
            gate, up = h[:I], h[I:]
            if act.name == "silu":
                a = torch.nn.functional.silu(gate) * up
            else:
                gate, up = gate.clamp(max=act.limit), up.clamp(-act.limit, act.limit)
                a = gate * torch.sigmoid(act.alpha * gate) * (up + 1)
            out[t] += w[t, j].double() * (w2[e] @ a + (0 if b2 is None else b2[e].double()))
    return out


@pytest.mark.parametrize("act", ["silu", "swigluoai"])
def test_reference_matches_float64(act):
    spec = ActivationSpec(act)
    layer, w13, w2 = _layer(with_bias=act == "swigluoai")
    x, w, ids = _routing()
    got = CPUReferenceBackend().apply(layer, x, w, ids, spec, None)
    ref = _float64_moe(x, w, ids, w13, w2, spec, getattr(layer, "w13_bias", None), getattr(layer, "w2_bias", None))
    # fp32 dot products of length <= 128 with |terms| ~ 1e-2..1: error <= K * 2^-24 * sum|terms| ~ 1e-5 relative
    # to the largest output; 1e-4 of max|ref| leaves 10x headroom and is still 100x below one MXFP4 code step.
    assert (got.double() - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_reference_expert_map_keeps_only_local_experts():
    layer, w13, w2 = _layer(with_bias=False)
    x, w, ids = _routing()
    # EP rank 1 of 2 holds global experts 4..7 as local 0..3: feed it the upper half of the layer's experts
    half = torch.nn.Module()
    for name, p in layer.named_parameters():
        half.register_parameter(name, torch.nn.Parameter(p[E // 2:].clone(), requires_grad=False))
    emap = torch.tensor([-1] * (E // 2) + list(range(E // 2)))
    spec = ActivationSpec("silu")
    got = CPUReferenceBackend().apply(half, x, w, ids, spec, emap)
    keep = ids >= E // 2
    ref = _float64_moe(x, w * keep, ids, w13, w2, spec)
    assert (got.double() - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_reference_matches_transformers_expert_modules():
    """Same weights in transformers' Qwen3MoeExperts / GptOssExperts (their layouts: stacked / input-major and
    interleaved), fp32 both sides: only summation order differs (bound as above)."""
    from transformers import GptOssConfig, Qwen3MoeConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    x, w, ids = _routing()
    layer, w13, w2 = _layer(with_bias=False)
    qwen = Qwen3MoeExperts(Qwen3MoeConfig(num_experts=E, hidden_size=H, moe_intermediate_size=I))
    qwen.gate_up_proj.data, qwen.down_proj.data = w13.float(), w2.float()
    got = CPUReferenceBackend().apply(layer, x, w, ids, ActivationSpec("silu"), None)
    ref = qwen(x, ids, w)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()

    layer, w13, w2 = _layer(with_bias=True, seed=2)
    oss = GptOssExperts(GptOssConfig(num_local_experts=E, hidden_size=H, intermediate_size=I))
    inter = torch.stack((w13[:, :I], w13[:, I:]), dim=2).flatten(1, 2)  # rows g0, u0, g1, u1, ...
    b = layer.w13_bias.data
    oss.gate_up_proj.data = inter.transpose(1, 2).float().contiguous()
    oss.gate_up_proj_bias.data = torch.stack((b[:, :I], b[:, I:]), dim=2).flatten(1, 2)
    oss.down_proj.data = w2.transpose(1, 2).float().contiguous()
    oss.down_proj_bias.data = layer.w2_bias.data
    got = CPUReferenceBackend().apply(layer, x, w, ids, ActivationSpec("swigluoai"), None)
    ref = oss(x, ids, w)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_output_dtype_and_empty_batch():
    layer, _, _ = _layer(with_bias=False)
    x, w, ids = _routing()
    assert CPUReferenceBackend().apply(layer, x.half(), w, ids, ActivationSpec(), None).dtype == torch.float16
    empty = CPUReferenceBackend().apply(layer, x[:0], w[:0], ids[:0], ActivationSpec(), None)
    assert empty.shape == (0, H)


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match=r"unsupported MoE activation 'gelu'"):
        ActivationSpec("gelu")


def test_reference_runs_inside_torch_compile_fullgraph():
    # vLLM compiles the model unless --enforce-eager; the per-expert loop is data dependent, so the backend is a
    # torch custom op that dynamo must keep opaque (fullgraph=True fails on any graph break).
    layer, _, _ = _layer(with_bias=False)
    x, w, ids = _routing()
    backend, spec = CPUReferenceBackend(), ActivationSpec("silu")
    eager = backend.apply(layer, x, w, ids, spec, None)
    compiled = torch.compile(lambda a, b, c: backend.apply(layer, a, b, c, spec, None), fullgraph=True, backend="eager")
    assert torch.equal(compiled(x, w, ids), eager)


def _hopper_case(act: str):
    """(device, activation spec, layer, bf16 tokens, router weights, expert ids) on the device the kernels run on
    (natively on a GPU, the interpreter on CPU); gpt-oss's swigluoai with biases."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layer, _, _ = _layer(with_bias=act == "swigluoai")
    x, w, ids = (t.to(device) for t in _routing())
    return device, ActivationSpec(act), layer.to(device), x.to(torch.bfloat16), w, ids


@pytest.mark.parametrize("act", ["silu", "swigluoai"])
@pytest.mark.parametrize("ep", [False, True])
def test_hopper_triton_computes_the_reference_function(act, ep):
    # Runs the real Triton kernels (interpreter on CPU, natively on a GPU). The kernels take bf16 activations and
    # store the activation and output in bf16: three roundings of relative size 2^-8 (the interpreter truncates
    # instead of rounding), so the output's relative error is a few 2^-8 ~ 1e-2 in norm; 2.5e-2 leaves headroom and
    # is still far below what a wrong expert, scale or activation produces (O(1)).
    from mxfp4_serve.backends.hopper_triton import HopperTritonBackend

    device, spec, layer, x, w, ids = _hopper_case(act)
    expert_map = None
    if ep:  # this rank holds the upper half of the experts
        expert_map = torch.full((E,), -1, dtype=torch.int32, device=device)
        expert_map[E // 2:] = torch.arange(E - E // 2, dtype=torch.int32, device=device)
        for name in ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale", "w13_bias", "w2_bias"):
            if hasattr(layer, name):
                setattr(layer, name, torch.nn.Parameter(getattr(layer, name)[E // 2:], requires_grad=False))
    ref = CPUReferenceBackend().apply(layer, x.float(), w, ids, spec, expert_map).float()
    backend = HopperTritonBackend()
    backend.prepare(layer)  # codes to kb-major, as process_weights_after_loading does
    got = backend.apply(layer, x, w, ids, spec, expert_map)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    rel = (got.float() - ref).norm() / ref.norm()
    assert rel < 2.5e-2, rel


@pytest.mark.parametrize("act", ["silu", "swigluoai"])
def test_w4a8_emulation_rounds_each_gemm_input_like_the_learner(act):
    """activations "mxfp8" on hopper_triton and cpu_reference (W4A8 emulation): hopper_triton's layer equals, bit for
    bit, its kernels fed by hand with the codec's MXFP8 fake quant of the tokens and of the activation (the LoRA-free
    layer: moe_layer_forward(act_quant=)); cpu_reference's fp32 emulation agrees with it within twice the bf16
    bound above (the activation reaches the fake quant in fp32 there and in bf16 here, so an element next to an E4M3
    boundary may round one E4M3 step apart: about one in 16 under the interpreter's truncation, up to 2^-3 of it),
    and differs from cpu_reference without the fake quant (the emulation is on)."""
    from common import fake_quant_mxfp8
    from common.grouped_gemm import grouped_mm_mxfp4, grouped_mm_mxfp4_gated, route
    from common.grouped_gemm.combine import sum_slots
    from common.grouped_gemm.layout import kb_major_view
    from common.grouped_gemm.ops import reduction_order
    from mxfp4_serve.backends.hopper_triton import HopperTritonBackend

    _, spec, layer, x, w, ids = _hopper_case(act)
    x[0, :3] = torch.tensor([448.0 * 2**8, 3e-39, 0.0])  # a large block maximum, a subnormal, a zero
    ref = CPUReferenceBackend()
    bf16 = ref.apply(layer, x.float(), w, ids, spec, None).float()
    ref.activations, ref.profile = "mxfp8", "flashinfer"
    emulated = ref.apply(layer, x.float(), w, ids, spec, None).float()
    backend = HopperTritonBackend()
    backend.activations, backend.profile = "mxfp8", "flashinfer"
    backend.prepare(layer)
    got = backend.apply(layer, x, w, ids, spec, None)
    # by hand: the same kernels on the fake-quantized inputs
    w13 = (kb_major_view(layer.w13_weight.data, "w13_weight"), layer.w13_weight_scale)
    w2 = (kb_major_view(layer.w2_weight.data, "w2_weight"), layer.w2_weight_scale)
    rt = route(ids, E)
    order = reduction_order(w2[0], ids.numel())
    a, _ = grouped_mm_mxfp4_gated(fake_quant_mxfp8(x, profile="flashinfer"), rt.offsets, *w13,
                                  activation=spec.kernel_name, bias=getattr(layer, "w13_bias", None),
                                  gather_rows=rt.token, out_order=order, limit=spec.kernel_limit)
    y = grouped_mm_mxfp4(fake_quant_mxfp8(a, profile="flashinfer"), rt.offsets, *w2,
                         bias=getattr(layer, "w2_bias", None), scatter_rows=rt.source,
                         row_weights=w.reshape(-1).float(), x_order=order)
    assert torch.equal(got, sum_slots(y, ids.shape[1], torch.bfloat16))
    rel = (got.float() - emulated).norm() / emulated.norm()
    assert rel < 5e-2, rel
    assert (emulated - bf16).norm() / bf16.norm() > 1e-3


def test_cpu_reference_w4a8_rounds_both_gemm_inputs_to_the_mxfp8_grid():
    """cpu_reference's W4A8 emulation on identity experts (exactly representable in MXFP4, so each GEMM passes its
    input through unchanged in fp32): the output is the codec's MXFP8 fake quant of silu(q) * q with q the fake
    quant of the tokens, bit for bit, a fixed point of the fake quant; leaving out either rounding gives other
    bits (the bound against hopper_triton in the test above caught the second one missing for silu only, not for
    swigluoai)."""
    from common import fake_quant_mxfp8
    from mxfp4_serve.backends.cpu_reference import expert_mlp

    n = 64
    eye = torch.eye(n)
    w13, w2 = quantize(torch.cat((eye, eye)), profile="flashinfer"), quantize(eye, profile="flashinfer")
    assert torch.equal(dequantize(w13, torch.float32), torch.cat((eye, eye)))
    g = torch.Generator().manual_seed(41)
    x = torch.randn(9, n, generator=g) * 3
    x[0, :3] = torch.tensor([448.0 * 2**8, 3e-39, 0.0])  # a large block maximum, a subnormal, a zero

    def fq(t):
        return fake_quant_mxfp8(t, profile="flashinfer", nonfinite="profile")

    spec = ActivationSpec("silu")
    got = expert_mlp(w13.codes, w13.scales, w2.codes, w2.scales, None, None, x, spec, act_quant="flashinfer")
    q = fq(x)
    want = fq(torch.nn.functional.silu(q) * q)
    assert torch.equal(got, want) and torch.equal(fq(got), got)
    assert not torch.equal(got, torch.nn.functional.silu(q) * q)  # the second rounding happened
    assert not torch.equal(got, fq(torch.nn.functional.silu(x) * x))  # the first one too
    plain = expert_mlp(w13.codes, w13.scales, w2.codes, w2.scales, None, None, x, spec)
    assert torch.equal(plain, torch.nn.functional.silu(x) * x)


def test_hopper_triton_keeps_kb_major_codes_and_round_trips_canonical_bytes():
    # prepare rewrites the codes in place (same shape and storage, for CUDA graphs and layerwise reload); every
    # canonical read and write goes through the layout translation, bit for bit.
    from common.grouped_gemm.layout import to_kb_major
    from mxfp4_serve.backends.hopper_triton import HopperTritonBackend

    layer, _, _ = _layer(with_bias=False)
    backend = HopperTritonBackend()
    canonical = {n: getattr(layer, n).data.clone() for n in ("w13_weight", "w13_weight_scale", "w2_weight")}
    ptr = layer.w13_weight.data_ptr()
    backend.prepare(layer)
    assert layer.w13_weight.data_ptr() == ptr and layer.w13_weight.shape == canonical["w13_weight"].shape
    assert torch.equal(layer.w13_weight.data.view(-1), to_kb_major(canonical["w13_weight"]).view(-1))
    for name, want in canonical.items():
        assert torch.equal(backend.read_canonical(layer, name), want)
    with pytest.raises(RuntimeError, match="prepare\\(\\) ran twice"):
        backend.prepare(layer)
    # a sync writes new canonical bytes of experts 1 and 3; the others keep theirs
    ids = torch.tensor([3, 1])
    new = torch.randint(0, 256, (2, *canonical["w2_weight"].shape[1:]), dtype=torch.uint8)
    backend.write_experts(layer, "w2_weight", ids, new)
    want = canonical["w2_weight"].clone()
    want[ids] = new
    assert torch.equal(backend.read_canonical(layer, "w2_weight"), want)
    scales = torch.randint(100, 129, (2, *layer.w2_weight_scale.shape[1:]), dtype=torch.uint8)  # <= 128: one-mul bound
    backend.write_experts(layer, "w2_weight_scale", ids, scales)
    assert torch.equal(layer.w2_weight_scale.data[ids], scales)


@pytest.mark.parametrize("env", ["1", "0"])
def test_hopper_triton_one_multiply_bound_is_kept_by_sync(env, monkeypatch):
    # With every scale byte <= 128 at load the layer runs the one-multiply decode (captured into CUDA graphs): a
    # sync bringing a larger byte must be refused before anything is written, unless the engine opted out.
    from mxfp4_serve.backends.hopper_triton import ENV_ONE_MUL, HopperTritonBackend
    from common.moe.wire import SyncError

    monkeypatch.setenv(ENV_ONE_MUL, env)
    layer, _, _ = _layer(with_bias=False)
    assert int(layer.w13_weight_scale.max()) <= 128
    backend = HopperTritonBackend()
    backend.prepare(layer)
    assert layer._mxfp4_rl_one_mul is (env == "1")
    before = layer.w2_weight_scale.data.clone()
    big = before[:1].clone()
    big[0, 0, 0] = 131
    if env == "1":
        with pytest.raises(SyncError, match=r"scale byte 131 \(> 128.*Nothing was written.*MXFP4_RL_HOPPER_ONE_MUL=0"):
            backend.write_experts(layer, "w2_weight_scale", torch.tensor([0]), big)
        assert torch.equal(layer.w2_weight_scale.data, before)
    else:
        backend.write_experts(layer, "w2_weight_scale", torch.tensor([0]), big)
        assert int(layer.w2_weight_scale.data[0, 0, 0]) == 131
    monkeypatch.setenv(ENV_ONE_MUL, "yes")
    with pytest.raises(ValueError, match="MXFP4_RL_HOPPER_ONE_MUL must be 0 or 1, got 'yes'"):
        HopperTritonBackend().prepare(_layer(with_bias=False)[0])


def test_hopper_triton_refuses_an_unprepared_layer():
    from mxfp4_serve.backends.hopper_triton import HopperTritonBackend

    layer, _, _ = _layer(with_bias=False)
    x, w, ids = _routing()
    with pytest.raises(RuntimeError, match="prepare\\(\\) did not run"):
        HopperTritonBackend().apply(layer, x.to(torch.bfloat16), w, ids, ActivationSpec("silu"), None)


def test_hopper_triton_refuses_what_its_kernels_do_not_implement():
    from mxfp4_serve.backends.hopper_triton import HopperTritonBackend

    layer, _, _ = _layer(with_bias=False)
    x, w, ids = _routing()
    with pytest.raises(NotImplementedError, match="router weights on the input.*cpu_reference"):
        HopperTritonBackend().apply(layer, x, w, ids, ActivationSpec("silu"), None, apply_router_weight_on_input=True)
    with pytest.raises(NotImplementedError, match="alpha 1.702, limit 7.0; the model asks for alpha 1.5, limit 7.0"):
        HopperTritonBackend().apply(layer, x, w, ids, ActivationSpec("swigluoai", alpha=1.5), None)

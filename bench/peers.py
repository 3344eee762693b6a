#!/usr/bin/env python3
"""Every Hopper MXFP4 MoE peer measured against the engine's MoE layer (issue 24 part 3), one GPU, one process.

Backends, all fed the SAME random MXFP4 codes and scales (canonical: w13 rows [gate | up] halves, scales one e8m0
byte per 32 values), the same biases, tokens and router choice (topk_ids / topk_weights), each converted to its own
layout by vLLM 0.25's own helpers:
  ours        the engine's layer (moe_layer_forward on kb-major codes, what the hopper_triton backend serves: its
              prefill path picked as MXFP4_RL_HOPPER_PREFILL=auto picks), and the two paths forced: ours_fused (the
              fused grouped GEMMs) and ours_dense (bf16 scratch + cuBLAS grouped GEMM, common/grouped_gemm/dense.py);
              ours_w4a8: the layer with the engine's W4A8 emulation (activations "mxfp8": both packed GEMMs read
              the codec's MXFP8 fake quant of their input, moe_layer_forward(act_quant=)), whose rel err against
              ours is the activations' E4M3 rounding (about 2^-5 per element), so "ok" does not apply to it
  marlin      vLLM fused_marlin_moe (prepare_moe_mxfp4_layer_for_marlin)
  oai         vLLM's OAI triton_kernels experts, the modular classes vLLM runs: OAITritonExperts (swiglu fused into
              matmul_ogs, gpt-oss) / UnfusedOAITritonExperts (SiLU, dsv4); weights by vLLM's convert helpers. The
              router choice goes through make_routing_data (vLLM's pack_bitmatrix + its pow2-safe sort_tokens), not
              triton_kernels.topk, whose _topk_forward has tl.arange(0, N_EXPTS_ACT): no compile for top-6 (a power
              of 2 only)
  flashinfer  FlashInfer CUTLASS SM90 W4A16 (vLLM's FLASHINFER_CUTLASS_MXFP4_BF16: FlashInferExperts); runs only if
              flashinfer's fused_moe_90 JIT module is already built (scripts/gpu/install_peers.sh fi_build): the
              bench never starts that build (179 translation units)
  humming     vLLM's HUMMING backend (HummingIndexedExperts, humming-kernels JIT)
  bf16        vLLM fused_experts on the exact bf16 dequantization of the same weights
Shapes: dsv4 (E=32, H=4096, I=2048, top-6, SiLU, no bias) and gptoss (E=128, H=2880, I=2880, top-4, clamp-swiglu
alpha 1.702 limit 7 with biases). gpt-oss-style backends (marlin with SWIGLUOAI, oai, flashinfer, humming
gpt_oss_mxfp4, bf16 SWIGLUOAI) read the gate/up rows interleaved, as the gpt-oss checkpoint stores them; flashinfer
on dsv4 runs its swiglu with alpha 1, beta 0, no limit (= SiLU).

Times: triton.testing.do_bench medians (ms), eager and as a CUDA-graph replay; ratios are backend / ours. rel err =
||out - ours|| / ||ours|| in fp32; ok when <= 2e-2 (--tol): every backend reads the same MXFP4 values exactly and
accumulates in fp32, but activations, the gated intermediate and the output are rounded to bf16 (unit roundoff
2^-9 = 2e-3) at different points and summed in different orders, which gives a few 1e-3; a layout or scale error
gives O(1). A backend that fails is caught: its error (type, message, frames) goes into the table, the run goes on.
usage: PYTHONPATH=/tmp/site:. python3 bench/peers.py [--shapes dsv4,gptoss] [--tokens 16,128,1024,4096,8192]
       [--backends ours,marlin,bf16,oai,flashinfer,humming] [--rep 40] [--budget-s 420] [--out $OUT]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from learner_profile import graph_ms  # noqa: E402  (CUDA-graph replay, as vLLM runs decode)
from moe import bench as bench_ms  # noqa: E402  (do_bench median)
from moe import random_packed  # noqa: E402

# the peer wheels (FlashInfer, humming-kernels) live apart from the vLLM bundle: scripts/gpu/install_peers.sh
_PEERS = os.environ.get("PEERS_SITE", "/tmp/peers")
if os.path.isdir(_PEERS):
    sys.path.insert(0, _PEERS)

SHAPES = {"dsv4": dict(E=32, H=4096, I=2048, k=6, act="silu", bias=False),
          "gptoss": dict(E=128, H=2880, I=2880, k=4, act="swiglu_oai", bias=True)}
# run in this order per shape (backend-outer), the JIT-heavy ones last
BACKENDS = ("ours", "ours_fused", "ours_dense", "ours_w4a8", "marlin", "bf16", "oai", "flashinfer", "humming")
PEER_PACKAGES = ("triton_kernels", "flashinfer", "humming", "vllm", "triton")
SWIGLU = dict(alpha=1.702, beta=1.0, limit=7.0)  # gpt-oss (common.moe.activations holds the same constants)


# ---------------------------------------------------------------------------------------------------------------
# errors: caught, condensed, reported
# ---------------------------------------------------------------------------------------------------------------

def _pkg_of(filename: str) -> str | None:
    parts = filename.replace("\\", "/").split("/")
    for name in PEER_PACKAGES:
        if name in parts:
            return name
    return None


def describe_error(e: BaseException) -> str:
    """'Type: message [entry ...; last peer frame ...; raised ...]' from the frames inside the peer packages: entry =
    the first one (from our call site inward), last peer frame = the innermost outside Triton's own package (the
    peer's code that called Triton), raised = the innermost of all."""
    msg = str(e).strip()
    lines = [ln for ln in msg.splitlines() if ln.strip()]
    if len(lines) > 3:  # Triton's CompilationError: 'at L:C:', source excerpt, caret, then the reason
        head = lines[0] if lines[0].startswith("at ") else ""
        msg = (head + " ... " if head else "") + " / ".join(lines[-2:])
    msg = " ".join(msg.split())[:400]
    frames = traceback.extract_tb(e.__traceback__)
    inside = [f for f in frames if _pkg_of(f.filename)]

    def fmt(f):
        fn = f.filename.replace("\\", "/")
        pkg = _pkg_of(fn)
        short = fn[fn.rfind("/" + pkg + "/") + 1:] if pkg else os.path.basename(fn)
        return f"{short}:{f.lineno} {f.name}"

    where = ""
    if inside:
        peer = [f for f in inside if _pkg_of(f.filename) != "triton"]  # the peer's own code above Triton's compiler
        parts = [f"entry {fmt(inside[0])}"]
        if peer and peer[-1] is not inside[0]:
            parts.append(f"last peer frame {fmt(peer[-1])}")
        if inside[-1] is not inside[0] and (not peer or inside[-1] is not peer[-1]):
            parts.append(f"raised {fmt(inside[-1])}")
        where = " [" + "; ".join(parts) + "]"
    elif frames:
        where = f" [at {fmt(frames[-1])}]"
    return f"{type(e).__name__}: {msg}{where}".replace("|", "/")


# ---------------------------------------------------------------------------------------------------------------
# weights: one set of canonical bytes per shape, and the layouts derived from it
# ---------------------------------------------------------------------------------------------------------------

def interleave_rows(t: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """[.., gate (I) | up (I), ..] halves along dim -> gpt-oss interleaved rows (2i gate i, 2i+1 up i)."""
    g, u = t.chunk(2, dim=dim)
    return torch.stack((g, u), dim=dim + 1).flatten(dim, dim + 1).contiguous()


def make_shape_weights(s, gen):
    import common
    e, h, i = s["E"], s["H"], s["I"]
    w = {}
    for name, shape in (("w13", (e, 2 * i, h)), ("w2", (e, h, i))):
        w[name] = random_packed(shape, gen)
    if s["bias"]:  # bf16-representable so every backend (fp32 or bf16 bias) adds the same values
        w["b13"] = (torch.randn(e, 2 * i, device="cuda", generator=gen) * 0.1).bfloat16().float()
        w["b2"] = (torch.randn(e, h, device="cuda", generator=gen) * 0.1).bfloat16().float()
    else:
        w["b13"] = w["b2"] = None
    gptoss = s["act"] == "swiglu_oai"
    # what gpt-oss-style backends read: rows interleaved (the checkpoint's order); the dsv4 ones read halves
    w["il13"] = (interleave_rows(w["w13"][0]), interleave_rows(w["w13"][1])) if gptoss else w["w13"]
    w["il_b13"] = interleave_rows(w["b13"], 1) if w["b13"] is not None else None
    # bf16 dequantization (exact) for vLLM's bf16 fused_experts, in the order that backend reads
    w["bf13"] = common.dequantize(w["il13"], torch.bfloat16)
    w["bf2"] = common.dequantize(w["w2"], torch.bfloat16)
    return w


def moe_config(s, act):
    from vllm.model_executor.layers.fused_moe.config import (FusedMoEConfig, FusedMoEParallelConfig,
                                                             RoutingMethodType)
    kw = dict(num_experts=s["E"], experts_per_token=s["k"], hidden_dim=s["H"], intermediate_size=s["I"],
              num_local_experts=s["E"], num_logical_experts=s["E"], activation=act, device=torch.device("cuda"),
              routing_method=RoutingMethodType.Renormalize,
              moe_parallel_config=FusedMoEParallelConfig.make_no_parallel(), in_dtype=torch.bfloat16,
              has_bias=s["bias"], max_num_tokens=8192)
    try:
        return FusedMoEConfig(**kw)
    except Exception:  # some vLLM builds read the current VllmConfig in __post_init__
        from vllm.config import VllmConfig, set_current_vllm_config
        with set_current_vllm_config(VllmConfig()):
            return FusedMoEConfig(**kw)


def vllm_act(s):
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    return MoEActivation.SWIGLUOAI if s["act"] == "swiglu_oai" else MoEActivation.SILU


def weight_holder(c13, s13, c2, s2, b13=None, b2=None):
    """A bare module with the checkpoint parameter names vLLM's convert helpers read (and may delete)."""
    m = torch.nn.Module()
    for n, t in (("w13_weight", c13), ("w13_weight_scale", s13), ("w2_weight", c2), ("w2_weight_scale", s2),
                 ("w13_bias", b13), ("w2_bias", b2)):
        if t is not None:
            setattr(m, n, torch.nn.Parameter(t.clone(), requires_grad=False))
    m.params_dtype = torch.bfloat16
    return m


def modular_call(experts, w1, w2, act, e):
    """fn(x, tw, ti) running a vLLM FusedMoEExpertsModular.apply with its own workspace shapes; the workspaces are
    allocated once per token count (outside the timed call), as vLLM's workspace manager does."""
    cache = {}

    def fn(x, tw, ti):
        key = x.shape[0]
        if key not in cache:
            _, m, n, kdim, topk = experts.moe_problem_size(x, w1, w2, ti)
            s13, s2, so = experts.workspace_shapes(m, n, kdim, topk, e, e, None, act)
            dt = experts.workspace_dtype(x.dtype)
            # as FusedMoEKernelModularImpl._allocate_buffers: workspace13 and the output share one buffer (HUMMING
            # writes its output through workspace13)
            common = torch.empty(max(math.prod(s13), math.prod(so)), dtype=dt, device=x.device)
            cache[key] = (common[:math.prod(s13)].view(s13), torch.empty(s2, dtype=dt, device=x.device),
                          common[:math.prod(so)].view(so))
        ws13, ws2, out = cache[key]
        experts.apply(out, x, w1, w2, tw, ti, act, e, None, None, None, ws13, ws2, None, False)
        return out

    return fn


# ---------------------------------------------------------------------------------------------------------------
# backends: setup(s, w) -> fn(x, topk_weights fp32 [T,k], topk_ids int32 [T,k]) -> out [T,H] bf16
# ---------------------------------------------------------------------------------------------------------------

def _prefill_mode(mode, fn):
    """fn run with the engine layer's prefill path forced (common.envs.HOPPER_PREFILL), restored after each call."""
    from common import envs

    def call(*a):
        old = os.environ.get(envs.HOPPER_PREFILL.name)
        os.environ[envs.HOPPER_PREFILL.name] = mode
        try:
            return fn(*a)
        finally:
            if old is None:
                del os.environ[envs.HOPPER_PREFILL.name]
            else:
                os.environ[envs.HOPPER_PREFILL.name] = old
    return call


def setup_ours_fused(s, w):
    return _prefill_mode("fused", setup_ours(s, w))


def setup_ours_dense(s, w):
    return _prefill_mode("dense", setup_ours(s, w))


def setup_ours_w4a8(s, w):
    return setup_ours(s, w, act_quant="flashinfer")


def setup_ours(s, w, act_quant=None):
    from common.grouped_gemm import moe_layer_forward
    from common.grouped_gemm.layout import to_kb_major
    from common.grouped_gemm.ops import ONE_MUL_MAX_SCALE_BYTE
    kb = {n: (to_kb_major(w[n][0]), w[n][1]) for n in ("w13", "w2")}
    # the hopper_triton backend's one-multiply decision at load: every scale byte <= ONE_MUL_MAX_SCALE_BYTE
    msb = ONE_MUL_MAX_SCALE_BYTE if max(int(w[n][1].max()) for n in ("w13", "w2")) <= ONE_MUL_MAX_SCALE_BYTE else None
    return lambda x, tw, ti: moe_layer_forward(x, ti, tw, kb["w13"], kb["w2"], activation=s["act"],
                                               bias13=w["b13"], bias2=w["b2"], max_scale_byte=msb,
                                               act_quant=act_quant)


def setup_marlin(s, w):
    from vllm.model_executor.layers.fused_moe.experts.marlin_moe import fused_marlin_moe
    from vllm.model_executor.layers.quantization.utils.marlin_utils_fp4 import prepare_moe_mxfp4_layer_for_marlin
    from vllm.scalar_type import scalar_types
    b13 = w["il_b13"].bfloat16() if w["il_b13"] is not None else None
    b2 = w["b2"].bfloat16() if w["b2"] is not None else None
    m13, m2, s13, s2, mb13, mb2 = prepare_moe_mxfp4_layer_for_marlin(
        types.SimpleNamespace(params_dtype=torch.bfloat16), w["il13"][0], w["w2"][0], w["il13"][1], w["w2"][1],
        b13, b2)
    qt, act = scalar_types.float4_e2m1f.id, vllm_act(s)
    return lambda x, tw, ti: fused_marlin_moe(x, m13, m2, mb13, mb2, s13, s2, tw, ti, quant_type_id=qt,
                                              activation=act)


def setup_oai(s, w):
    from vllm.utils.import_utils import has_triton_kernels
    if not has_triton_kernels():
        raise ImportError("vllm.utils.import_utils.has_triton_kernels() is False")
    from vllm.model_executor.layers.fused_moe.experts import gpt_oss_triton_kernels_moe as G
    from vllm.model_executor.layers.fused_moe.oracle import mxfp4 as O
    act = vllm_act(s)
    cfg = moe_config(s, act)
    if s["act"] == "swiglu_oai":  # gpt-oss: what vLLM runs (swiglu fused into the first matmul_ogs)
        be = O.Mxfp4MoeBackend.TRITON
        h = weight_holder(*w["il13"], *w["w2"], w["il_b13"], w["b2"])
        w13, w2, pc13, pc2, b13, b2 = O.convert_gpt_oss_weight_to_mxfp4_moe_kernel_format(
            be, h, h.w13_weight, h.w2_weight, h.w13_weight_scale, h.w2_weight_scale, h.w13_bias, h.w2_bias)
        qc = O.make_mxfp4_moe_quant_config(be, pc13, pc2, gemm1_alpha=SWIGLU["alpha"], gemm1_beta=SWIGLU["beta"],
                                           swiglu_limit=SWIGLU["limit"], w1_bias=b13, w2_bias=b2)
        experts = G.OAITritonExperts(cfg, qc)
    else:  # SiLU: the unfused class (OAITritonExperts supports SWIGLUOAI only)
        be = O.Mxfp4MoeBackend.TRITON_UNFUSED
        h = weight_holder(*w["w13"], *w["w2"])
        w13, w2, pc13, pc2, b13, b2 = O.convert_weight_to_mxfp4_moe_kernel_format(
            be, h, h.w13_weight, h.w2_weight, h.w13_weight_scale, h.w2_weight_scale, None, None)
        qc = O.make_mxfp4_moe_quant_config(be, pc13, pc2)
        experts = G.UnfusedOAITritonExperts(cfg, qc)
    return modular_call(experts, w13, w2, act, s["E"])


def setup_flashinfer(s, w):
    import flashinfer  # noqa: F401
    from flashinfer.jit.fused_moe import gen_cutlass_fused_moe_sm90_module
    spec = gen_cutlass_fused_moe_sm90_module()
    if not spec.is_compiled:
        raise RuntimeError(f"flashinfer JIT module {spec.name} not built ({spec.jit_library_path} missing): no "
                           "prebuilt flashinfer-jit-cache for 0.6.13 could be fetched, and building it (179 CUTLASS "
                           "translation units) outruns this run; see scripts/gpu/install_peers.sh fi_build")
    from vllm.model_executor.layers.fused_moe.experts.flashinfer_cutlass_moe import FlashInferExperts
    from vllm.model_executor.layers.fused_moe.oracle import mxfp4 as O
    e, h_, i = s["E"], s["H"], s["I"]
    be = O.Mxfp4MoeBackend.FLASHINFER_CUTLASS_MXFP4_BF16
    act = vllm_act(s)
    # vLLM's converter for this backend is the gpt-oss one (interleaved rows in, biases required)
    b13 = w["il_b13"] if w["il_b13"] is not None else torch.zeros(e, 2 * i, device="cuda")
    b2 = w["b2"] if w["b2"] is not None else torch.zeros(e, h_, device="cuda")
    il13 = w["il13"] if s["act"] == "swiglu_oai" else tuple(interleave_rows(t) for t in w["w13"])
    hold = weight_holder(*il13, *w["w2"], b13.bfloat16(), b2.bfloat16())
    w13, w2, s13, s2, fb13, fb2 = O.convert_gpt_oss_weight_to_mxfp4_moe_kernel_format(
        be, hold, hold.w13_weight, hold.w2_weight, hold.w13_weight_scale, hold.w2_weight_scale, hold.w13_bias,
        hold.w2_bias)
    qc = O.make_mxfp4_moe_quant_config(be, s13, s2, gemm1_alpha=SWIGLU["alpha"], gemm1_beta=SWIGLU["beta"],
                                       swiglu_limit=SWIGLU["limit"], w1_bias=fb13, w2_bias=fb2)
    experts = FlashInferExperts(moe_config(s, act), qc)
    if s["act"] == "silu":  # its mxfp4 path always runs swiglu: alpha 1, beta 0, no clamp = silu(gate) * up
        experts.gemm1_alpha = torch.ones(e, dtype=torch.float32, device="cuda")
        experts.gemm1_beta = torch.zeros(e, dtype=torch.float32, device="cuda")
        experts.gemm1_clamp_limit = torch.full((e,), float("inf"), dtype=torch.float32, device="cuda")
    return modular_call(experts, w13, w2, act, e)


def setup_humming(s, w):
    from vllm.utils.import_utils import has_humming
    if not has_humming():
        raise ImportError("vllm.utils.import_utils.has_humming() is False (humming-kernels not installed)")
    from vllm.model_executor.layers.fused_moe.experts.fused_humming_moe import HummingIndexedExperts
    from vllm.model_executor.layers.quantization.utils.humming_utils import (convert_to_humming_moe_kernel_format,
                                                                             get_humming_moe_quant_config)
    act = vllm_act(s)
    cfg = moe_config(s, act)
    gptoss = s["act"] == "swiglu_oai"
    b13 = w["il_b13"].bfloat16() if gptoss else None
    b2 = w["b2"].bfloat16() if gptoss else None
    layer = weight_holder(*w["il13"], *w["w2"], b13, b2)  # il13 is the halves for dsv4
    layer.moe_config = cfg
    layer.layer_name = "peers.experts"
    layer.local_num_experts = layer.global_num_experts = s["E"]
    layer.intermediate_size_per_partition, layer.hidden_size = s["I"], s["H"]
    # vLLM's quant_method for each checkpoint kind (oracle/mxfp4.py: gpt-oss vs plain mxfp4)
    convert_to_humming_moe_kernel_format(layer, quant_config={"quant_method": "gpt_oss_mxfp4" if gptoss
                                                              else "mxfp4"})
    qc = (get_humming_moe_quant_config(layer, gemm1_alpha=SWIGLU["alpha"], gemm1_beta=SWIGLU["beta"],
                                       gemm1_clamp_limit=SWIGLU["limit"]) if gptoss
          else get_humming_moe_quant_config(layer))
    experts = HummingIndexedExperts(layer=layer, moe_config=cfg, quant_config=qc)
    # its tile choice reads the data-parallel token count from vLLM's forward context; one GPU, no DP: T * k
    experts.estimate_local_valid_shape_m = lambda topk_ids: topk_ids.numel()
    return modular_call(experts, layer.w13_weight, layer.w2_weight, act, s["E"])


def setup_bf16(s, w):
    from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts
    act = vllm_act(s)
    qc = None
    if s["bias"]:
        from vllm.model_executor.layers.fused_moe.config import biased_moe_quant_config
        qc = biased_moe_quant_config(w["il_b13"].bfloat16(), w["b2"].bfloat16(), gemm1_alpha=SWIGLU["alpha"],
                                     gemm1_beta=SWIGLU["beta"], gemm1_clamp_limit=SWIGLU["limit"])
    bf13, bf2 = w["bf13"], w["bf2"]
    return lambda x, tw, ti: fused_experts(x, bf13, bf2, tw, ti, activation=act, quant_config=qc)


SETUP = {"ours": setup_ours, "ours_fused": setup_ours_fused, "ours_dense": setup_ours_dense,
         "ours_w4a8": setup_ours_w4a8,
         "marlin": setup_marlin, "oai": setup_oai, "flashinfer": setup_flashinfer,
         "humming": setup_humming, "bf16": setup_bf16}


# ---------------------------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------------------------

def routing(s, t, gen):
    logits = torch.randn(t, s["E"], device="cuda", generator=gen)
    tw, ti = torch.topk(torch.softmax(logits, -1), s["k"], dim=-1)
    tw = (tw / tw.sum(-1, keepdim=True)).float().contiguous()
    x = (torch.randn(t, s["H"], device="cuda", generator=gen) * 0.5).to(torch.bfloat16)
    return x, tw, ti.to(torch.int32).contiguous()


def run_shape(name, s, tokens, backends, args, deadline, rows, errors):
    gen = torch.Generator(device="cuda").manual_seed(0)
    t0 = time.time()
    w = make_shape_weights(s, gen)
    packed = sum(t.numel() for n in ("w13", "w2") for t in w[n])
    print(f"# {name}: E={s['E']} H={s['H']} I={s['I']} top-{s['k']} {s['act']} bias={s['bias']}, packed "
          f"{packed / 1e9:.3f} GB, weights made in {time.time() - t0:.1f}s", flush=True)
    fns = {}
    for b in backends:
        t0 = time.time()
        try:
            fns[b] = SETUP[b](s, w)
            torch.cuda.synchronize()
            print(f"  setup {b}: {time.time() - t0:.1f}s", flush=True)
        except Exception as e:  # noqa: BLE001 - a peer that cannot be set up is a result
            errors.append((name, b, "setup", describe_error(e)))
            print(f"  setup {b} FAILED: {describe_error(e)}", flush=True)
    inputs = {t: routing(s, t, gen) for t in tokens}
    refs = {}
    for b in backends:  # backend-outer: a slow JIT (humming) spends only what is left of this shape's budget
        for t in tokens:
            r = dict(shape=name, backend=b, tokens=t)
            rows.append(r)
            if b not in fns:
                r["note"] = "setup failed"
                continue
            if time.time() > deadline:
                r["note"] = "skipped: time budget"
                continue
            x, tw, ti = inputs[t]
            f = fns[b]
            try:
                out = f(x, tw, ti)
                torch.cuda.synchronize()
                outf = out.float().clone()
                if b == "ours":
                    refs[t] = outf
                elif t in refs:
                    r["rel"] = ((outf - refs[t]).norm() / refs[t].norm().clamp_min(1e-30)).item()
                if not torch.isfinite(outf).all():
                    r["note"] = "non-finite output"
                r["eager"] = bench_ms(lambda: f(x, tw, ti), args.rep)
            except Exception as e:  # noqa: BLE001
                errors.append((name, b, f"tokens={t} eager", describe_error(e)))
                r["note"] = "failed (eager): see errors"
                torch.cuda.synchronize()
                continue
            try:
                r["graph"] = graph_ms(lambda: f(x, tw, ti), args.rep)
            except Exception as e:  # noqa: BLE001
                errors.append((name, b, f"tokens={t} graph", describe_error(e)))
                r["note"] = "graph capture failed: see errors"
                try:
                    torch.cuda.synchronize()
                except Exception:  # noqa: BLE001
                    pass
            print(f"  {b} T={t}: eager {r.get('eager', float('nan')):.4f} ms graph "
                  f"{r.get('graph', float('nan')):.4f} ms rel {r.get('rel', float('nan')):.2e}", flush=True)
    del fns, w
    torch.cuda.empty_cache()


def fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def table(rows, errors, args, header):
    ours = {(r["shape"], r["tokens"]): r for r in rows if r["backend"] == "ours"}
    out = [header, "",
           "| shape | tokens | backend | eager ms | graph ms | eager / ours | graph / ours | rel err vs ours | ok | "
           "note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o = ours.get((r["shape"], r["tokens"]), {})
        re_ = r.get("eager", float("nan")) / o["eager"] if "eager" in r and "eager" in o else float("nan")
        rg = r.get("graph", float("nan")) / o["graph"] if "graph" in r and "graph" in o else float("nan")
        ok = "-" if "rel" not in r or r["backend"] == "ours_w4a8" else ("yes" if r["rel"] <= args.tol else "NO")
        out.append(f"| {r['shape']} | {r['tokens']} | {r['backend']} | {fmt(r.get('eager'), '.4f')} | "
                   f"{fmt(r.get('graph'), '.4f')} | {fmt(re_, '.2f')} | {fmt(rg, '.2f')} | "
                   f"{fmt(r.get('rel'), '.1e')} | {ok} | {r.get('note', '')} |")
    if errors:
        out += ["", "Errors (type: message [entry frame in the peer's package; its last frame before Triton; "
                "innermost frame]):", "",
                "| shape | backend | where | error |", "|---|---|---|---|"]
        out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in errors]
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="dsv4,gptoss")
    ap.add_argument("--tokens", default="16,128,1024,4096,8192")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--rep", type=int, default=40, help="do_bench rep (ms) per measurement")
    ap.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget; shared out per shape")
    ap.add_argument("--tol", type=float, default=2e-2)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    start = time.time()
    shapes = args.shapes.split(",")
    tokens = [int(t) for t in args.tokens.split(",")]
    backends = [b for b in args.backends.split(",") if b]
    if "ours" in backends:
        backends = ["ours"] + [b for b in backends if b != "ours"]
    for b in backends:
        if b not in SETUP:
            raise SystemExit(f"unknown backend {b!r}; choose from {','.join(BACKENDS)}")
    vers = [f"torch {torch.__version__}"]
    for mod in ("triton", "vllm", "flashinfer", "humming"):
        try:
            m = __import__(mod)
            vers.append(f"{mod} {getattr(m, '__version__', '?')}")
        except Exception as e:  # noqa: BLE001
            vers.append(f"{mod} unavailable ({type(e).__name__})")
    header = (f"# Hopper MXFP4 MoE peers — {torch.cuda.get_device_name(0)}, {time.strftime('%Y-%m-%d')}\n\n"
              f"{', '.join(vers)}. `bench/peers.py --tokens {args.tokens} --rep {args.rep}`: do_bench medians (ms), "
              f"eager and CUDA-graph replay; ratios are backend / ours (lower is faster than ours); rel err = "
              f"L2(out - ours) / L2(ours), ok at <= {args.tol:g}.")
    print(header, flush=True)
    rows, errors = [], []
    for n, name in enumerate(shapes):
        deadline = start + args.budget_s * (n + 1) / len(shapes)
        try:
            run_shape(name, SHAPES[name], tokens, backends, args, deadline, rows, errors)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory making the weights
            errors.append((name, "-", "shape", describe_error(e)))
            print(f"# {name} FAILED: {describe_error(e)}", flush=True)
            torch.cuda.empty_cache()
    md = table(rows, errors, args, header + f" Wall time {time.time() - start:.0f} s.")
    print(md)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "peers.md"), "w") as f:
        f.write(md)


if __name__ == "__main__":
    main()

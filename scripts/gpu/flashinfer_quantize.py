"""Issue 23 item 5: our `flashinfer` MXFP4 profile vs FlashInfer's own `mxfp4_quantize`, byte for byte, on a lent GPU.

What FlashInfer 0.6.13 does (read from its source, flashinfer/quantization/fp4_quantization.py and
data/csrc/nv_internal/tensorrt_llm/kernels/quantization{,_utils}.cuh):
  mxfp4_quantize(a, backend="cuda") = fp4_quantize(a.cuda(), 448*6/amax, sf_vec_size=32, sf_use_ue8m0=True,
  is_sf_swizzled_layout=True) -> (codes uint8 [M, K/2], element 2j in the low nibble; scales uint8 UE8M0 in the 128x4
  swizzled layout, [ceil128(M), ceil4(K/32)]). The global scale is ignored on the UE8M0 path. The kernel is JIT-built
  per arch (fp4_quantization_90 on Hopper, -use_fast_math), but `quantize_with_block_size` / `cvt_warp_fp16_to_fp4`
  have their whole body under `__CUDA_ARCH__ >= 1000`: on sm90 the launch succeeds and writes nothing (the outputs
  are `torch.empty`). The cute-dsl backend needs SM100 too (cvt.rn.satfinite.e2m1x2.f32). FlashInfer has no host
  MXFP4 quantizer (fp4_quantize CHECK_CUDAs its input); its host routines only dequantize
  (e2m1_and_ufp8sf_scale_to_float, mxfp4_dequantize_host).
So on an H100/H200 this script compares against (1) the kernel itself where it runs (SM100+; on Hopper it records
the no-op), and (2) a model of the SM100 kernel written from that source, whose fp32 steps run as the real PTX on
this GPU (rcp.approx.ftz.f32(6), mul.rn.ftz.f32, ex2.approx.ftz.f32) and whose two SM100-only conversions follow
their PTX definitions (cvt.rp.satfinite.ue8m0x2.f32: round up to a power of two; cvt.rn.satfinite.e2m1x2.f32:
nearest, ties to even, saturating at 6, sign kept). It also checks that FlashInfer's host dequantizers read our
bytes as we do (nibble order, E8M0, swizzle).

    PYTHONPATH=/tmp/site:/tmp/peers:. python3 scripts/gpu/flashinfer_quantize.py --out $OUT
Writes $OUT/flashinfer_mxfp4_quantize.safetensors (the golden for tests/common/golden/) and
$OUT/flashinfer_quantize_summary.json; exit status 1 on an unexpected mismatch. `--cpu-dry-run` runs the same
pipeline on CPU with the PTX steps emulated (no FlashInfer, no golden worth keeping): a smoke test only.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import traceback

import torch

T0 = time.time()
BUDGET_S = 235.0  # the whole run, JIT build included, stays under 4 minutes
BLOCK = 32
K = 256
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
TIES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
BF16_MAX = 3.3895313892515355e38
JIT_TIMEOUT_MSG = "JIT build would exceed the 4-minute budget; falling back to the reference routine"

results: dict[str, object] = {}
failures: list[str] = []


def elapsed() -> float:
    return time.time() - T0


def describe_exc(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    where = " <- ".join(f"{pathlib.Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
    return f"{type(exc).__name__}: {str(exc)[:600]} [innermost: {where}]"


def record(name: str, ok: bool, detail: str = "", expected: bool = False) -> None:
    """expected=True: a known, explained failure (reported, not counted)."""
    tag = "OK  " if ok else ("XFAIL" if expected else "FAIL")
    results[name] = {"ok": bool(ok), "expected_failure": bool(expected and not ok), "detail": detail}
    print(f"{tag} {name} {detail}", flush=True)
    if not ok and not expected:
        failures.append(name)


def guarded(name: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - every section reports its own failure and the run goes on
        record(f"{name} crashed", False, describe_exc(exc))
        return None


# ---------------------------------------------------------------- inputs


def _bf16_step(v: torch.Tensor, ulps: int) -> torch.Tensor:
    """v (bf16, finite, non-zero) moved by `ulps` bf16 steps in magnitude."""
    bits = v.view(torch.int16).to(torch.int32)
    return (bits + ulps).to(torch.int16).view(torch.bfloat16)


def build_inputs() -> tuple[torch.Tensor, list[str], list[str]]:
    """bf16 [M, 256] and the class of every 32-element block (row-major over [M, 8])."""
    g = torch.Generator().manual_seed(23)
    rows, labels = [], []
    for e in (-120, -40, -8, 0, 8, 40, 100, 120):  # random normal rows at several scales, 8 rows each
        rows.append((torch.randn(8, K, generator=g, dtype=torch.float64) * 2.0**e).to(torch.bfloat16))
        labels += [f"randn*2^{e}"] * (8 * K // BLOCK)
    blocks: list[tuple[str, torch.Tensor]] = []  # (class, bf16 [32])

    def add(cls: str, vals) -> None:
        t = torch.as_tensor(vals, dtype=torch.float64).to(torch.bfloat16) if not isinstance(vals, torch.Tensor) \
            or vals.dtype != torch.bfloat16 else vals
        assert t.numel() == BLOCK, (cls, t.numel())
        blocks.append((cls, t.reshape(BLOCK)))

    add("zeros", [0.0] * BLOCK)
    add("neg_zero", [-0.0] * BLOCK)
    add("neg_zero", [(-0.0 if i % 2 else 0.0) for i in range(BLOCK)])
    ties = torch.tensor(TIES, dtype=torch.bfloat16)
    for k in (-120, -60, -20, -3, 0, 3, 20, 60, 120):
        p = 2.0**k
        t = (ties.double() * p).to(torch.bfloat16)
        body = torch.cat([torch.tensor([6 * p], dtype=torch.bfloat16), t, -t, _bf16_step(t, 1), _bf16_step(-t, -1)])
        blk = torch.cat([body, torch.tensor([0.0, -0.0, 4 * p], dtype=torch.bfloat16)])
        add("e2m1_ties", blk)  # amax = 6*2^k: scale exactly 2^k, elements exactly on the midpoints
        blk2 = blk.clone()
        blk2[0] = _bf16_step(blk[0:1], 1)[0]  # amax just above 6*2^k: scale 2^(k+1), halves of the ties
        add("e2m1_ties", blk2)
    lin = torch.linspace(-1, 1, BLOCK, dtype=torch.float64)
    for k in range(-130, 126):  # block amax at the scale rounding tie 6*2^k and one bf16 step either side
        amax = torch.tensor([6.0 * 2.0**k], dtype=torch.float64).to(torch.bfloat16)
        for ulps in (0, 1, -1):
            a = _bf16_step(amax, ulps) if ulps else amax
            blk = (lin * a.double()).to(torch.bfloat16)
            blk[5] = a[0]
            add("scale_ties", blk)
    mx = torch.tensor([BF16_MAX], dtype=torch.bfloat16)
    add("bf16_max", mx.repeat(BLOCK) * torch.tensor([1.0, -1.0] * 16, dtype=torch.bfloat16))
    blk = torch.randn(BLOCK, generator=g, dtype=torch.float64).to(torch.bfloat16)
    blk[3] = mx[0]
    add("bf16_max", blk)
    add("bf16_max", (lin * BF16_MAX).to(torch.bfloat16))
    sub = torch.arange(1, 128, 4, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)  # bf16 subnormals
    add("subnormals", sub * torch.tensor([1.0, -1.0] * 16, dtype=torch.bfloat16))
    for amax in (2.0**-126, 6 * 2.0**-127, 1.25 * 6 * 2.0**-127, 6 * 2.0**-126, 6 * 2.0**-125, 6 * 2.0**-124):
        blk = (lin * amax).to(torch.bfloat16)  # tiny blocks: subnormal elements, amax on both sides of 6*2^-126
        blk[7] = torch.tensor(amax, dtype=torch.float64).to(torch.bfloat16)
        add("subnormals", blk)
    for _ in range(16):
        k = int(torch.randint(-30, 31, (1,), generator=g))
        idx = torch.randint(0, 8, (BLOCK,), generator=g)
        sgn = torch.where(torch.rand(BLOCK, generator=g) < 0.5, -1.0, 1.0).double()
        add("mixed_signs", torch.tensor(E2M1_GRID, dtype=torch.float64)[idx] * sgn * 2.0**k)
    for huge in (2.0**20, BF16_MAX, 6.0):
        for rest in (1e-3, 2.0**-100):
            blk = torch.randn(BLOCK, generator=g, dtype=torch.float64) * rest
            blk[11] = -huge
            add("one_huge", blk)
    while len(blocks) % (K // BLOCK):
        add("pad_zeros", [0.0] * BLOCK)
    adv = torch.stack([b for _, b in blocks]).reshape(-1, K)
    rows.append(adv)
    labels += [c for c, _ in blocks]
    x = torch.cat(rows).contiguous()
    assert x.dtype == torch.bfloat16 and bool(torch.isfinite(x).all())
    assert len(labels) == x.shape[0] * (K // BLOCK)
    classes = list(dict.fromkeys(labels))
    return x, labels, classes


# ---------------------------------------------------------------- PTX steps (real on the GPU, emulated on CPU)


class Ptx:
    """fp32 ops the SM100 kernel executes, run as inline PTX on this GPU (they exist on sm90). emulate=True: a CPU
    stand-in for --cpu-dry-run (correctly rounded rcp/ex2, flush-to-zero applied by hand)."""

    def __init__(self, emulate: bool):
        self.emulate = emulate
        self._kernels: dict[tuple[str, int], object] = {}

    def _triton(self, asm: str, nargs: int):
        key = (asm, nargs)
        if key in self._kernels:
            return self._kernels[key]
        import triton
        import triton.language as tl

        if nargs == 1:
            @triton.jit
            def k1(a_ptr, y_ptr, n, ASM: tl.constexpr, BLOCK_: tl.constexpr):
                offs = tl.program_id(0) * BLOCK_ + tl.arange(0, BLOCK_)
                a = tl.load(a_ptr + offs, mask=offs < n)
                y = tl.inline_asm_elementwise(ASM, "=r,r", [a], dtype=tl.float32, is_pure=True, pack=1)
                tl.store(y_ptr + offs, y, mask=offs < n)
            kern = k1
        else:
            @triton.jit
            def k2(a_ptr, b_ptr, y_ptr, n, ASM: tl.constexpr, BLOCK_: tl.constexpr):
                offs = tl.program_id(0) * BLOCK_ + tl.arange(0, BLOCK_)
                a = tl.load(a_ptr + offs, mask=offs < n)
                b = tl.load(b_ptr + offs, mask=offs < n)
                y = tl.inline_asm_elementwise(ASM, "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1)
                tl.store(y_ptr + offs, y, mask=offs < n)
            kern = k2
        self._kernels[key] = kern
        return kern

    def _run(self, asm: str, *args: torch.Tensor) -> torch.Tensor:
        import triton

        shape = torch.broadcast_shapes(*(a.shape for a in args))
        flat = [a.float().cuda().expand(shape).contiguous().reshape(-1) for a in args]
        y = torch.empty_like(flat[0])
        n = y.numel()
        self._triton(asm, len(args))[(triton.cdiv(n, 1024),)](*flat, y, n, ASM=asm, BLOCK_=1024)
        return y.reshape(shape)

    @staticmethod
    def _flush(t: torch.Tensor) -> torch.Tensor:
        return torch.where(t.abs() < 2.0**-126, torch.copysign(torch.zeros_like(t), t), t)

    def rcp_ftz(self, a: torch.Tensor) -> torch.Tensor:
        if self.emulate:
            return self._flush(1.0 / self._flush(a.float()))
        return self._run("rcp.approx.ftz.f32 $0, $1;", a)

    def mul(self, a: torch.Tensor, b: torch.Tensor, ftz: bool) -> torch.Tensor:
        if self.emulate:
            return self._flush(self._flush(a.float()) * self._flush(b.float())) if ftz else a.float() * b.float()
        return self._run("mul.rn.ftz.f32 $0, $1, $2;" if ftz else "mul.rn.f32 $0, $1, $2;", a, b)

    def ex2(self, a: torch.Tensor, ftz: bool) -> torch.Tensor:
        if self.emulate:
            y = torch.exp2(a.double()).float()
            return self._flush(y) if ftz else y
        return self._run("ex2.approx.ftz.f32 $0, $1;" if ftz else "ex2.approx.f32 $0, $1;", a)


# ---------------------------------------------------------------- the SM100 kernel, modelled from its source


def rne_e2m1(y: torch.Tensor) -> torch.Tensor:
    """cvt.rn.satfinite.e2m1x2.f32 per its PTX definition: nearest grid value, ties to the even code, |y| > 6
    saturates to 6, the sign bit kept (also for zeros). Written independently of common.e2m1."""
    grid = torch.tensor(E2M1_GRID, dtype=torch.float64, device=y.device)
    a = y.abs().double().unsqueeze(-1)
    d = (a - grid).abs()
    cand = d == d.min(-1, keepdim=True).values
    even = cand & (torch.arange(8, device=y.device) % 2 == 0)
    idx = torch.where(even.any(-1), even.to(torch.int8).argmax(-1), cand.to(torch.int8).argmax(-1))
    idx = torch.where(a.squeeze(-1) > 6.0, 7, idx)
    return idx.to(torch.uint8) | (torch.signbit(y).to(torch.uint8) << 3)


def sm100_model(x: torch.Tensor, ptx: Ptx, fast_math: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """cvt_warp_fp16_to_fp4<UE8M0_SF=true> of FlashInfer 0.6.13 for bf16 x [M, K] (finite):
      vecMax = max |x| of the 32-block (bf16 max, exact in fp32); vecMax *= rcp.approx.ftz(6.0f);
      sf = cvt.rp.satfinite.ue8m0(vecMax); outputScale = vecMax != 0 ? (sf == 0 ? 1 : exp2f(127 - sf)) : 0;
      element = cvt.rn.satfinite.e2m1(x * outputScale).
    fast_math=True is how it is built (-use_fast_math: mul.ftz, exp2f -> ex2.approx.ftz); False keeps the same steps
    without flush-to-zero (what the codec's `flashinfer` profile promises)."""
    m, k = x.shape
    xf = x.float()
    amax = xf.reshape(m, k // BLOCK, BLOCK).abs().amax(-1)
    r6 = ptx.rcp_ftz(torch.tensor([6.0]))
    s = ptx.mul(amax, r6.to(amax.device).expand_as(amax), ftz=fast_math).to(amax.device)
    bits = s.contiguous().view(torch.int32)
    exp, mant = (bits >> 23) & 0xFF, bits & 0x7FFFFF
    # Round up to a power of two, satfinite. E8M0 reaches down to 2^-127 (byte 0): a subnormal s <= 2^-127 (only
    # without ftz) and s = 0 give byte 0, a subnormal s above 2^-127 byte 1.
    up = torch.where(exp == 0, (mant > 0x400000).to(torch.int32), exp + (mant != 0).to(torch.int32))
    sf = torch.clamp(up, max=254)
    p = ptx.ex2((127 - sf).float(), ftz=fast_math).to(amax.device)
    scale = torch.where(s != 0, torch.where(sf == 0, torch.ones_like(p), p), torch.zeros_like(p))
    full = scale.repeat_interleave(BLOCK, dim=-1)
    y = ptx.mul(xf, full, ftz=fast_math).to(xf.device).reshape(m, k)
    nib = rne_e2m1(y)
    codes = nib[:, 0::2] | (nib[:, 1::2] << 4)  # element 2j in the low nibble (cvt e2m1x2 d, hi, lo)
    return codes.cpu().contiguous(), sf.to(torch.uint8).cpu().contiguous()


# ---------------------------------------------------------------- comparison and the table


def compare(tag: str, x: torch.Tensor, labels: list[str], classes: list[str], ours: tuple, theirs: tuple,
            skip: torch.Tensor | None = None, expected: bool = False) -> dict:
    """Byte comparison per input class; skip = bool [M, K/32] blocks left out of the verdict (reported)."""
    oc, os_ = ours[0].cpu(), ours[1].cpu()
    tc, ts = theirs[0].cpu(), theirs[1].cpu()
    m = x.shape[0]
    nb = K // BLOCK
    cdiff = (oc.reshape(m, nb, 16) != tc.reshape(m, nb, 16)).sum(-1)  # differing code bytes per block
    sdiff = os_ != ts
    bad = (cdiff > 0) | sdiff
    skip = torch.zeros_like(bad) if skip is None else skip.cpu()
    lab = labels
    print(f"\n[{tag}] {'class':<16} {'blocks':>6} {'code bytes diff':>15} {'scales diff':>11} {'skipped':>7}  first difference")
    table = {}
    for cls in classes:
        sel = torch.tensor([lb == cls for lb in lab]).reshape(m, nb)
        cd, sd = int(cdiff[sel & ~skip].sum()), int(sdiff[sel & ~skip].sum())
        first = ""
        hits = (bad & sel & ~skip).nonzero()
        if hits.numel():
            r, b = (int(v) for v in hits[0])
            vals = x[r, b * BLOCK:(b + 1) * BLOCK].float().tolist()
            first = (f"row {r} block {b}: scale ours {int(os_[r, b])} theirs {int(ts[r, b])}; codes ours "
                     f"{oc[r, b * 16:(b + 1) * 16].numpy().tobytes().hex()} theirs "
                     f"{tc[r, b * 16:(b + 1) * 16].numpy().tobytes().hex()}; x = "
                     + " ".join(f"{v:.4g}" for v in vals))
        table[cls] = {"blocks": int(sel.sum()), "code_bytes_diff": cd, "scales_diff": sd,
                      "skipped_blocks": int((sel & skip).sum()), "first_difference": first}
        print(f"[{tag}] {cls:<16} {int(sel.sum()):>6} {cd:>15} {sd:>11} {int((sel & skip).sum()):>7}  {first[:400]}")
    total_bad = int((bad & ~skip).sum())
    record(f"{tag}: bytes equal", total_bad == 0,
           f"{total_bad} differing blocks of {bad.numel() - int(skip.sum())} compared ({int(skip.sum())} skipped)",
           expected=expected)
    return table


# ---------------------------------------------------------------- FlashInfer


def build_jit(arch: str, budget: float) -> bool:
    """Build FlashInfer's fp4_quantization module in a child process (its own session, killed on timeout)."""
    code = ("import time; t = time.time()\n"
            "from flashinfer.quantization.fp4_quantization import get_fp4_quantization_module as g\n"
            f"g({arch!r}); print('FI_JIT_DONE %.0f s' % (time.time() - t), flush=True)\n")
    env = dict(os.environ)
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 8))
    t = time.time()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(5.0, budget))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the child and its nvcc/ninja processes, which this script started
        proc.communicate()
        print(JIT_TIMEOUT_MSG, flush=True)
        record(f"jit/fp4_quantization_{arch}", False, f"{JIT_TIMEOUT_MSG} (killed after {time.time() - t:.0f} s)")
        return False
    ok = proc.returncode == 0 and "FI_JIT_DONE" in out
    record(f"jit/fp4_quantization_{arch}", ok, f"{time.time() - t:.0f} s; " + out.strip()[-1500:].replace("\n", " | "))
    return ok


def flashinfer_kernel(x: torch.Tensor, labels, classes, ours, model_ftz, cc: tuple[int, int], golden) -> None:
    from flashinfer import mxfp4_quantize

    from common.layouts.swizzle import unswizzle_scales

    m, k = x.shape
    # Poison the caching allocator so an output the kernel never writes shows up as 0xA5 bytes.
    junk = [torch.full((n,), 0xA5, dtype=torch.uint8, device="cuda") for n in (m * k // 2, 4096, 1 << 16, 1 << 20)]
    del junk
    xc = x.cuda()
    codes, sf = mxfp4_quantize(xc)
    torch.cuda.synchronize()
    info = f"codes {tuple(codes.shape)} {codes.dtype}, scales {tuple(sf.shape)} {sf.dtype}"
    codes = codes.view(torch.uint8).cpu().reshape(m, k // 2)
    sf_u8 = sf.view(torch.uint8).cpu()
    scales = unswizzle_scales(sf_u8.reshape(-1, -(-(k // BLOCK) // 4) * 4), m, k // BLOCK)
    poison = float((codes == 0xA5).float().mean())
    print(f"flashinfer mxfp4_quantize returned {info}; fraction of code bytes still 0xA5: {poison:.3f}", flush=True)
    on_sm100 = cc[0] >= 10
    results["flashinfer_kernel"] = {"returned": info, "poison_fraction": poison, "ran_kernel_body": on_sm100}
    if not on_sm100:
        record("flashinfer mxfp4_quantize runs on this GPU", False,
               f"sm{cc[0]}{cc[1]}: kernel body compiled only for __CUDA_ARCH__ >= 1000, outputs are unwritten "
               f"torch.empty ({poison:.1%} of code bytes still hold the 0xA5 poison)", expected=True)
    results["table_kernel_vs_ours"] = compare("flashinfer kernel vs ours", x, labels, classes, ours, (codes, scales),
                                              skip=golden.get("model.ftz_blocks", None) if on_sm100 else None,
                                              expected=not on_sm100)
    if on_sm100:
        results["table_kernel_vs_model"] = compare("flashinfer kernel vs sm100 model", x, labels, classes,
                                                   model_ftz, (codes, scales))
        golden["kernel.codes"], golden["kernel.scales"] = codes.contiguous(), scales.contiguous()


def flashinfer_decode(ours: tuple) -> None:
    """FlashInfer's host dequantizers on our bytes must give our dequantized values (nibble order, E8M0, swizzle)."""
    import flashinfer
    from flashinfer.quantization import fp4_quantization as F

    from common import dequantize
    from common.layouts.swizzle import swizzle_scales

    codes, scales = ours[0].cpu().contiguous(), ours[1].cpu().contiguous()
    ref = dequantize((codes, scales), torch.float32, backend="torch")
    m = codes.shape[0]
    # FlashInfer 0.6.13 documents global_scale_tensor as optional (default None) but calls .cpu() on it (seen on an
    # H100, 2026-12-07: AttributeError 'NoneType' object has no attribute 'cpu'): pass 1.0, "no global scale"
    one = torch.ones(1, dtype=torch.float32)
    runs = {
        "e2m1_and_ufp8sf_scale_to_float (linear)": lambda: flashinfer.e2m1_and_ufp8sf_scale_to_float(
            codes, scales.reshape(-1), one, 32, 0, False),
        "e2m1_and_ufp8sf_scale_to_float (swizzled 128x4)": lambda: flashinfer.e2m1_and_ufp8sf_scale_to_float(
            codes, swizzle_scales(scales).reshape(-1).contiguous(), one, 32, 0, True),
        "mxfp4_dequantize_host (linear)": lambda: flashinfer.mxfp4_dequantize_host(codes, scales, 32),
        "_e2m1_and_ufp8sf_scale_to_float_cpu (pure torch)": lambda: F._e2m1_and_ufp8sf_scale_to_float_cpu(
            codes, scales.reshape(m, -1), None, 32, 0, False),
    }
    for name, fn in runs.items():
        try:
            got = fn().float().cpu().reshape(ref.shape)
            diff = int((got != ref).sum())
            record(f"flashinfer decode of our bytes: {name}", diff == 0, f"{diff} of {ref.numel()} values differ")
        except Exception as exc:  # noqa: BLE001
            record(f"flashinfer decode of our bytes: {name}", False, describe_exc(exc))


# ---------------------------------------------------------------- non-finite input (reported, not compared)


def nonfinite_report(ptx: Ptx, cuda: bool, fi_ok: bool) -> None:
    from common import NonFiniteError, quantize

    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    x[0, 3], x[0, 40], x[1, 7], x[1, 33] = float("inf"), float("nan"), -float("inf"), 1.0
    rep: dict[str, object] = {"x": "row0: +Inf in block 0, NaN in block 1; row1: -Inf in block 0, 1.0 in block 1"}
    try:
        quantize(x, profile="flashinfer")
        rep["ours_raise"] = "no error (unexpected)"
    except NonFiniteError as exc:
        rep["ours_raise"] = f"NonFiniteError: {exc}"
    q = quantize(x, profile="flashinfer", nonfinite="profile", backend="torch")
    rep["ours_profile"] = {"scales": q.scales.tolist(), "codes_hex": [r.numpy().tobytes().hex() for r in q.codes]}
    amax = x.float().reshape(2, 2, BLOCK).abs().amax(-1)
    s = ptx.mul(amax, ptx.rcp_ftz(torch.tensor([6.0])).expand_as(amax).to(amax.device), ftz=True).cpu()
    rep["model_scale_note"] = (f"amax*rcp(6) = {s.tolist()}: cvt.rp.satfinite.ue8m0 gives 0xFE for Inf (satfinite) "
                               "and 0xFF for NaN; outputScale = ex2.ftz(127-254) = 0, so Inf*0 = NaN elements")
    if cuda and fi_ok and torch.cuda.get_device_capability()[0] >= 10:
        from flashinfer import mxfp4_quantize

        from common.layouts.swizzle import unswizzle_scales

        c, sf = mxfp4_quantize(torch.cat([x, torch.zeros(126, 64, dtype=torch.bfloat16)]).cuda())
        rep["flashinfer_kernel"] = {"scales": unswizzle_scales(sf.view(torch.uint8).cpu().reshape(-1, 4), 128, 2)[:2]
                                    .tolist(), "codes_hex": [r.numpy().tobytes().hex() for r in c[:2].cpu()]}
    results["nonfinite"] = rep
    print("non-finite input (not part of the equality):", json.dumps(rep, indent=1), flush=True)


# ---------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path(os.environ.get("OUT", "out")))
    ap.add_argument("--cpu-dry-run", action="store_true", help="no GPU, no FlashInfer: emulated PTX (smoke test)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    from common import quantize

    cuda = torch.cuda.is_available() and not args.cpu_dry_run
    ptx = Ptx(emulate=not cuda)
    cc = torch.cuda.get_device_capability() if cuda else (0, 0)
    results["env"] = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu (dry run)",
                      "capability": list(cc)}
    print("env:", results["env"], flush=True)
    x, labels, classes = build_inputs()
    m = x.shape[0]
    print(f"inputs: bf16 {tuple(x.shape)}, {m * K // BLOCK} blocks in {len(classes)} classes", flush=True)
    golden: dict[str, torch.Tensor] = {"x": x}

    q = quantize(x, profile="flashinfer", backend="torch")
    ours = (q.codes, q.scales)
    if cuda:
        def _triton():
            qt = quantize(x.cuda(), profile="flashinfer", backend="triton")
            record("ours: triton (cuda) == torch (cpu)", torch.equal(qt.codes.cpu(), q.codes) and
                   torch.equal(qt.scales.cpu(), q.scales))
        guarded("ours triton", _triton)

    # The SM100 kernel model, with this GPU's PTX for its fp32 steps; and the same without flush-to-zero.
    model = guarded("sm100 model", sm100_model, x.cuda() if cuda else x, ptx, True)
    exact = guarded("sm100 model (no ftz)", sm100_model, x.cuda() if cuda else x, ptx, False)
    if model is not None and exact is not None:
        ftz_blocks = ((model[0].reshape(m, -1, 16) != exact[0].reshape(m, -1, 16)).any(-1) | (model[1] != exact[1]))
        amax = x.float().reshape(m, -1, BLOCK).abs().amax(-1)
        record("ftz-affected blocks all have amax < 6*2^-123", bool((amax[ftz_blocks] < 6 * 2.0**-123).all()),
               f"{int(ftz_blocks.sum())} blocks differ between the model with and without flush-to-zero")
        golden.update({"model.codes": model[0], "model.scales": model[1], "model.exact.codes": exact[0],
                       "model.exact.scales": exact[1], "model.ftz_blocks": ftz_blocks.to(torch.uint8)})
        results["table_model_vs_ours"] = compare("sm100 model (fast-math, as built) vs ours", x, labels, classes,
                                                 ours, model, skip=ftz_blocks)
        results["table_model_ftz_blocks"] = compare("sm100 model without ftz vs ours, ftz-affected blocks only", x,
                                                    labels, classes, ours, exact, skip=~ftz_blocks)
        golden["ptx.rcp6"] = ptx.rcp_ftz(torch.tensor([6.0])).cpu()
        e = torch.arange(-127, 128, dtype=torch.float32)
        golden["ptx.ex2_in"], golden["ptx.ex2_ftz_out"] = e, ptx.ex2(e, ftz=True).cpu()
        r6 = golden["ptx.rcp6"]
        exact6 = torch.tensor([1 / 6.0], dtype=torch.float32)
        record("rcp.approx.ftz.f32(6) == fl(1/6)", torch.equal(r6, exact6),
               f"{r6.view(torch.int32).item():#010x} vs {exact6.view(torch.int32).item():#010x}")
        normal = e >= -126
        record("ex2.approx.ftz.f32(n) == 2^n for n in [-126, 127]",
               torch.equal(golden["ptx.ex2_ftz_out"][normal], torch.exp2(e.double()[normal]).float()))
        if cuda:  # a larger random sweep, GPU only (not in the golden)
            g = torch.Generator().manual_seed(5)
            xl = (torch.randn(1024, K, generator=g) * torch.exp2(torch.randint(-60, 60, (1024, 1), generator=g)
                                                                  .float())).to(torch.bfloat16)
            ql = quantize(xl.cuda(), profile="flashinfer", backend="triton")
            ml = sm100_model(xl.cuda(), ptx, True)
            record("sm100 model == ours on 1024x256 random rows (2^-60..2^60)",
                   torch.equal(ml[0], ql.codes.cpu()) and torch.equal(ml[1], ql.scales.cpu()))

    fi_ok = False
    if cuda:
        try:
            import flashinfer

            results["env"]["flashinfer"] = flashinfer.__version__
            results["env"]["flashinfer_path"] = str(pathlib.Path(flashinfer.__file__).parent)
            print(f"flashinfer {flashinfer.__version__} from {results['env']['flashinfer_path']}", flush=True)
            arch = f"{cc[0]}{cc[1]}"
            fi_ok = build_jit(arch, BUDGET_S - elapsed() - 45.0)
        except Exception as exc:  # noqa: BLE001
            record("import flashinfer", False, describe_exc(exc))
        if fi_ok and model is not None:
            guarded("flashinfer kernel", flashinfer_kernel, x, labels, classes, ours, model, cc, golden)
        if fi_ok:
            guarded("flashinfer decode", flashinfer_decode, ours)
    guarded("non-finite report", nonfinite_report, ptx, cuda, fi_ok)

    meta = {"source": "scripts/gpu/flashinfer_quantize.py", "device": results["env"]["device"],
            "capability": json.dumps(list(cc)), "flashinfer": str(results["env"].get("flashinfer", "")),
            "classes": json.dumps(classes), "kernel_ran": "1" if "kernel.codes" in golden else "0",
            "dry_run": "1" if not cuda else "0"}
    golden["labels"] = torch.tensor([classes.index(c) for c in labels], dtype=torch.uint8).reshape(m, -1)
    path = args.out / "flashinfer_mxfp4_quantize.safetensors"
    save_file({k: v.contiguous() for k, v in golden.items()}, str(path), metadata=meta)
    (args.out / "flashinfer_quantize_summary.json").write_text(json.dumps(results, indent=1, default=str))
    n_ok = sum(1 for v in results.values() if isinstance(v, dict) and v.get("ok") is True)
    n_x = sum(1 for v in results.values() if isinstance(v, dict) and v.get("expected_failure"))
    print(f"\nwrote {path} ({path.stat().st_size / 1024:.0f} KB); {n_ok} passed, {n_x} expected failures, "
          f"{len(failures)} failed; {elapsed():.0f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

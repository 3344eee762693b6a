"""On a lent CUDA GPU: check our FlashInfer TRT-LLM layout conversion and our MXFP8 quantizer against FlashInfer's
own helpers, byte for byte, and write the small golden files that the CPU tests in CI compare against.

FlashInfer is not a dependency of this project; the GPU machine gets it carried in (see docs/backends.md):
    pip install --no-index --no-deps --target /tmp/site .devbundle/flashinfer/apache_tvm_ffi-*.whl
    tar xJf .devbundle/flashinfer/fi_slim.tar.xz -C /tmp/site      # flashinfer-python 0.7.2.post1, trimmed
    PYTHONPATH=/tmp/site:. python3 scripts/gpu_flashinfer_golden.py --out $OUT
Writes flashinfer_layout.safetensors, flashinfer_mxfp8.safetensors and summary.json into --out; every comparison is
printed and a mismatch makes the exit status 1 (after all files are written).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import pathlib
import sys
import time
import traceback

import torch
from safetensors.torch import save_file

from common import quantize_mxfp8
from common.layouts import flashinfer_trtllm as L
from common.layouts.swizzle import swizzle_scales

TILE = L.EPILOGUE_TILE_M
LAYOUT_SHAPES = {"tiny": (2, 64, 128), "aligned": (1, 128, 256), "large": (4, 256, 512)}  # (E, I, H)
SEEDS = {"tiny": 1, "aligned": 2, "large": 3}
GOLDEN_LAYOUT = ("tiny", "aligned")  # "large" is compared on the GPU only (keeps the goldens to a few KB)
SWIZZLE_SHAPES = ((2, 96, 3), (1, 256, 8), (3, 130, 5))
results: dict[str, object] = {}
failures: list[str] = []


def record(name: str, ok: bool, detail: str = "") -> None:
    results[name] = {"ok": bool(ok), "detail": detail}
    print(f"{'OK  ' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        failures.append(name)


def _canonical(e: int, i: int, h: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u8 = lambda *s: torch.randint(0, 256, s, generator=g, dtype=torch.uint8)  # noqa: E731
    scale = lambda *s: torch.randint(0, 255, s, generator=g, dtype=torch.uint8)  # noqa: E731  0..254: no NaN byte
    return {"w13_weight": u8(e, 2 * i, h // 2), "w13_weight_scale": scale(e, 2 * i, h // 32),
            "w2_weight": u8(e, h, i // 2), "w2_weight_scale": scale(e, h, i // 32),
            "w13_bias": torch.randn(e, 2 * i, generator=g), "w2_bias": torch.randn(e, h, generator=g)}


def flashinfer_w3w1_path(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FlashInfer's w3_w1 helpers as vLLM's TRT-LLM MoE preparers call them (swap to [w3; w1] first)."""
    from flashinfer.fused_moe.core import _maybe_get_cached_w3_w1_permute_indices, get_w2_permute_indices_with_cache

    cache: dict = {}
    swap = lambda t: torch.cat(t.chunk(2, dim=-2)[::-1], dim=-2)  # noqa: E731  [w1; w3] -> [w3; w1]
    out: dict[str, list] = {k: [] for k in (*p, "w13_scale_rows", "w2_scale_rows")}
    for x in range(p["w13_weight"].shape[0]):
        w31, s31 = swap(p["w13_weight"][x]).cuda(), swap(p["w13_weight_scale"][x]).cuda()
        b31 = swap(p["w13_bias"][x].reshape(-1, 1)).cuda()
        idx = _maybe_get_cached_w3_w1_permute_indices(cache, w31, TILE)
        out["w13_weight"].append(w31[idx.cuda()])
        sidx = _maybe_get_cached_w3_w1_permute_indices(cache, s31, TILE, num_elts_per_sf=16)
        out["w13_scale_rows"].append(s31[sidx.cuda()].contiguous())  # before the swizzle: needs no JIT kernel
        out["w13_weight_scale"].append(_interleave(out["w13_scale_rows"][-1]))
        out["w13_bias"].append(b31[_maybe_get_cached_w3_w1_permute_indices(cache, b31, TILE).cuda()].reshape(-1))
        w2, s2 = p["w2_weight"][x].cuda(), p["w2_weight_scale"][x].cuda()
        b2 = p["w2_bias"][x].reshape(-1, 1).cuda()
        out["w2_weight"].append(w2[get_w2_permute_indices_with_cache(cache, w2, TILE).cuda()])
        s2i = get_w2_permute_indices_with_cache(cache, s2, TILE, num_elts_per_sf=16)
        out["w2_scale_rows"].append(s2[s2i.cuda()].contiguous())
        out["w2_weight_scale"].append(_interleave(out["w2_scale_rows"][-1]))
        out["w2_bias"].append(b2[get_w2_permute_indices_with_cache(cache, b2, TILE).cuda()].reshape(-1))
    return {k: torch.stack(v).cpu() for k, v in out.items()}


def _interleave(t: torch.Tensor) -> torch.Tensor:
    """block_scale_interleave, or an empty tensor when its JIT module failed to build (reported separately)."""
    from flashinfer import block_scale_interleave

    try:
        return block_scale_interleave(t)
    except Exception as exc:  # noqa: BLE001
        record("block_scale_interleave ran", False, repr(exc)[:300])
        return t.new_empty(0)


def flashinfer_shuffle_api(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The public shuffle_matrix_a / shuffle_matrix_sf_a on w2 (no gated reorder), per expert."""
    from flashinfer import shuffle_matrix_a, shuffle_matrix_sf_a

    w = [shuffle_matrix_a(p["w2_weight"][x].cuda(), TILE).cpu() for x in range(p["w2_weight"].shape[0])]
    s = [shuffle_matrix_sf_a(p["w2_weight_scale"][x].cuda(), TILE, num_elts_per_sf=32).cpu()
         for x in range(p["w2_weight"].shape[0])]
    return {"w2_weight": torch.stack(w), "w2_weight_scale": torch.stack(s)}


def ours(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    o = {}
    o["w13_weight"], s13 = L.to_trtllm_w13(p["w13_weight"], p["w13_weight_scale"])
    o["w2_weight"], s2 = L.to_trtllm_w2(p["w2_weight"], p["w2_weight_scale"])
    o["w13_weight_scale"], o["w2_weight_scale"] = s13.flatten(-2), s2.flatten(-2)  # FlashInfer returns flat bytes
    o["w13_bias"], o["w2_bias"] = L.to_trtllm_w13_bias(p["w13_bias"]), L.to_trtllm_w2_bias(p["w2_bias"])
    return o


def check_layouts(golden: dict[str, torch.Tensor]) -> None:
    for tag, (e, i, h) in LAYOUT_SHAPES.items():
        p = _canonical(e, i, h, seed=SEEDS[tag])
        fi, mine = flashinfer_w3w1_path(p), ours(p)
        for k in p:
            ok = fi[k].numel() == mine[k].numel() and torch.equal(fi[k].reshape(mine[k].shape), mine[k])
            record(f"layout/{tag}/{k}", ok, f"E={e} I={i} H={h} shape={tuple(mine[k].shape)}")
        record(f"layout/{tag}/w13 scale rows", torch.equal(fi["w13_scale_rows"],
                                                           L.gate_up_to_kernel_rows(p["w13_weight_scale"])))
        record(f"layout/{tag}/w2 scale rows", torch.equal(fi["w2_scale_rows"], L.shuffle_rows(p["w2_weight_scale"])))
        try:
            api = flashinfer_shuffle_api(p)
            record(f"layout/{tag}/shuffle_matrix_a(w2)", torch.equal(api["w2_weight"], mine["w2_weight"]))
            record(f"layout/{tag}/shuffle_matrix_sf_a(w2 scales)",
                   torch.equal(api["w2_weight_scale"].reshape(mine["w2_weight_scale"].shape), mine["w2_weight_scale"]))
        except Exception as exc:  # noqa: BLE001 - needs the JIT swizzle kernel
            record(f"layout/{tag}/shuffle api ran", False, repr(exc)[:300])
        if tag in GOLDEN_LAYOUT:
            golden.update({f"{tag}.in.{k}": v.contiguous() for k, v in p.items()})
            golden.update({f"{tag}.flashinfer.{k}": v.contiguous() for k, v in fi.items() if v.numel()})


def check_swizzle(golden: dict[str, torch.Tensor]) -> None:
    from flashinfer import block_scale_interleave

    g = torch.Generator().manual_seed(7)
    for e, m, k in SWIZZLE_SHAPES:
        s = torch.randint(0, 255, (e, m, k), generator=g, dtype=torch.uint8)
        fi = block_scale_interleave(s.cuda()).cpu()
        mine = swizzle_scales(s).flatten()
        record(f"swizzle/{e}x{m}x{k}", torch.equal(fi, mine), f"flat {tuple(fi.shape)} vs {tuple(mine.shape)}")
        golden[f"swizzle.{e}x{m}x{k}.in"], golden[f"swizzle.{e}x{m}x{k}.flashinfer"] = s, fi


def mxfp8_inputs() -> torch.Tensor:
    """bf16 [rows, 256]: random rows over many magnitudes, then adversarial blocks (amax on/next to 448*2^k,
    e4m3 rounding midpoints, zeros, bf16 subnormals, bf16 max)."""
    g = torch.Generator().manual_seed(11)
    rows = [torch.randn(64, 256, generator=g) * torch.exp2(torch.randint(-40, 40, (64, 1), generator=g).float())]
    adv = []
    for k in range(-126, 120, 3):
        base = 448.0 * 2.0**k
        for amax in (base, base * (1 + 2**-7), base * (1 - 2**-8), base * 1.5):
            blk = torch.linspace(-1, 1, 32, dtype=torch.float64) * amax
            blk[5] = amax
            adv.append(blk)
    mids = torch.tensor([(1 + (2 * m + 1) / 16) * 2.0**e for e in range(-6, 8) for m in range(7)], dtype=torch.float64)
    for j in range(0, mids.numel(), 31):
        blk = torch.zeros(32, dtype=torch.float64)
        seg = mids[j:j + 31]
        blk[:seg.numel()] = seg
        blk[31] = 448.0
        adv.append(blk)
    adv.append(torch.zeros(32, dtype=torch.float64))
    adv.append(torch.full((32,), 2.0**-133, dtype=torch.float64))  # bf16 subnormals
    adv.append(torch.full((32,), 3.3895313892515355e38, dtype=torch.float64))  # bf16 max
    a = torch.stack(adv)
    a = torch.cat([a, torch.zeros((-a.shape[0]) % 8, 32, dtype=torch.float64)])
    rows.append(a.reshape(-1, 256).float())
    return torch.cat(rows).to(torch.bfloat16)


def rcp_approx_ftz(x: torch.Tensor) -> torch.Tensor:
    """rcp.approx.ftz.f32 on the GPU (what FlashInfer's cvt_warp_fp16_to_mxfp8 uses for 1/448 and 1/scale)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _k(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + offs, mask=offs < n)
        r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [v], dtype=tl.float32, is_pure=True, pack=1)
        tl.store(y_ptr + offs, r, mask=offs < n)

    xc = x.float().cuda().contiguous()
    y = torch.empty_like(xc)
    _k[(triton.cdiv(xc.numel(), 256),)](xc, y, xc.numel(), BLOCK=256)
    return y.cpu()


def check_mxfp8(golden: dict[str, torch.Tensor]) -> None:
    from flashinfer import mxfp8_quantize

    x = mxfp8_inputs()
    golden["mxfp8.x"] = x
    pows = torch.exp2(torch.arange(-127, 128, dtype=torch.float64)).float()
    golden["mxfp8.rcp_in"] = torch.cat([torch.tensor([448.0, 6.0]), pows])
    golden["mxfp8.rcp_out"] = rcp_approx_ftz(golden["mxfp8.rcp_in"])
    r448 = golden["mxfp8.rcp_out"][0]
    exact = torch.tensor(1 / 448.0, dtype=torch.float32)
    record("mxfp8/rcp.approx.ftz(448) == fl(1/448)", bool(r448 == exact),
           f"{r448.view(torch.int32).item():#010x} vs {exact.view(torch.int32).item():#010x}")
    e_ref, s_ref = quantize_mxfp8(x, profile="flashinfer", backend="torch")
    try:
        e_tri, s_tri = quantize_mxfp8(x.cuda(), profile="flashinfer", backend="triton")
        record("mxfp8/ours torch == ours triton", torch.equal(e_ref.view(torch.uint8), e_tri.cpu().view(torch.uint8))
               and torch.equal(s_ref, s_tri.cpu()))
    except Exception as exc:  # noqa: BLE001 - the FlashInfer comparisons below do not need it
        record("mxfp8/ours triton ran", False, repr(exc)[:300])
    for tag, inp in (("host", lambda: x.float()), ("cuda", lambda: x.cuda())):  # host: TRT-LLM's C++ reference
        try:
            _compare_mxfp8(tag, mxfp8_quantize(inp(), is_sf_swizzled_layout=False), e_ref, s_ref, golden)
        except Exception as exc:  # noqa: BLE001 - report whatever this FlashInfer path does on Hopper
            record(f"mxfp8/flashinfer {tag} ran", False, repr(exc)[:300])


def _compare_mxfp8(tag, fi, e_ref, s_ref, golden) -> None:
    fe, fs = fi[0].cpu().view(torch.uint8).reshape(e_ref.shape), fi[1].cpu().reshape(s_ref.shape)
    golden[f"mxfp8.{tag}.elements"], golden[f"mxfp8.{tag}.scales"] = fe.contiguous(), fs.contiguous()
    se, ss = fe != e_ref.view(torch.uint8), fs != s_ref
    detail = f"element bytes differing {int(se.sum())}/{se.numel()}, scale bytes differing {int(ss.sum())}/{ss.numel()}"
    if ss.any():
        r, c = (int(v) for v in ss.nonzero()[0])
        blk = golden["mxfp8.x"][r, c * 32:(c + 1) * 32].float()
        detail += f"; first scale diff row {r} block {c}: amax={blk.abs().max().item()!r} ours={int(s_ref[r, c])} " \
                  f"flashinfer={int(fs[r, c])}"
    record(f"mxfp8/flashinfer {tag} == ours", not (se.any() or ss.any()), detail)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=pathlib.Path)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import flashinfer
    from flashinfer.quantization.fp4_quantization import get_fp4_quantization_module
    from flashinfer.quantization.fp8_quantization import get_mxfp8_quantization_sm100_module

    major, minor = torch.cuda.get_device_capability()
    results["env"] = {"flashinfer": flashinfer.__version__, "torch": torch.__version__,
                      "device": torch.cuda.get_device_name(), "capability": [major, minor]}
    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # the two JIT builds are independent: overlap them
        jobs = {"fp4_quantization": pool.submit(get_fp4_quantization_module, f"{major}{minor}"),
                "mxfp8_quantization": pool.submit(get_mxfp8_quantization_sm100_module)}
        for name, j in jobs.items():
            try:
                j.result()
                record(f"jit/{name}", True)
            except Exception as exc:  # noqa: BLE001 - the index-only checks still run
                record(f"jit/{name}", False, str(exc)[-1500:])
    print(f"JIT builds {time.time() - t0:.0f} s", flush=True)
    layout, mx = {}, {}
    for fn, store in ((check_layouts, layout), (check_swizzle, layout), (check_mxfp8, mx)):
        try:
            fn(store)
        except Exception:  # noqa: BLE001 - keep going: every section's verdict is reported
            record(f"{fn.__name__} crashed", False, traceback.format_exc()[-1500:])
    save_file({k: v.contiguous() for k, v in layout.items()}, str(args.out / "flashinfer_layout.safetensors"))
    save_file({k: v.contiguous() for k, v in mx.items()}, str(args.out / "flashinfer_mxfp8.safetensors"))
    (args.out / "summary.json").write_text(json.dumps(results, indent=1))
    print(f"{len(results) - 1 - len(failures)} passed, {len(failures)} failed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

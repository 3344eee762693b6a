"""Codec kernel throughput as a fraction of device-to-device copy bandwidth (issue 2, item 7).

    python bench/codec.py [--gib 1.0] [--profile flashinfer] [--all-profiles] [--sweep] [--out DIR] [--md PATH]

For a bf16 tensor of --gib GiB ([rows, 8192]) it times, with triton.testing.do_bench medians in one process:
  copy            dst.copy_(x)                       bytes = read x + write x
  quantize_mxfp4  x -> codes + scales                bytes = read x + write codes + scales
  dequantize      codes + scales -> bf16             bytes = read codes + scales + write bf16
  quantize_mxfp8  x -> e4m3 + scales                 bytes = read x + write elements + scales
GB/s = bytes / median time; ratio = kernel GB/s / copy GB/s (target >= 0.8). --sweep times every launch
configuration (blocks of 32 per program x warps) and reports the best; without it the defaults of
common/kernels/params.py are used. The best configuration's output is then checked byte for byte against the
pure-torch reference on the whole tensor (in chunks). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch

try:
    from tqdm import tqdm
except ImportError:  # the GPU image may lack tqdm; the bench only uses it for progress
    def tqdm(it, **_):
        return it

COLS = 8192
# (scale blocks per program, warps): 4 to 64 elements per thread, the range where a memory-bound kernel keeps
# enough loads in flight without spilling.
SWEEP = ((16, 2), (32, 2), (32, 4), (64, 4), (64, 8), (128, 4), (128, 8), (256, 8), (256, 16), (512, 16))


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=1.0, help="size of the bf16 input in GiB (default 1)")
    p.add_argument("--profile", default="flashinfer", help="MXFP4 profile to time (default flashinfer)")
    p.add_argument("--all-profiles", action="store_true", help="also time quantize_mxfp4 for every profile")
    p.add_argument("--sweep", action="store_true", help="time every (blocks, num_warps) configuration")
    p.add_argument("--out", default=None, help="directory for codec.json")
    p.add_argument("--ptx", action="store_true", help="also save the PTX of every compiled kernel under --out")
    p.add_argument("--md", default=None, help="write the markdown results table to this file")
    return p.parse_args()


def _bench(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median"))


def _kernels(x: torch.Tensor, profile):
    """name -> (callable(blocks, warps) -> outputs, bytes moved)."""
    from common.kernels import dequantize_mxfp4_triton, quantize_mxfp4_triton, quantize_mxfp8_triton

    codes, scales = quantize_mxfp4_triton(x, profile)
    nx, nq = x.numel() * x.element_size(), codes.numel() + scales.numel()
    return {
        "quantize_mxfp4": (lambda b, w: quantize_mxfp4_triton(x, profile, blocks=b, num_warps=w), nx + nq),
        "dequantize_mxfp4": (lambda b, w: dequantize_mxfp4_triton(codes, scales, torch.bfloat16, blocks=b,
                                                                  num_warps=w), nq + nx),
        "quantize_mxfp8": (lambda b, w: quantize_mxfp8_triton(x, profile, blocks=b, num_warps=w),
                           nx + x.numel() + scales.numel()),
    }


def _time_kernel(name, fn, nbytes, configs) -> dict:
    rows = []
    for blocks, warps in tqdm(configs, desc=name, leave=False):
        ms = _bench(lambda: fn(blocks, warps))
        rows.append({"blocks": blocks, "num_warps": warps, "ms": ms, "GBps": nbytes / ms / 1e6})
    best = min(rows, key=lambda r: r["ms"])
    return {"name": name, "bytes": nbytes, "best": best, "sweep": rows}


def _verify(x: torch.Tensor, profile, kernels: dict, results: dict, chunk_rows: int = 4096) -> dict:
    """Best configurations vs the pure-torch reference on the whole tensor, chunk by chunk (torch.equal)."""
    from common import reference

    def run_best(name):
        best = results[name]["best"]
        return kernels[name][0](best["blocks"], best["num_warps"])

    q4, dq, q8 = run_best("quantize_mxfp4"), run_best("dequantize_mxfp4"), run_best("quantize_mxfp8")
    ok4 = okd = ok8 = True
    for r0 in tqdm(range(0, x.shape[0], chunk_rows), desc="verify", leave=False):
        sl = slice(r0, r0 + chunk_rows)
        rc, rs = reference.quantize_mxfp4(x[sl], profile, nonfinite="profile")
        ok4 &= torch.equal(q4[0][sl], rc) and torch.equal(q4[1][sl], rs)
        ref_dq = reference.dequantize_mxfp4(rc, rs, torch.bfloat16)
        okd &= torch.equal(dq[sl].view(torch.int16), ref_dq.view(torch.int16))
        e, s = reference.quantize_mxfp8(x[sl], profile, nonfinite="profile")
        ok8 &= torch.equal(q8[0][sl].view(torch.uint8), e.view(torch.uint8)) and torch.equal(q8[1][sl], s)
    return {"quantize_mxfp4": ok4, "dequantize_mxfp4": okd, "quantize_mxfp8": ok8}


def _dump_ptx(out_dir: str) -> None:
    """Save the PTX of every compiled codec kernel (instruction counts guide the tuning)."""
    from common.kernels import _dequantize, _quantize

    for kern in (_quantize._quantize_mxfp4_kernel, _quantize._quantize_mxfp8_kernel,
                 _dequantize._dequantize_mxfp4_kernel):
        for dev_cache in getattr(kern, "device_caches", {}).values():
            cache = dev_cache[0] if isinstance(dev_cache, tuple) else dev_cache
            for i, compiled in enumerate(cache.values()):
                ptx = compiled.asm.get("ptx")
                if ptx:
                    meta = f"w{compiled.metadata.num_warps}"
                    with open(os.path.join(out_dir, f"{kern.fn.__name__}_{i}_{meta}.ptx"), "w") as f:
                        f.write(ptx)


def _markdown(res: dict) -> str:
    env = res["env"]
    lines = [
        f"### {env['device']} — {env['date']}",
        "",
        f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; input bf16 [{env['rows']}, {COLS}] "
        f"= {env['gib']:g} GiB; profile `{res['profile']}`; medians of triton.testing.do_bench.",
        "",
        "| kernel | blocks/program | warps | ms | GB/s | ratio to copy | bytes == reference |",
        "|---|---|---|---|---|---|---|",
        f"| copy (dst.copy_(x)) | - | - | {res['copy']['ms']:.4f} | {res['copy']['GBps']:.0f} | 1.00 | - |",
    ]
    for name in ("quantize_mxfp4", "dequantize_mxfp4", "quantize_mxfp8"):
        b = res["kernels"][name]["best"]
        ok = res["verified"].get(name, "not checked")
        lines.append(f"| {name} | {b['blocks']} | {b['num_warps']} | {b['ms']:.4f} | {b['GBps']:.0f} | "
                     f"{b['GBps'] / res['copy']['GBps']:.2f} | {ok} |")
    for name, row in res.get("profiles", {}).items():
        lines.append(f"| quantize_mxfp4 [{name}] | {row['blocks']} | {row['num_warps']} | {row['ms']:.4f} | "
                     f"{row['GBps']:.0f} | {row['GBps'] / res['copy']['GBps']:.2f} | - |")
    return "\n".join(lines) + "\n"


def main() -> int:
    args = _parse()
    if not torch.cuda.is_available():
        print("bench/codec.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    from common import get_profile, profile_names
    from common.kernels import params, quantize_mxfp4_triton

    profile = get_profile(args.profile)
    rows = int(args.gib * 2**30 / 2 / COLS)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, COLS, device="cuda", dtype=torch.bfloat16, generator=gen)
    x *= torch.exp2(torch.randint(-30, 30, (rows, 1), device="cuda", generator=gen).to(torch.bfloat16))
    dst = torch.empty_like(x)
    nbytes_x = x.numel() * x.element_size()
    copy_ms = _bench(lambda: dst.copy_(x))
    res = {
        "env": {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
                "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                "python": platform.python_version(), "rows": rows, "gib": nbytes_x / 2**30},
        "profile": profile.name,
        "copy": {"ms": copy_ms, "GBps": 2 * nbytes_x / copy_ms / 1e6},
        "kernels": {},
    }
    kernels = _kernels(x, profile)
    for name, (fn, nbytes) in kernels.items():
        configs = list(SWEEP) if args.sweep else [params.GPU_CONFIG[name]]
        res["kernels"][name] = _time_kernel(name, fn, nbytes, configs)
        best = res["kernels"][name]["best"]
        print(f"{name}: best blocks={best['blocks']} warps={best['num_warps']} {best['ms']:.4f} ms "
              f"{best['GBps']:.0f} GB/s = {best['GBps'] / res['copy']['GBps']:.3f} x copy", flush=True)
    res["verified"] = _verify(x, profile, kernels, res["kernels"])
    if args.all_profiles:
        best = res["kernels"]["quantize_mxfp4"]["best"]
        b, w = best["blocks"], best["num_warps"]
        nbytes = kernels["quantize_mxfp4"][1]
        res["profiles"] = {}
        for name in profile_names():
            ms = _bench(lambda: quantize_mxfp4_triton(x, get_profile(name), blocks=b, num_warps=w))
            res["profiles"][name] = {"blocks": b, "num_warps": w, "ms": ms, "GBps": nbytes / ms / 1e6}
    md = _markdown(res)
    print(md)
    print(json.dumps(res["verified"]))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "codec.json"), "w") as f:
            json.dump(res, f, indent=1)
        try:
            if args.ptx:
                _dump_ptx(args.out)
        except Exception as exc:  # the cache layout differs between triton releases; PTX is only a diagnostic
            print(f"PTX not saved: {exc!r}")
    if args.md:
        with open(args.md, "w") as f:
            f.write(md)
    return 0 if all(res["verified"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

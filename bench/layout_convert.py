"""Canonical <-> kb-major code conversion on the GPU: the one-pass Triton kernel vs the torch ops it replaced.

    python bench/layout_convert.py            # DeepSeek-V4-Flash per-GPU expert weights (32 x 4096 x 2048)

Both directions, do_bench medians, bytes equal checked first; GB/s counts the bytes read plus the bytes written.
The engine converts whole weights on every sync (staged bytes in, served bytes back for the diff, the read-back
check and the hashes), so this is the refit's floor for a kb-major (hopper_triton) engine."""

from __future__ import annotations

import argparse

import torch
import triton.testing

from common.grouped_gemm.layout import from_kb_major, from_kb_major_torch, to_kb_major, to_kb_major_torch

SHAPES = {"w13": (32, 4096, 2048), "w2": (32, 4096, 1024)}  # [E, N, K/2] (E: --experts): gate/up, down


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=32)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}: canonical <-> kb-major, do_bench medians")
    print("| weight | MB | direction | torch ms | kernel ms | speed-up | kernel GB/s | bytes equal |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (_, n, kh) in SHAPES.items():
        codes = torch.randint(0, 256, (args.experts, n, kh), dtype=torch.uint8, device="cuda")
        mb = codes.numel() / 1e6
        kb = to_kb_major(codes)
        for direction, fast, slow, x in (("to kb-major", to_kb_major, to_kb_major_torch, codes),
                                         ("to canonical", from_kb_major, from_kb_major_torch, kb)):
            equal = torch.equal(fast(x), slow(x))
            t_slow = triton.testing.do_bench(lambda: slow(x), warmup=5, rep=50)
            t_fast = triton.testing.do_bench(lambda: fast(x), warmup=25, rep=200)
            print(f"| {name} | {mb:.0f} | {direction} | {t_slow:.2f} | {t_fast:.3f} | {t_slow / t_fast:.0f}x | "
                  f"{2 * mb / t_fast:.0f} | {equal} |")
        del codes, kb
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

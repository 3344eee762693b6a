#!/usr/bin/env python3
"""Probe: do TMA tensor descriptors (and Triton 3.6's Hopper warp specialization) lift the learner's large-batch
GEMMs toward cuBLAS? A plain grouped forward y = x_e @ W_e^T at DeepSeek-V4-Flash 4096 tokens (768 rows per expert,
the shapes of the down GEMM and of w13 without its activation), timed (do_bench medians, one GPU) as:
cuBLAS `torch._grouped_mm` on the dequantized bf16 weights; ours (`grouped_mm_mxfp4`, pointer loads, autotuned);
a bf16 control kernel whose activation and weight tiles come through tensor descriptors (TMA); and the MXFP4 byte
decode with the activation and code tiles through descriptors (scales by pointer: a row's 2-4 scale bytes are
below TMA's 16-byte box minimum), with and without `warp_specialize`. Failures to compile are reported per row.
GPU only: the interpreter reads bf16 descriptors as integers. Results: bench/RESULTS.md, eighth round.
usage: python bench/tma_probe.py
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from common.grouped_gemm._tiles import DECODE_BF16X2, DECODE_BITS, _dequant_tile, _dot_xwt, _load_scales, _tile_rows
from common.grouped_gemm import TileConfig, grouped_mm_mxfp4


@triton.jit
def k_tma(x_desc, w_desc, scales_ptr, offsets_ptr, y_ptr, N, K, E, stride_se, stride_sn, stride_ym,
          E_POW2: tl.constexpr, MX: tl.constexpr, SWAP_AB: tl.constexpr, WS: tl.constexpr, STAGES: tl.constexpr,
          DECODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y tile = x_e @ W_e^T with the x and weight tiles loaded through descriptors: w_desc over bf16 weights
    [E * N, K], or with MX over MXFP4 codes [E * N, K / 2] (scales by pointer, byte decode in registers)."""
    expert, row0, row_end = _tile_rows(offsets_ptr, tl.program_id(0), E, E_POW2, BLOCK_M)
    if expert >= E:
        return
    n0 = tl.program_id(1) * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    wrow = expert * N + n0
    s_ptr = scales_ptr + expert.to(tl.int64) * stride_se
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES, warp_specialize=WS):
        a = x_desc.load([row0, k0])
        if MX:
            s = _load_scales(s_ptr, cols, col_ok, k0, K, stride_sn, BLOCK_K, True)
            w = _dequant_tile(w_desc.load([wrow, k0 // 2]), s, BLOCK_N, BLOCK_K, DECODE)
        else:
            w = w_desc.load([wrow, k0])
        acc = _dot_xwt(a, w, acc, SWAP_AB, False)
    if SWAP_AB:
        acc = tl.trans(acc)
    rows = row0 + tl.arange(0, BLOCK_M)
    mask = (rows < row_end)[:, None] & col_ok[None, :]
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :], acc.to(tl.bfloat16), mask=mask)


def _alloc(size, align, stream):  # scratch for device-side descriptors (none here; Triton asks for an allocator)
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _launch(x, offs, w_desc, scales, mx, y, n, k, e, cfg, ws, decode):
    bm, bn, bk, nw, ns, swap = cfg
    grid = (triton.cdiv(x.shape[0], bm) + e, triton.cdiv(n, bn))
    k_tma[grid](TensorDescriptor.from_tensor(x, [bm, bk]), w_desc, scales, offs, y, n, k, e, scales.stride(0),
                scales.stride(1), y.stride(0), E_POW2=triton.next_power_of_2(e), MX=mx, SWAP_AB=swap, WS=ws,
                STAGES=ns, DECODE=decode, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)
    return y


def run_bf16(x, offs, w, scales, cfg, ws, y):
    e, n, k = w.shape
    wd = TensorDescriptor.from_tensor(w.view(e * n, k), [cfg[1], cfg[2]])
    return _launch(x, offs, wd, scales, False, y, n, k, e, cfg, ws, DECODE_BITS)


def run_mx(x, offs, codes, scales, cfg, ws, y, decode):
    e, n, kh = codes.shape
    cd = TensorDescriptor.from_tensor(codes.view(e * n, kh), [cfg[1], cfg[2] // 2])
    return _launch(x, offs, cd, scales, True, y, n, 2 * kh, e, cfg, ws, decode)


def dequant(codes, scales):
    from common.reference import dequantize_mxfp4
    e, n, kh = codes.shape
    w = dequantize_mxfp4(codes.reshape(e * n, kh), scales.reshape(e * n, -1))
    return w.view(e, n, 2 * kh).to(torch.bfloat16)


def main():
    triton.set_allocator(_alloc)
    print(torch.cuda.get_device_name(0), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, e, n, k, rows in (("down", 32, 4096, 2048, 768), ("w13", 32, 4096, 4096, 768)):
        m = e * rows
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        codes = torch.randint(0, 256, (e, n, k // 2), device="cuda", dtype=torch.uint8, generator=gen)
        scales = torch.randint(120, 130, (e, n, k // 32), device="cuda", dtype=torch.uint8, generator=gen)
        offs = torch.arange(0, e + 1, device="cuda", dtype=torch.int32) * rows
        wb = dequant(codes, scales)
        ref = torch.cat([x[i * rows:(i + 1) * rows].float() @ wb[i].float().T for i in range(e)])
        flops = 2.0 * m * n * k
        y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)

        def report(label, fn):
            try:
                out = fn()
                err = ((out.float() - ref).norm() / ref.norm()).item()
                ms = triton.testing.do_bench(fn, warmup=25, rep=100)
                print(f"| {name} | {label} | {ms:.4f} | {flops / ms / 1e9:.1f} | {err:.1e} |", flush=True)
            except Exception as ex:  # a variant Triton cannot compile is a result too
                print(f"| {name} | {label} | FAIL {type(ex).__name__}: {str(ex)[:100]} | | |", flush=True)

        print("| GEMM | variant (tile BM, BN, BK, warps, stages, swap_ab) | ms | TF/s | rel err |\n|---|---|---|---|---|")
        report("cuBLAS torch._grouped_mm bf16", lambda: torch._grouped_mm(x, wb.transpose(1, 2), offs=offs[1:]))
        report("ours, autotuned (pointer loads)", lambda: grouped_mm_mxfp4(x, offs, codes, scales))
        for c in ((256, 128, 64, 8, 3, True), (128, 128, 64, 8, 3, True)):
            report(f"ours {c}", lambda c=c: grouped_mm_mxfp4(x, offs, codes, scales, config=TileConfig(*c)))
        for ws in (False, True):
            for c in ((128, 128, 64, 8, 3, False), (128, 256, 64, 8, 3, False), (128, 256, 64, 8, 4, False),
                      (128, 128, 64, 4, 3, False), (128, 128, 64, 8, 3, True)):
                report(f"bf16 TMA ws={ws} {c}", lambda c=c, ws=ws: run_bf16(x, offs, wb, scales, c, ws, y))
        for ws in (False, True):
            for d, dname in ((DECODE_BITS, "bits"), (DECODE_BF16X2, "bf16x2")):
                for c in ((256, 128, 64, 8, 3, True), (128, 128, 64, 8, 3, True), (128, 128, 64, 8, 3, False),
                          (128, 256, 64, 8, 3, False), (128, 128, 64, 4, 3, True), (128, 128, 128, 8, 3, True)):
                    report(f"mx TMA ws={ws} {dname} {c}",
                           lambda c=c, ws=ws, d=d: run_mx(x, offs, codes, scales, c, ws, y, d))


if __name__ == "__main__":
    main()

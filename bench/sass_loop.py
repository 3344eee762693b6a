#!/usr/bin/env python3
"""SASS instruction count of the forward GEMM's K loop, compiled for sm_90 on any machine (Triton's bundled ptxas
and nvdisasm, no GPU): how the decode's instruction budget is measured (bench/RESULTS.md, seventh round).

Each spec is comma-separated key=value overrides of the engine's decode-size down GEMM (kb-major word decode, one
multiply, 64x128 tile, 16 token rows, 4 warps, 3 stages, weighted scatter, dsv4's N=4096 and K=2048), e.g.
  python bench/sass_loop.py "" "act=1,gather=1" "kb=0"
keys: words kb one_mul act gather scatter bn bk bm nw ns n k (ints; 0/1 for flags).
Prints per spec the K loop's instruction count (the loop that holds the MMAs) and its most frequent opcodes.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.grouped_gemm._kernels import _grouped_fwd_kernel as KERNEL  # noqa: E402
from common.grouped_gemm.aot import compile_sm90  # noqa: E402

DEFAULTS = dict(words=1, kb=1, one_mul=1, act=0, gather=0, scatter=1, bn=64, bk=128, bm=16, nw=4, ns=3, n=4096,
                k=2048)


def compile_sass(o: dict) -> str:
    words, act = bool(o["words"]), int(o["act"])
    rows = 2 * o["n"] if act else o["n"]
    row_units = o["k"] // 8 if words else o["k"] // 2
    # the runtime values the JIT would see, so the divisibility-by-16 specialization matches a real launch
    ints = dict(M=96, N=o["n"], K=o["k"], E=32, ROWS_BUCKET=4, stride_xm=o["k"], stride_ce=rows * row_units,
                stride_cn=rows * (4 if words else 16) if o["kb"] else row_units, stride_se=rows * o["k"] // 32,
                stride_sn=o["k"] // 32, stride_be=0, stride_lhm=0, stride_lwe=0, stride_lwn=0, stride_ym=o["n"],
                stride_pm=2 * o["n"], stride_nfe=0, stride_nfr=0, stride_nhm=0)
    ptrs = dict(x_ptr="*bf16", codes_ptr="*i32" if words else "*u8", scales_ptr="*u8", offsets_ptr="*i32",
                bias_ptr="*bf16", lh_ptr="*bf16", lw_ptr="*bf16", y_ptr="*bf16", pre_ptr="*bf16", src_ptr="*i32",
                dst_ptr="*i32", rw_ptr="*fp32")
    const = dict(ACT=act, ALPHA=1.702, LIMIT=7.0, HAS_BIAS=False, LORA_R=0, SAVE_PRE=False, GATHER=bool(o["gather"]),
                 SCATTER=bool(o["scatter"]), E_POW2=32, F32_DOT=False, DECODE=2, SWAP_AB=True,
                 WORDS=words, ONE_MUL=bool(o["one_mul"]), OUT_ORDER=0,
                 WORD_PAIRS=words and o["nw"] == 4 and o["bn"] >= 64, EVEN_K=True, KB_MAJOR=bool(o["kb"]),
                 PDL=0, GATE_UP_PAIRS=False, BLOCK_M=o["bm"], BLOCK_N=o["bn"], BLOCK_K=o["bk"], NEXT_R=0, NEXT_N=1)
    ck = compile_sm90(KERNEL, const, ptrs, ints, num_warps=o["nw"], num_stages=o["ns"])
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        return subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout


def k_loop(sass: str) -> list[str]:
    """Instructions from the label of the backward branch that closes the loop holding the last MMA, to that
    branch."""
    lines = sass.splitlines()
    instr = [re.match(r"^\s+/\*[0-9a-f]+\*/\s+(.*?)\s*;", ln) for ln in lines]
    last_mma = max(i for i, ln in enumerate(lines) if "HGMMA" in ln)
    for j in range(last_mma, len(lines)):
        branch = re.search(r"BRA\s+`\((\.L_x_\d+)\)", lines[j])
        if branch:
            start = next(i for i, ln in enumerate(lines) if ln.startswith(branch.group(1) + ":"))
            if start < last_mma:
                return [m.group(1) for m in instr[start:j + 1] if m]
    raise SystemExit("no loop around the MMAs found in the SASS")


def main() -> int:
    for spec in sys.argv[1:] or [""]:
        o = dict(DEFAULTS)
        for item in filter(None, spec.split(",")):
            key, _, value = item.partition("=")
            if key not in o:
                raise SystemExit(f"unknown key {key!r}; choose from {sorted(o)}")
            o[key] = int(value)
        body = k_loop(compile_sass(o))
        ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", b).split()[0].split(".")[0] for b in body)
        print(f"[{spec or 'defaults'}] K loop: {len(body)} SASS instructions per thread; {dict(ops.most_common(10))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

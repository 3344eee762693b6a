#!/usr/bin/env python3
"""Three launches of the engine's gated GEMM (KIND=gated, default) or down GEMM (KIND=fwd) at DeepSeek-V4-Flash
EP=8, 16 tokens, with one tile (CFG=block_n,block_k,warps,stages; default 64,256,4,3), for Nsight Compute, e.g.:
ncu --kernel-name regex:_grouped_fwd --launch-skip 2 --launch-count 1 --section SpeedOfLight --section Occupancy
--section WarpStateStats python bench/ncu_gated.py  (MSB=127: one multiply).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe as B  # noqa: E402

from common.grouped_gemm import TileConfig, grouped_mm_mxfp4, grouped_mm_mxfp4_gated, route  # noqa: E402


def main():
    gen = torch.Generator(device="cuda").manual_seed(0)
    s = B.SHAPES["dsv4"]
    w, _ = B.make_weights(s, gen)
    t = 16
    ids = (torch.arange(t * s["k"], device="cuda") % s["E"]).view(t, s["k"])
    r = route(ids, s["E"])
    xt = torch.randn(t, s["H"], device="cuda", dtype=torch.bfloat16, generator=gen)
    bn, bk, nw, ns = (int(v) for v in os.environ.get("CFG", "64,256,4,3").split(","))
    cfg = TileConfig(16, bn, bk, nw, ns, swap_ab=True)
    msb = int(os.environ.get("MSB", "0")) or None
    a = torch.randn(t * s["k"], s["I"], device="cuda", dtype=torch.bfloat16, generator=gen)
    for _ in range(3):
        if os.environ.get("KIND", "gated") == "gated":
            grouped_mm_mxfp4_gated(xt, r.offsets, *w["w13"], activation="silu", gather_rows=r.token, config=cfg,
                                   max_scale_byte=msb)
        else:
            grouped_mm_mxfp4(a, r.offsets, *w["w2"], config=cfg, max_scale_byte=msb)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Three launches of the gated GEMM at DeepSeek-V4-Flash EP=8, 16 tokens, with the autotuner's decode-size tile,
for Nsight Compute, e.g.: ncu --kernel-name regex:_grouped_fwd --launch-skip 2 --launch-count 1 --section
SpeedOfLight --section Occupancy --section WarpStateStats python bench/ncu_gated.py  (MSB=127: one multiply).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe as B  # noqa: E402

from common.grouped_gemm import TileConfig, grouped_mm_mxfp4_gated, route  # noqa: E402


def main():
    gen = torch.Generator(device="cuda").manual_seed(0)
    s = B.SHAPES["dsv4"]
    w, _ = B.make_weights(s, gen)
    t = 16
    ids = (torch.arange(t * s["k"], device="cuda") % s["E"]).view(t, s["k"])
    r = route(ids, s["E"])
    xt = torch.randn(t, s["H"], device="cuda", dtype=torch.bfloat16, generator=gen)
    cfg = TileConfig(16, 128, 128, 4, 3, swap_ab=True)
    msb = int(os.environ.get("MSB", "0")) or None
    for _ in range(3):
        grouped_mm_mxfp4_gated(xt, r.offsets, *w["w13"], activation="silu", gather_rows=r.token, config=cfg,
                               max_scale_byte=msb)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()

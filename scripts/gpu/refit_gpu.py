"""Colocated refit on one GPU, end to end: a vLLM engine (its engine core in its own process, CUDA graphs on, the
hopper_triton backend, expert LoRA served unmerged) and the learner of examples/rl_loop.py in this process, every
sync through vLLM's weight-transfer protocol with our `mxfp4_rl` engine over CUDA IPC (connect(llm,
transport="ipc")). Modes qat, lora (served adapters) and full (experts + attention + a dense o_proj adapter).

    python scripts/gpu/refit_gpu.py OUT.json [--steps 3] [--transport ipc|nccl]

Prints one line per step (floor, hashes, sync kinds and time) and writes the records; exits non-zero when a sync's
hashes differ or a step leaves the step-0 floor (2x, or 1e-5).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--transport", default="ipc")
    ap.add_argument("--modes", default="qat,lora,full")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "examples"))
    import rl_loop as ex

    from mxfp4_train.sync import connect

    work = Path(tempfile.mkdtemp(prefix="mxfp4-refit-gpu-"))
    ckpt = ex.build_checkpoint(work)
    ex.enable_served_lora(ckpt)
    t0 = time.monotonic()
    llm = ex.start_engine(ckpt, cuda_graphs=True, weight_transfer_config={"backend": "mxfp4_rl"})
    print(f"engine up in {time.monotonic() - t0:.0f} s", flush=True)
    refit = connect(llm, transport=args.transport, timeout_s=120)
    cfg = ex.LoopConfig()
    result, ok = {}, True
    for mode in args.modes.split(","):
        records = ex.run_mode(llm, ckpt, mode, args.steps, cfg, syncer=refit)
        floor = records[0]["mean_abs_dlogp"]
        for r in records[1:]:
            ok &= r["mean_abs_dlogp"] <= max(2 * floor, 1e-5)
        ok &= all(r["hashes_equal"] for r in records[:-1])
        result[mode] = records
    refit.close()
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print("REFIT GPU", "OK" if ok else "FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

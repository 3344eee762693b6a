"""The learner side of the parity table for a tiny DeepSeek-V4 in DeepSeek-V4-Flash's shipped format.

    python examples/deepseek_v4_parity.py [--seed 0] [--tokens 64] [--json out.json]
    (the same as `mxfp4-rl demo --model deepseek_v4`; see mxfp4_train/deepseek_v4_demo.py for the rows)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=64, help="continuation length scored by every model")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    from mxfp4_train.deepseek_v4_demo import format_result, run_deepseek_v4_demo

    res = run_deepseek_v4_demo(seed=args.seed, tokens=args.tokens)
    print(format_result(res))
    out = {k: v.as_dict() for k, v in res["rows"].items()} | {"identical": res["identical"]}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()

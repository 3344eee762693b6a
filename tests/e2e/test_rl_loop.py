"""RL loop end to end on one real vLLM engine (CPU, fp32, tiny Qwen3-MoE): examples/rl_loop.py for LoRA and QAT,
then engine-level fault checks on the same engine (one start, ~20 s): a corrupted payload and a profile mismatch are
refused with the parameter named and the served hashes unchanged; a staged but uncommitted (interrupted) sync
changes nothing; requests in flight when a sync starts finish entirely on the old weights and later ones run
entirely on the new ones.

The engine runs in a subprocess (`python -m tests.e2e.test_rl_loop OUT.json`) with its engine core in its own
process too (vLLM's default), which is where the sync's pause-and-drain path runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 420
STEPS = 3


def _example():
    spec = importlib.util.spec_from_file_location("rl_loop_example", ROOT / "examples" / "rl_loop.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


# ---- the scenario, run inside the subprocess ---------------------------------------------------------------------
def _refusals(llm, ex) -> dict:
    """Send bad payloads straight to the worker extension; collect the error messages and the hashes around them."""
    from mxfp4_train import load_mxfp4_model
    from mxfp4_train.sync.client import learner_weights
    from common.moe.wire import PROTOCOL, encode
    from mxfp4_train.sync.wire import expected_hashes

    before = ex.served_hashes(llm)
    model = load_mxfp4_model(llm._rl_ckpt, mode="lora")
    profile, weights = learner_weights(model)
    name, q = next(iter(weights.items()))
    codes = q.codes.clone()
    codes[3, 5, 7] ^= 0x10  # one flipped nibble; the entry keeps the hash of the true bytes
    out = {}
    cases = {
        "corrupted": {"profile": profile, "entries": [{"name": name, "kind": "packed", "codes": codes,
                                                        "scales": q.scales, "hashes": expected_hashes(q, [None])}]},
        "profile": {"profile": "ocp", "entries": [{"name": name, "kind": "packed", "codes": q.codes,
                                                    "scales": q.scales, "hashes": expected_hashes(q, [None])}]},
        "shape": {"profile": profile, "entries": [{"name": name, "kind": "packed", "codes": q.codes[:, :-1],
                                                    "scales": q.scales, "hashes": expected_hashes(q, [None])}]},
    }
    for case, body in cases.items():
        payload = encode({"protocol": PROTOCOL, "sync_id": f"bad-{case}", **body}, as_blobs=True)
        try:
            llm.collective_rpc("mxfp4_sync_stage", args=(payload,))
            out[case] = None
        except Exception as e:  # noqa: BLE001 - the message is what the test checks
            out[case] = f"{type(e).__name__}: {e}"
    # interrupted: a valid stage for one layer of a NEW version, never committed
    for _, mod in [(n, m) for n, m in model.named_modules() if hasattr(m, "w13_codes")][:1]:
        mod.w13_codes[0, 0, 0] ^= 0x01
    _, new = learner_weights(model)
    n0 = next(iter(new))
    payload = encode({"protocol": PROTOCOL, "sync_id": "interrupted", "profile": profile, "entries": [
        {"name": n0, "kind": "packed", "codes": new[n0].codes, "scales": new[n0].scales,
         "hashes": expected_hashes(new[n0], [None])}]}, as_blobs=True)
    out["interrupted_staged"] = llm.collective_rpc("mxfp4_sync_stage", args=(payload,))[0]["staged"]
    out["hashes_unchanged"] = ex.served_hashes(llm) == before
    return out


def _in_flight(llm, ex, ckpt) -> dict:
    """Requests enqueued before a sync vs after it: each must match the old or the new version entirely."""
    import torch

    from mxfp4_train.sync import sync

    prompts = [list(range(10 + 7 * i, 18 + 7 * i)) for i in range(4)]
    sp = ex.sampling(max_tokens=48, seed=0, temperature=0.0)
    ref_old = ex.completions(llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False))
    model = ex.load_learner(ckpt, "qat")
    with torch.no_grad():  # a large update, so that the two versions' log-probs are far apart
        for _, mod in [(n, m) for n, m in model.named_modules() if hasattr(m, "w13")]:
            mod.w13.mul_(1.5)
            mod.w2.mul_(-1.0)
    ids_old = llm.enqueue([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    report = sync(llm, model)
    ids_new = llm.enqueue([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    # enqueue returns "<counter>-<suffix>" ids; outputs carry the counter part
    outs = {o.request_id.split("-")[0]: o for o in llm.wait_for_completion(use_tqdm=False)}
    got_old = ex.completions([outs[i.split("-")[0]] for i in ids_old])
    got_new = ex.completions([outs[i.split("-")[0]] for i in ids_new])
    ref_new = ex.completions(llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False))

    def dist(a, b):  # per request: max |dlogp| over its tokens, or inf when the greedy tokens differ
        return [float((a[1][i] - b[1][i]).abs().max()) if torch.equal(a[0][i], b[0][i]) else float("inf")
                for i in range(len(prompts))]

    return {"old_vs_ref_old": dist(got_old, ref_old), "old_vs_ref_new": dist(got_old, ref_new),
            "new_vs_ref_new": dist(got_new, ref_new), "new_vs_ref_old": dist(got_new, ref_old),
            "sync_kinds": sorted(set(report.kinds.values()))}


def scenario(out_path: Path) -> None:
    ex = _example()
    work = Path(tempfile.mkdtemp(prefix="rl_loop_e2e_"))
    ckpt = ex.build_checkpoint(work)
    llm = ex.start_engine(ckpt)
    llm._rl_ckpt = ckpt
    cfg = ex.LoopConfig()
    result = {"records": ex.run_mode(llm, ckpt, "lora", STEPS, cfg) + ex.run_mode(llm, ckpt, "qat", STEPS, cfg)}
    result["refusals"] = _refusals(llm, ex)
    result["in_flight"] = _in_flight(llm, ex, ckpt)
    out_path.write_text(json.dumps(result, indent=1, default=str))


# ---- the tests ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rl_loop") / "result.json"
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the engine core in its own process: the pause path runs
    proc = subprocess.run([sys.executable, "-m", "tests.e2e.test_rl_loop", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"RL loop scenario failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return json.loads(out.read_text())


def _by_mode(run, mode):
    return [r for r in run["records"] if r["mode"] == mode]


@pytest.mark.parametrize("mode", ["lora", "qat"])
def test_bytes_identical_after_every_sync(run, mode):
    recs = _by_mode(run, mode)
    assert [r["step"] for r in recs] == list(range(STEPS + 1))
    synced = [r for r in recs if "sync_bytes" in r]
    assert len(synced) == STEPS
    assert all(r["hashes_equal"] for r in synced)
    versions = [r["engine_version"] for r in synced]
    assert versions == sorted(versions) and len(set(versions)) == STEPS


@pytest.mark.parametrize("mode", ["lora", "qat"])
def test_mismatch_stays_at_the_floor(run, mode):
    """Floor = step 0 (engine and learner on the checkpoint's bytes, no sync yet), fp32 on both sides: measured
    max |dlogp| ~ 1e-6 = 2 ulp of an fp32 log-prob near -5.5. A later step may not exceed 8x the floor (kernel-order
    noise of the same size, other tokens); a sync that left any byte stale would show the update's own effect,
    which each record measures (update_max_abs_dlogp, >= 1e-3 whenever codes flipped), far above the bound."""
    recs = _by_mode(run, mode)
    floor = recs[0]
    bound = 8 * max(floor["max_abs_dlogp"], 2.0 ** -21)
    for r in recs:
        assert r["max_abs_dlogp"] <= bound, (r, bound)
        assert abs(r["mismatch_kl"]) <= bound and r["k3_kl"] <= bound ** 2
    moved = [r["update_max_abs_dlogp"] for r in recs if r.get("code_flip_rate")]
    assert moved and max(moved) > 100 * bound  # the bound separates "synced" from "one update behind"


def test_delta_and_packed_accounting(run):
    synced = [r for r in run["records"] if "sync_bytes" in r]
    for r in synced:
        assert r["sync_packed_bytes"] * 128 == r["sync_bf16_bytes"] * 34  # 4.25 bits vs 16 bits per parameter
        if r["sync_kinds"] == ["delta"]:
            assert r["sync_bytes"] < r["sync_packed_bytes"]
        assert r["code_flip_rate"] is not None  # every loop sync follows an earlier one: flips are known


def test_corrupted_payload_and_profile_mismatch_are_refused(run):
    """vLLM re-raises worker errors as a plain Exception carrying the message, so the message is what is checked."""
    ref = run["refusals"]
    name = "'model.layers.0.mlp.experts.w13_weight'"
    assert ref["corrupted"] and name in ref["corrupted"] and "corrupted payload" in ref["corrupted"] \
        and "nothing was changed" in ref["corrupted"], ref["corrupted"]
    assert ref["profile"] and "profile 'ocp'" in ref["profile"] and "serves profile 'flashinfer'" in ref["profile"], \
        ref["profile"]
    assert ref["shape"] and name in ref["shape"] and "field 'codes' must have shape [8, 128, 64], got [8, 127, 64]" \
        in ref["shape"], ref["shape"]
    assert ref["interrupted_staged"]  # the interrupted sync really staged new bytes ...
    assert ref["hashes_unchanged"]  # ... and neither it nor the refused ones changed what is served


def test_requests_never_mix_versions(run):
    f = run["in_flight"]
    tol = 1e-4  # fp32 greedy runs of the same batch: equal up to kernel-order noise (measured ~1e-6)
    assert all(d <= tol for d in f["old_vs_ref_old"]), f  # in flight at sync start: old weights throughout
    assert all(d <= tol for d in f["new_vs_ref_new"]), f  # enqueued after: new weights throughout
    assert all(d > 100 * tol for d in f["old_vs_ref_new"] + f["new_vs_ref_old"]), f  # the versions are distinct


if __name__ == "__main__":
    scenario(Path(sys.argv[1]))

"""Engine-against-engine comparison (tests/serve/reference.engine_logprob_diff) and the DeepSeek-V4 probe's verdicts
built on it (scripts/gpu/deepseek_v4_engine.verdicts): the GPU scripts' judgement, checked where CI can run it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.serve.reference import engine_logprob_diff

ROOT = Path(__file__).resolve().parents[2]


def _run(tokens, logprobs):
    return {"outputs": [{"prompt": [1, 2], "tokens": t, "logprobs": lp} for t, lp in zip(tokens, logprobs,
                                                                                          strict=True)]}


A = _run([[5, 6, 7], [9, 9]], [[{"5": -0.1, "8": -2.0}, {"6": -0.2}, {"7": -0.3}], [{"9": -0.5}, {"9": -0.4}]])


def test_identical_runs_differ_by_nothing():
    assert engine_logprob_diff(A, A) == {"max_logprob_diff": 0.0, "greedy_flips": 0, "steps": 5}


def test_a_parting_prompt_is_compared_up_to_its_first_differing_step_only():
    b = _run([[5, 4, 1], [9, 9]], [[{"5": -0.15, "3": -9.0}, {"4": -0.2, "6": -0.25}, {"1": -50.0}],
                                   [{"9": -0.5}, {"9": -0.4}]])
    got = engine_logprob_diff(A, b)
    # step 0: "5" differs by 0.05 ("8" and "3" are not shared); step 1: "6" by 0.05, then the tokens part (6 vs 4);
    # step 2 of that prompt (-50) is not compared
    assert got["greedy_flips"] == 1 and got["steps"] == 4
    assert got["max_logprob_diff"] == pytest.approx(0.05)


def test_runs_of_other_lengths_are_refused():
    with pytest.raises(ValueError):
        engine_logprob_diff(A, _run([[5, 6, 7]], [[{"5": -0.1}, {"6": -0.2}, {"7": -0.3}]]))


def _probe():
    spec = importlib.util.spec_from_file_location("dsv4_probe", ROOT / "scripts" / "gpu" / "deepseek_v4_engine.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_probe_verdicts_judge_against_the_default_mode_of_the_same_run():
    """The fifth round's figures: vLLM's own method 5.48 nats from the learner, the plugin 2.67 with one flip fewer:
    AT_FLOOR, with the engine-vs-engine row attached; 1.5x the default's distance or more flips is ABOVE_FLOOR."""
    served = {"tensors_checked": 144, "tensors_differ": 0, "checkpoint_tensors_not_served": 0}
    default = {"mode": "default", "ok": True, "max_dlogp_vs_learner": 5.48, "greedy_flips": 12, "outputs":
               A["outputs"]}
    plugin = {"mode": "mxfp4_rl", "ok": True, "max_dlogp_vs_learner": 2.67, "greedy_flips": 11, "served": served,
              "outputs": A["outputs"]}
    far = {**plugin, "mode": "mxfp4_rl:cpu_reference", "max_dlogp_vs_learner": 8.3}
    v = {r["mode"]: r for r in _probe().verdicts([default, plugin, far])}
    assert v["mxfp4_rl"]["bytes"] == "EQUAL" and v["mxfp4_rl"]["logprobs"] == "AT_FLOOR"
    assert v["mxfp4_rl"]["vs_default"] == {"max_logprob_diff": 0.0, "greedy_flips": 0, "steps": 5}
    assert v["mxfp4_rl:cpu_reference"]["logprobs"] == "ABOVE_FLOOR"
    alone = _probe().verdicts([plugin])[0]  # no default mode in the run: the fixed floor, nothing to compare with
    assert alone["logprobs"] == "ABOVE_FLOOR" and alone["vs_default"] is None

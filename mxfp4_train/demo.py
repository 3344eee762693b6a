"""`mxfp4-rl demo`: the train/serve parity experiment on a tiny Qwen3-MoE, end to end, on CPU or GPU.

1. Write a tiny seeded Qwen3-MoE (bf16, hub format) and quantize its experts to an mxfp4_rl checkpoint.
2. Sample rollouts from a bf16 vLLM engine and from an MXFP4 engine (`quantization="mxfp4_rl"`, vLLM public API).
3. Score the same tokens with the learner: bf16 (transformers as is) and MXFP4 (fake-QAT on the bf16 masters,
   which computes with exactly the checkpoint's bytes).
4. Print three parity rows (bf16 learner vs bf16 engine = the numeric floor; MXFP4 learner vs MXFP4 engine = ours;
   bf16 learner vs MXFP4 engine = common practice today), a per-expert breakdown, and whether the expert bytes are
   identical (audit hashes of the learner's export vs the parameters the engine serves, read back from the worker).
5. LoRA row: a LoRA learner on the packed experts with nonzero (random, seeded) expert adapters, saved as a PEFT
   adapter next to a copy of the MXFP4 checkpoint that names it (enable_expert_lora); a third engine serves base +
   adapter unmerged; its rollouts scored by that learner, and the adapter bytes it serves checked against the
   learner's (expert bytes and adapter factors, hashes).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .parity import Parity, format_table, parity, per_expert, record_routing

ROWS = ("bf16 learner vs bf16 engine (floor)", "MXFP4 learner vs MXFP4 engine (ours)",
        "bf16 learner vs MXFP4 engine (common practice)")
LORA_ROW = "MXFP4+LoRA learner vs engine serving the adapter"
DEMO_LORA_RANK = 4
# Sharpen the tiny model's next-token distributions: a random lm_head at the tiny init std gives near-uniform
# distributions over 256 tokens, where any weight change barely moves log-probs; x6 gives peaked ones (a few
# likely tokens per step, like a trained LM), so the effect of quantized experts on the sampled tokens is visible.
LOGIT_SCALE = 6.0
# Steps go to stderr through logging; the parity table and the byte check are the results, printed on stdout.
log = logging.getLogger(__name__)


def build_models(root: Path, profile: str, seed: int) -> tuple[Path, Path]:
    from common.checkpoint import quantize_checkpoint, write_tiny_checkpoint

    bf16 = write_tiny_checkpoint(root / "tiny-qwen3-moe-bf16", arch="qwen3_moe", seed=seed)
    tensors = load_file(str(bf16 / "model.safetensors"))
    tensors["lm_head.weight"] = (tensors["lm_head.weight"].float() * LOGIT_SCALE).to(torch.bfloat16)
    save_file(tensors, str(bf16 / "model.safetensors"), metadata={"format": "pt"})
    mx = quantize_checkpoint(bf16, root / f"tiny-qwen3-moe-mxfp4-{profile}", profile=profile,
                             progress=log.isEnabledFor(logging.INFO))
    return bf16, mx


def make_prompts(n: int, length: int, seed: int, vocab: int = 256) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(length)] for _ in range(n)]  # 0/1 are bos/eos


def learner_logprobs(model, prompts: list[list[int]], completions: list[list[int]],
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(token) for every completion token [N] (fp32 log_softmax of the logits, as vLLM computes its
    log-probs), and the routed experts of the position that produced each token [N, layers, top_k] if recorded."""
    ids = torch.tensor([p + c for p, c in zip(prompts, completions)])
    p_len, c_len = len(prompts[0]), len(completions[0])
    with torch.no_grad(), record_routing(model) as routes:
        logits = model(ids).logits.float()
    lp = torch.log_softmax(logits[:, p_len - 1:-1], dim=-1)
    picked = lp.gather(-1, ids[:, p_len:, None]).squeeze(-1).reshape(-1)
    experts = None
    if routes:
        b, s = ids.shape
        per_layer = [r.reshape(b, s, -1)[:, p_len - 1:-1].reshape(b * c_len, -1) for r in routes]
        experts = torch.stack(per_layer, dim=1)
    return picked, experts


def _load_learners(bf16: Path, profile: str):
    from transformers import AutoModelForCausalLM

    from .conversion import convert

    def load():
        m = AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.bfloat16)
        m.set_experts_implementation("eager")
        return m.eval()

    return load(), convert(load(), "qat", profile=profile)


def compare_bytes(mx_learner, served: dict | None, mx_ckpt: Path, profile: str) -> tuple[bool, str]:
    """(identical, how it was checked): learner export hashes vs the engine's served params, or vs the checkpoint."""
    from .checkpoint_io import load_mxfp4_model
    from .export import engine_hashes, export_hashes

    mine = {k: v for k, v in export_hashes(mx_learner).items() if not k.endswith("_bias")}
    if served:
        theirs = engine_hashes({k: v for k, v in served.items() if not k.endswith("_bias")}, profile)
        how = "learner export vs parameters read back from the running engine (LLM.apply_model)"
    else:
        theirs = export_hashes(load_mxfp4_model(mx_ckpt, "lora", lora=None))
        how = "learner export vs the checkpoint the engine loaded (engine read-back unavailable)"
    same = set(mine) == set(theirs) and all(mine[k] == theirs[k] for k in mine)
    return same, how


def build_lora(root: Path, mx_ckpt: Path, seed: int):
    """(checkpoint copy that serves the adapter, LoRA learner with nonzero expert adapters on the packed bytes)."""
    import shutil

    from .adapters import save_adapters
    from .checkpoint_io import load_mxfp4_model
    from .conversion import experts_modules
    from .lora import LoRASpec
    from .sync import enable_expert_lora

    ckpt = root / f"{mx_ckpt.name}-lora"
    if ckpt.exists():
        shutil.rmtree(ckpt)
    shutil.copytree(mx_ckpt, ckpt)
    spec = LoRASpec(r=DEMO_LORA_RANK, alpha=2.0 * DEMO_LORA_RANK)
    learner = load_mxfp4_model(ckpt, mode="lora", dtype=torch.bfloat16, lora=spec).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a trained adapter stands in: B drawn at a scale that moves log-probs visibly
        for _, mod in experts_modules(learner):
            for lora in (mod.lora_gate_up, mod.lora_down):
                lora.B.copy_(torch.randn(lora.B.shape, generator=g) * 0.05)
    save_adapters(learner, ckpt / "adapter")
    enable_expert_lora(ckpt, spec, adapter=ckpt / "adapter")
    return ckpt, learner


def compare_adapters(learner, served: dict | None) -> bool:
    """The expert factors the engine serves (at their active rank) equal the learner's, byte for byte (hashes)."""
    from common.audit import dense_hash
    from common.moe import params as P

    from .conversion import experts_modules

    if not served:
        return False
    for prefix, mod in experts_modules(learner):
        for weight, lora in ((P.W13, mod.lora_gate_up), (P.W2, mod.lora_down)):
            a_name, b_name = P.LORA_FACTORS[weight]
            mine = dense_hash("lora", lora.A.detach().float(), lora.B.detach().float())
            theirs = dense_hash("lora", served[f"{prefix}.{a_name}"], served[f"{prefix}.{b_name}"])
            if mine != theirs:
                return False
    return True


def run_demo(out_dir: str | Path | None = None, *, profile: str = "flashinfer", prompts: int = 16,
             prompt_len: int = 8, max_tokens: int = 16, seed: int = 0, engine_kwargs: dict | None = None,
             lora_row: bool = True) -> dict:
    from .engine import sample_rollouts

    root = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="mxfp4-rl-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    log.info("[1/4] tiny Qwen3-MoE (seed %d) and its MXFP4 checkpoint (profile %s) in %s", seed, profile, root)
    bf16_ckpt, mx_ckpt = build_models(root, profile, seed)
    ps = make_prompts(prompts, prompt_len, seed)
    log.info("[2/4] rollouts: %d prompts x %d sampled tokens from each engine", prompts, max_tokens)
    ro_bf16 = sample_rollouts(str(bf16_ckpt), ps, quantization=None, max_tokens=max_tokens, seed=seed,
                              label="bf16 engine", engine_kwargs=engine_kwargs)
    ro_mx = sample_rollouts(str(mx_ckpt), ps, quantization="mxfp4_rl", max_tokens=max_tokens, seed=seed,
                            read_params=True, label="MXFP4 engine (mxfp4_rl)", engine_kwargs=engine_kwargs)
    log.info("[3/4] learner forward on the same tokens (bf16, and MXFP4 fake-QAT)")
    bf16_learner, mx_learner = _load_learners(bf16_ckpt, profile)
    lp1, _ = learner_logprobs(bf16_learner, ro_bf16.prompts, ro_bf16.completions)
    lp2, experts = learner_logprobs(mx_learner, ro_mx.prompts, ro_mx.completions)
    lp3, _ = learner_logprobs(bf16_learner, ro_mx.prompts, ro_mx.completions)
    eng1, eng_mx = torch.tensor(ro_bf16.logprobs).reshape(-1), torch.tensor(ro_mx.logprobs).reshape(-1)
    rows = {ROWS[0]: parity(eng1, lp1), ROWS[1]: parity(eng_mx, lp2), ROWS[2]: parity(eng_mx, lp3)}
    same, how = compare_bytes(mx_learner, ro_mx.served_params, mx_ckpt, profile)
    result = {"rows": rows, "bytes_identical": same, "bytes_check": how, "dir": str(root),
              # per-token log-ratios, for tests that need the spread and not only the means
              "dlogp": dict(zip(ROWS, (lp1 - eng1.double(), lp2 - eng_mx.double(), lp3 - eng_mx.double()))),
              "per_expert": {"ours": per_expert(eng_mx, lp2, experts, 8), "common": per_expert(eng_mx, lp3, experts, 8)}}
    if lora_row:
        log.info("[3b/4] LoRA: learner with nonzero expert adapters, engine serving base + saved adapter unmerged")
        lora_ckpt, lora_learner = build_lora(root, mx_ckpt, seed)
        ro_lora = sample_rollouts(str(lora_ckpt), ps, quantization="mxfp4_rl", max_tokens=max_tokens, seed=seed,
                                  read_params=True, label="MXFP4 engine + adapter", engine_kwargs=engine_kwargs)
        lp4, _ = learner_logprobs(lora_learner, ro_lora.prompts, ro_lora.completions)
        eng4 = torch.tensor(ro_lora.logprobs).reshape(-1)
        rows[LORA_ROW] = parity(eng4, lp4)
        result["dlogp"][LORA_ROW] = lp4 - eng4.double()
        same_lora, _ = compare_bytes(lora_learner, ro_lora.served_params, lora_ckpt, profile)
        result["lora_bytes_identical"] = same_lora and compare_adapters(lora_learner, ro_lora.served_params)
    log.info("[4/4] parity (tokens sampled by the engine; KL estimators of KL(engine || learner))")
    print(format_table(rows))
    print(_per_expert_table(result["per_expert"]))
    print(f"expert bytes identical: {'YES' if same else 'NO'} ({how})")
    if lora_row:
        print(f"LoRA row: expert bytes and adapter factors identical: "
              f"{'YES' if result['lora_bytes_identical'] else 'NO'} (learner vs the running engine's read-back)")
    return result


def _per_expert_table(pe: dict[str, dict[int, Parity]]) -> str:
    lines = ["per routed expert (all MoE layers), mean|dlogp| on the MXFP4 engine's tokens:",
             f"  {'expert':>6} {'tokens':>7} {'ours':>10} {'common':>10}"]
    for e in sorted(pe["ours"]):
        o, c = pe["ours"][e], pe["common"][e]
        lines.append(f"  {e:>6} {o.tokens:>7} {o.mean_abs_dlogp:>10.3e} {c.mean_abs_dlogp:>10.3e}")
    return "\n".join(lines)


def _cmd(args: argparse.Namespace) -> int:
    if args.model == "deepseek_v4":  # learner side only: no CPU engine runs DeepSeek-V4 (deepseek_v4_demo.py says why)
        from .deepseek_v4_demo import format_result, run_deepseek_v4_demo

        res = run_deepseek_v4_demo(seed=args.seed, tokens=args.max_tokens)
        print(format_result(res))
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": {k: v.as_dict() for k, v in res["rows"].items()},
                                                   "identical": res["identical"]}, indent=2) + "\n")
        return 0 if res["identical"] else 1
    res = run_demo(args.out, profile=args.profile, prompts=args.prompts, prompt_len=args.prompt_len,
                   max_tokens=args.max_tokens, seed=args.seed, engine_kwargs=args.engine_kwargs)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"rows": {k: v.as_dict() for k, v in res["rows"].items()}, "bytes_identical": res["bytes_identical"],
             "bytes_check": res["bytes_check"]}, indent=2) + "\n")
    return 0 if res["bytes_identical"] else 1


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--engine-kwargs is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--engine-kwargs must be a JSON object, got {type(value).__name__}")
    return value


def register(subparsers) -> None:
    """Entry point `mxfp4_rl.commands: demo = mxfp4_train.demo:register`."""
    p = subparsers.add_parser("demo", help="train/serve parity demo: tiny Qwen3-MoE, bf16 and MXFP4 vLLM engines",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("qwen3_moe", "deepseek_v4"), default="qwen3_moe",
                   help="qwen3_moe: engines and learner; deepseek_v4: the learner side for a tiny DeepSeek-V4 in its "
                        "shipped format (MXFP4 learner vs transformers' decode, bf16 learner)")
    p.add_argument("--out", default=None, help="working directory (default: a new temporary directory)")
    p.add_argument("--profile", default="flashinfer", help="codec profile for the checkpoint and the engine")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the parity rows to this JSON file")
    p.add_argument("--engine-kwargs", type=_json_object, default=None, metavar="JSON",
                   help='extra vllm.LLM arguments for both engines, e.g. \'{"attention_config": {"backend": '
                        '"TRITON_ATTN"}}\' where a vLLM build lacks FlashAttention')
    p.add_argument("-q", "--quiet", action="store_true",
                   help="results only: no steps or progress bars on stderr")
    p.set_defaults(func=_cmd)

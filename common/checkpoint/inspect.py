"""Inspection report of a checkpoint: per packed tensor its format, shape, profile, scale-exponent histogram and
audit hash, plus a summary with bits per parameter. Backs `mxfp4-rl inspect`."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from .. import constants as C
from ..audit import tensor_hash
from ..errors import CheckpointError
from ..moe.quant_config import QUANT_METHOD
from . import deepseek_v4
from .packed import iter_packed_experts, read_quantization_config
from .safetensors_io import CheckpointReader
from .validate import read_config


def _exponent_hist(scales: torch.Tensor) -> dict[int, int]:
    counts = torch.bincount(scales.reshape(-1).to(torch.int64), minlength=256)
    return {b - C.E8M0_BIAS: int(c) for b, c in enumerate(counts.tolist()) if c}


def _tensor_totals(reader: CheckpointReader) -> tuple[int, Counter]:
    total_bytes, by_dtype = 0, Counter()
    for info in reader.info.values():
        total_bytes += info.nbytes
        by_dtype[str(info.dtype).removeprefix("torch.")] += info.nbytes
    return total_bytes, by_dtype


def inspect_checkpoint(ckpt_dir: str | Path) -> dict:
    """A JSON-serialisable report; `experts` is empty for a checkpoint that is not mxfp4_rl. An mxfp4_rl checkpoint
    passes the loaders' validation first (validate.py): what the engine or the learner would refuse, inspect
    refuses with the same message."""
    ckpt_dir = Path(ckpt_dir)
    config = read_config(ckpt_dir) if (ckpt_dir / "config.json").is_file() else {}
    qc = config.get("quantization_config") or {}
    if not isinstance(qc, dict):
        raise CheckpointError(f"{ckpt_dir / 'config.json'}: quantization_config must be a JSON object, got "
                              f"{type(qc).__name__}")
    with CheckpointReader(ckpt_dir) as reader:
        total_bytes, by_dtype = _tensor_totals(reader)
        n_files = len(reader.files)
    experts, hist, packed_params, packed_bytes = [], Counter(), 0, 0
    # validated as the loaders validate it; DeepSeek-V4-Flash as shipped reads as mxfp4_rl (format deepseek-v4,
    # profile deepseek_v4, its FP8 config as the delegate)
    if qc.get("quant_method") == QUANT_METHOD or deepseek_v4.is_shipped_checkpoint(ckpt_dir):
        qc = read_quantization_config(ckpt_dir)[1]
        for (layer, expert, proj), q in iter_packed_experts(ckpt_dir):
            h = _exponent_hist(q.scales)
            hist.update(h)
            packed_params += q.shape.numel()
            packed_bytes += q.nbytes
            experts.append({"layer": layer, "expert": expert, "proj": proj, "format": f"mxfp4/{qc['format']}",
                            "shape": list(q.shape), "profile": q.profile, "scale_exponents": h,
                            "hash": tensor_hash(q)})
    other_bytes = total_bytes - packed_bytes
    return {
        "path": str(ckpt_dir), "model_type": config.get("model_type"), "quantization_config": qc or None,
        "files": n_files, "bytes": total_bytes, "bytes_by_dtype": dict(by_dtype), "experts": experts,
        "summary": {
            "expert_tensors": len(experts), "expert_params": packed_params, "expert_bytes": packed_bytes,
            "expert_bits_per_param": 8 * packed_bytes / packed_params if packed_params else None,
            "other_bytes": other_bytes, "scale_exponents": dict(sorted(hist.items())),
        },
    }


def _hist_text(h: dict[int, int], width: int = 40) -> list[str]:
    top = max(h.values())
    return [f"    2^{e:<+4d} {c:>8d} {'#' * max(1, round(width * c / top))}" for e, c in sorted(h.items())]


def format_report(report: dict, max_rows: int = 64) -> str:
    qc = report["quantization_config"] or {}
    s = report["summary"]
    lines = [f"checkpoint  {report['path']}", f"model_type  {report['model_type']}",
             f"quantization {qc.get('quant_method', 'none')}"
             + (f"  profile={qc.get('profile')} format={qc.get('format')} block_size={qc.get('block_size')} "
                f"codec_version={qc.get('codec_version')}" if qc.get("quant_method") == "mxfp4_rl" else "")]
    if qc.get("source_format") == deepseek_v4.SHIPPED_FORMAT:
        d = qc.get("delegate") or {}
        lines.append(f"format      {deepseek_v4.SHIPPED_FORMAT} (as DeepSeek ships it: MXFP4 routed experts int8 + "
                     f"float8_e8m0fnu .scale, read byte for byte; dense layers FP8 {d.get('fmt')} block "
                     f"{d.get('weight_block_size')} scale_fmt {d.get('scale_fmt')}, delegated to "
                     f"{d.get('quant_method')!r})")
    lines += [
             f"files       {report['files']} safetensors, {report['bytes'] / 2**20:.2f} MiB "
             f"({', '.join(f'{k} {v / 2**20:.2f} MiB' for k, v in sorted(report['bytes_by_dtype'].items()))})"]
    if report["experts"]:
        lines += ["", f"{'tensor':<28} {'format':<14} {'shape':<12} {'profile':<11} {'exp min..max':<13} hash"]
        for row in report["experts"][:max_rows]:
            exps = list(row["scale_exponents"])
            name = f"L{row['layer']}.E{row['expert']}.{row['proj']}"
            lines.append(f"{name:<28} {row['format']:<14} {'x'.join(map(str, row['shape'])):<12} {row['profile']:<11} "
                         f"{f'{min(exps):+d}..{max(exps):+d}':<13} {row['hash'][:16]}")
        if len(report["experts"]) > max_rows:
            lines.append(f"... {len(report['experts']) - max_rows} more (use --json for all)")
        lines += ["", "scale exponent histogram (all experts):", *_hist_text(s["scale_exponents"])]
    lines.append("")
    if s["expert_params"]:
        lines.append(f"summary: {s['expert_tensors']} MXFP4 expert tensors, {s['expert_params']:,} params at "
                     f"{s['expert_bits_per_param']:.2f} bits/param ({s['expert_bytes']:,} bytes); "
                     f"other tensors {s['other_bytes']:,} bytes")
    else:
        lines.append(f"summary: no mxfp4_rl expert tensors (quant_method {qc.get('quant_method')!r}); "
                     f"{report['bytes']:,} bytes of tensors")
    return "\n".join(lines)

"""quantize_checkpoint: a bf16 MoE checkpoint -> the same checkpoint with MXFP4 routed experts.

Work is planned from tensor headers first (names, dtypes, shapes: no data read), so shape errors such as K not a
multiple of 32 surface before anything is written. Then each output group is produced from one source tensor read
with safe_open and streamed to the output shard: peak memory is about one source tensor plus its outputs. The
result is built in a staging directory next to dst and moved into place only when complete, so a failed conversion
(non-finite weights, a full disk, Ctrl-C or SIGTERM) leaves no half-written checkpoint behind.

Before any tensor is read, the source's expert tensors pass the same geometry check as a packed checkpoint
(`validate.check_experts`: shapes against config.json, expert ids, counts) and DST the pre-flight checks
(`preflight_destination`: not a mount point, writable, on the staging directory's filesystem, room for the output).
DST gets the modes of an ordinary new directory (0777 minus the umask), not mkdtemp's 0700.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import constants as C
from ..api import quantize
from ..errors import CheckpointError, DTypeError, ShapeError
from ..layouts import deepseek_v4 as dsv4_layout
from ..layouts import gpt_oss as gpt_oss_layout
from ..moe.quant_config import CODEC_VERSION, QUANT_METHOD, quantization_config  # noqa: F401 - re-exported
from ..profiles import get_profile
from .archs import ArchSpec, ExpertSource, arch_spec, check_format
from .safetensors_io import INDEX_NAME, CheckpointReader, TensorSpec, parse_size, write_sharded
from . import deepseek_v4
from .validate import ExpertHeader, check_experts, check_scale_bytes, expert_dims, read_config

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
Loader = Callable[[str], torch.Tensor]


def _k_and_rows(src: ExpertSource, shape: tuple[int, ...]) -> tuple[int, int]:
    """(K, N) of an expert weight: per-expert [N, K]; gpt-oss fused [E, K, N] (input features first)."""
    return (shape[1], shape[2]) if src.expert is None else (shape[1], shape[0])


def _check_expert(src: ExpertSource, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if dtype not in FLOAT_DTYPES:
        raise DTypeError(f"tensor '{src.name}': routed-expert weights must be bf16/fp16/fp32 to quantize, got {dtype} "
                         f"(is this checkpoint already quantized?)")
    if len(shape) != (3 if src.expert is None else 2):
        raise ShapeError(f"tensor '{src.name}': expected {'[E, K, N]' if src.expert is None else '[N, K]'}, "
                         f"got shape {shape}")
    k, _ = _k_and_rows(src, shape)
    if k % C.BLOCK_SIZE:
        raise ShapeError(f"tensor '{src.name}': the input-feature (K) dimension must be a multiple of "
                         f"{C.BLOCK_SIZE} to quantize along it, got K={k} in shape {shape}")


def _packed_specs(prefix: str, n: int, k: int, fmt: str) -> list[TensorSpec]:
    if fmt == "deepseek-v4":
        return [TensorSpec(f"{prefix}.weight", torch.int8, (n, k // 2)),
                TensorSpec(f"{prefix}.scale", torch.float8_e8m0fnu, (n, k // C.BLOCK_SIZE))]
    return [TensorSpec(f"{prefix}.weight", torch.uint8, (n, k // 2)),
            TensorSpec(f"{prefix}.weight_scale", torch.uint8, (n, k // C.BLOCK_SIZE))]


def _per_expert_group(spec: ArchSpec, src: ExpertSource, shape, fmt: str, load: Loader, profile: str):
    n, k = shape
    prefix = src.name.removesuffix(".weight") if fmt == "deepseek-v4" else spec.native_prefix(src.layer, src.expert,
                                                                                            src.proj)
    specs = _packed_specs(prefix, n, k, fmt)

    def produce() -> dict[str, torch.Tensor]:
        q = quantize(load(src.name), profile=profile, name=src.name)
        w, s = dsv4_layout.to_deepseek_v4(q) if fmt == "deepseek-v4" else (q.codes, q.scales)
        return {specs[0].name: w, specs[1].name: s}

    return specs, produce


def _quantize_fused(load: Loader, src: ExpertSource, profile: str):
    """gpt-oss fused [E, K, N] -> per-expert quantized [N, K] (one expert at a time to bound fp32 temporaries)."""
    w = load(src.name)
    return [quantize(w[e].t(), profile=profile, name=f"{src.name}[{e}] (as [N, K])") for e in range(w.shape[0])]


def _fused_group(spec: ArchSpec, src: ExpertSource, shape, fmt: str, load: Loader, profile: str):
    e_count, k, n = shape
    base = src.name.rsplit(".", 1)[0]  # model.layers.L.mlp.experts
    if fmt == "gpt-oss":
        stem = f"{base}.{'gate_up_proj' if src.proj == 'gate_up' else 'down_proj'}"
        specs = [TensorSpec(f"{stem}_blocks", torch.uint8, (e_count, n, k // C.BLOCK_SIZE, 16)),
                 TensorSpec(f"{stem}_scales", torch.uint8, (e_count, n, k // C.BLOCK_SIZE))]

        def produce() -> dict[str, torch.Tensor]:
            qs = _quantize_fused(load, src, profile)
            # Columns of the source are already interleaved (gate i, up i), so rows of [N, K] are too.
            codes, scales = torch.stack([q.codes for q in qs]), torch.stack([q.scales for q in qs])
            return {specs[0].name: gpt_oss_layout.codes_to_blocks(codes), specs[1].name: scales}

        return specs, produce
    projs = ("gate", "up") if src.proj == "gate_up" else ("down",)
    rows = n // len(projs)
    specs = [s for e in range(e_count) for p in projs
             for s in _packed_specs(spec.native_prefix(src.layer, e, p), rows, k, fmt)]

    def produce() -> dict[str, torch.Tensor]:
        out = {}
        for e, q in enumerate(_quantize_fused(load, src, profile)):
            if src.proj == "gate_up":  # rows 2i = gate i, 2i+1 = up i
                pairs = zip(gpt_oss_layout.deinterleave_rows(q.codes), gpt_oss_layout.deinterleave_rows(q.scales))
            else:
                pairs = [(q.codes, q.scales)]
            for p, (codes, scales) in zip(projs, pairs):
                prefix = spec.native_prefix(src.layer, e, p)
                out[f"{prefix}.weight"], out[f"{prefix}.weight_scale"] = codes, scales
        return out

    return specs, produce


def _passthrough_group(src: ExpertSource, reader: CheckpointReader, fmt: str, profile: str):
    """An already-MXFP4 DeepSeek-V4 expert (int8 codes + float8_e8m0fnu `.scale`), copied byte for byte: the same
    tensors (format deepseek-v4) or uint8 views of them (native)."""
    stem = src.name.removesuffix(".weight")
    n, half = reader.info[src.name].shape
    specs = _packed_specs(stem, n, 2 * half, fmt)

    def produce() -> dict[str, torch.Tensor]:
        codes, scales = reader.get(src.name), reader.get(f"{stem}.scale")
        check_scale_bytes(scales, profile, f"{stem}.scale")
        if fmt != "deepseek-v4":
            codes, scales = codes.view(torch.uint8), scales.view(torch.uint8)
        return {specs[0].name: codes, specs[1].name: scales}

    return specs, produce


def plan_conversion(reader: CheckpointReader, spec: ArchSpec, fmt: str, profile: str,
                    device: str | torch.device = "cpu", config: dict | None = None):
    """[(output specs, producer, is_expert)] for every source tensor, in checkpoint order; reads headers only.

    Expert tensors are moved to device before quantizing (on CUDA the codec runs its Triton kernels, which give the
    same bytes as the CPU reference); everything else is copied without leaving the host. A DeepSeek-V4-Flash
    checkpoint as DeepSeek ships it (deepseek_v4.is_shipped) has MXFP4 experts already: they pass through byte for
    byte after the shipped format's header checks (deepseek_v4.validate_shipped), never re-quantized.
    """
    if deepseek_v4.is_shipped_checkpoint(reader.dir):  # the source (`config` is the output's)
        deepseek_v4.validate_shipped(reader.dir)
        plan = []
        for name in reader.names():
            info = reader.info[name]
            src = spec.match(name)
            if src is not None:
                plan.append((*_passthrough_group(src, reader, fmt, profile), True))
            elif not deepseek_v4.is_expert_tensor(name):  # expert `.scale`s travel with their weight
                plan.append(([TensorSpec(name, info.dtype, info.shape)], lambda name=name: {name: reader.get(name)},
                             False))
        return plan
    plan, headers = [], []

    def load(name: str) -> torch.Tensor:
        return reader.get(name).to(device)

    for name in reader.names():
        info = reader.info[name]
        src = spec.match(name)
        if src is None:
            plan.append(([TensorSpec(name, info.dtype, info.shape)], lambda name=name: {name: reader.get(name)}, False))
            continue
        _check_expert(src, info.dtype, info.shape)
        k, n = _k_and_rows(src, info.shape)
        headers.append(ExpertHeader(name, src.layer, src.expert, src.proj, (n, k),
                                    info.shape[0] if src.expert is None else 1))
        build = _fused_group if spec.fused else _per_expert_group
        specs, produce = build(spec, src, info.shape, fmt, load, profile)
        plan.append((specs, produce, True))
    if not any(is_expert for *_, is_expert in plan):
        raise ValueError(f"checkpoint '{reader.dir}' ({spec.model_type}) has no routed-expert tensor matching "
                         f"{spec.pattern!r}: nothing to quantize")
    check_experts(headers, expert_dims(config if config is not None else {}, str(reader.dir / "config.json")))
    return plan


def _prepare_paths(src: Path, dst: Path) -> None:
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"'{src}' has no config.json: not a Hugging Face model directory")
    if src.resolve() == dst.resolve():
        raise ValueError(f"source and destination are the same directory '{src}'; choose a new DST")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(f"destination '{dst}' exists and is not empty; choose a new or empty directory")
    if dst.resolve().is_relative_to(src.resolve()):
        raise ValueError(f"destination '{dst}' is inside the source checkpoint '{src}'")


def preflight_destination(dst: Path, out_bytes: int) -> Path:
    """Check what can be checked before any work, so that the final rename cannot fail after a long conversion.

    Returns DST with symlinks resolved (the staging directory is made beside the real target). Refuses a DST that
    is a mount point (a rename cannot replace one: EBUSY), a parent directory that cannot be written (read-only
    mount), a DST on another filesystem than its parent (EXDEV), and an output larger than the free space.
    """
    dst = Path(os.path.realpath(dst))
    parent = dst.parent
    parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        if os.path.ismount(dst):
            raise ValueError(f"destination '{dst}' is a mount point: the converter builds the checkpoint beside it "
                             f"and renames it into place, which cannot replace a mount point; pass a new "
                             f"subdirectory such as '{dst / 'model'}'")
        if os.stat(dst).st_dev != os.stat(parent).st_dev:
            raise ValueError(f"destination '{dst}' is on another filesystem than its parent '{parent}', where the "
                             f"staging directory is built; pass a new directory inside it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(13, f"cannot write the staging directory for '{dst}' (read-only or not writable)",
                              str(parent))
    free = shutil.disk_usage(parent).free
    if out_bytes > free:
        raise OSError(28, f"the output needs {out_bytes:,} bytes but only {free:,} are free", str(parent))
    return dst


class Terminated(BaseException):
    """SIGTERM (e.g. `docker compose stop`) during a conversion, raised so that the staging directory is removed."""


@contextlib.contextmanager
def _sigterm_raises():
    """Turn SIGTERM into Terminated while the staging directory exists (main thread, default handler only)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise Terminated(f"terminated by signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _make_stage(dst: Path) -> Path:
    """The staging directory beside dst, with the modes of a plain mkdir (mkdtemp's 0700 would keep DST unreadable
    for a container's other users after the rename)."""
    stage = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)
    return stage


def _copy_side_files(src: Path, stage: Path) -> None:
    """Copy tokenizer, generation config, etc. (everything but weights, their index and config.json)."""
    for p in src.iterdir():
        if p.name == "config.json" or p.name == INDEX_NAME or p.suffix == ".safetensors":
            continue
        if p.is_dir():
            shutil.copytree(p, stage / p.name)
        else:
            shutil.copy2(p, stage / p.name)


def _new_config(src: Path, profile: str, fmt: str) -> dict:
    config = read_config(src)
    old = config.get("quantization_config")
    if old is not None and not isinstance(old, dict):
        raise CheckpointError(f"{src / 'config.json'}: quantization_config must be a JSON object, got "
                              f"{type(old).__name__}")
    if old and str(old.get("quant_method", "")).lower() in ("mxfp4", QUANT_METHOD):
        raise ValueError(f"'{src}' is already an MXFP4 checkpoint (quant_method {old.get('quant_method')!r})")
    if deepseek_v4.is_shipped_checkpoint(src) and profile != deepseek_v4.SHIPPED_PROFILE:
        raise ValueError(f"'{src}' is DeepSeek-V4-Flash as DeepSeek ships it: its routed experts are already MXFP4, "
                         f"quantized by DeepSeek's rule (profile {deepseek_v4.SHIPPED_PROFILE!r}); they pass through "
                         f"byte for byte and the checkpoint records that profile: pass --profile "
                         f"{deepseek_v4.SHIPPED_PROFILE} (got {profile!r})")
    config["quantization_config"] = quantization_config(profile, fmt, old)
    return config


def quantize_checkpoint(src: str | Path, dst: str | Path, *, profile: str, fmt: str = "native",
                        max_shard_bytes: int | str | None = None, progress: bool = True,
                        device: str | torch.device = "cpu") -> Path:
    """Convert the routed experts of a bf16 MoE checkpoint to MXFP4; copy everything else byte for byte.

    profile: codec profile name (recorded in quantization_config; no default on purpose).
    fmt: "native" (`{prefix}.weight` uint8 + `{prefix}.weight_scale` uint8), "gpt-oss" (`*_blocks` / `*_scales`,
         model_type gpt_oss only) or "deepseek-v4" (int8 `.weight` + float8_e8m0fnu `.scale`, deepseek_v4 only).
    max_shard_bytes: e.g. 5_000_000_000 or "5GB"; None writes a single model.safetensors.
    device: where experts are quantized ("cuda" is much faster on large models; the bytes are the same).
    """
    src, dst = Path(src), Path(dst)
    prof = get_profile(profile).name
    _prepare_paths(src, dst)
    config = _new_config(src, prof, fmt)
    spec = arch_spec(config, where=str(src / "config.json"))
    check_format(spec, fmt)
    reader = CheckpointReader(src)
    plan = plan_conversion(reader, spec, fmt, prof, device, config=config)
    out_bytes = sum(s.nbytes for specs, _, _ in plan for s in specs)
    real = preflight_destination(dst, out_bytes)
    with _sigterm_raises():
        stage = _make_stage(real)
        try:
            bar = tqdm(total=len(plan), desc=f"mxfp4-rl quantize ({prof}, {fmt})", unit="tensor",
                       disable=not progress)
            with bar, reader:
                write_sharded(stage, [specs for specs, _, _ in plan], lambda i: plan[i][1](),
                              max_shard_bytes=parse_size(max_shard_bytes), on_group_done=lambda i: bar.update(1))
            _copy_side_files(src, stage)
            (stage / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            if real.exists():
                real.rmdir()  # checked empty above
            os.replace(stage, real)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
    return dst

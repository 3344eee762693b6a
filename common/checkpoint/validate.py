"""One validation pass over MXFP4 checkpoints, shared by `mxfp4-rl inspect`, the learner's loader (through
`packed.iter_packed_experts`) and the engine plugin (`mxfp4_serve.settings`, `.config`, `.loader`): a checkpoint that
one side refuses, every side refuses, with the same message.

- check_quant_config: quant_method, profile known, format known and available for the model_type, block_size,
  codec_version not newer than this reader's (common.moe.quant_config.CODEC_VERSION).
- plan_packed: the packed expert tensors of a checkpoint from its headers only (names, dtypes, shapes; no data
  read): every code tensor has its scale partner, of the right dtype and a matching shape.
- check_experts: expert shapes against config.json (hidden / intermediate size; a transposed header is caught),
  expert ids below the configured expert count, layers below num_hidden_layers, every expert of a layer present.
  The converter runs it on its bf16 source as well.
- check_scale_bytes: no scale byte the profile reserves (E8M0 NaN, its Inf-block byte, bytes no finite weight
  gets: common.profiles.reserved_scale_bytes), naming the tensor and the first such block.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from .. import constants as C
from ..errors import CheckpointError, DTypeError, MXFP4Error, ShapeError, UnknownProfileError
from ..moe.quant_config import CODEC_VERSION, QUANT_METHOD
from ..profiles import get_profile, reserved_scale_bytes
from .archs import ARCHS, FORMATS, PROJS, ArchSpec
from .safetensors_io import CheckpointReader, TensorInfo

# model_type -> config.json keys of (routed experts per layer, one expert's intermediate size)
DIM_KEYS = {
    "qwen3_moe": ("num_experts", "moe_intermediate_size"),
    "deepseek_v3": ("n_routed_experts", "moe_intermediate_size"),
    "deepseek_v4": ("n_routed_experts", "moe_intermediate_size"),
    "glm4_moe": ("n_routed_experts", "moe_intermediate_size"),
    "gpt_oss": ("num_local_experts", "intermediate_size"),
}
QUANT_CONFIG_WHERE = "mxfp4_rl quantization_config"


# ---------------------------------------------------------------------------------------------- quantization_config
def check_quant_config(qc: Any, *, model_type: str | None = None, where: str = QUANT_CONFIG_WHERE,
                       formats: tuple[str, ...] = FORMATS) -> dict:
    """The quantization_config of an mxfp4_rl checkpoint, checked; returns it with format / block_size /
    codec_version filled in (checkpoints of earlier converters may lack them: native, 32, 1)."""
    if not isinstance(qc, Mapping):
        raise CheckpointError(f"{where} must be a JSON object, got {type(qc).__name__}")
    if qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{where}: quant_method must be {QUANT_METHOD!r}, got {qc.get('quant_method')!r} "
                              f"(convert with `mxfp4-rl quantize`)")
    if "profile" not in qc:
        raise CheckpointError(f"{where} has no 'profile'; the checkpoint must record the profile that quantized it "
                              f"(see common.checkpoint.quantize_checkpoint)")
    try:
        get_profile(qc["profile"])
    except UnknownProfileError as exc:
        raise UnknownProfileError(f"{where}: {exc}") from None
    fmt = qc.get("format", "native")
    if fmt not in formats:
        raise CheckpointError(f"{where}: unknown format {fmt!r}; expected one of {formats}")
    block = qc.get("block_size", C.BLOCK_SIZE)
    if block != C.BLOCK_SIZE or isinstance(block, bool):
        raise CheckpointError(f"{where}: block_size must be {C.BLOCK_SIZE}, got {block!r}")
    version = qc.get("codec_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{where}: codec_version must be a positive integer, got {version!r}")
    if version > CODEC_VERSION:
        raise CheckpointError(f"{where}: codec_version {version} is newer than this reader's codec (version "
                              f"{CODEC_VERSION}); its bytes may follow rules this reader does not know: upgrade "
                              f"mxfp4-rl to load it")
    if model_type is not None and fmt in FORMATS:
        spec = ARCHS.get(model_type) if isinstance(model_type, str) else None
        if spec is None:
            raise CheckpointError(f"{where}: model_type {model_type!r} has no MXFP4 expert layout; supported: "
                                  f"{', '.join(ARCHS)}")
        if fmt not in spec.formats:
            raise CheckpointError(f"{where}: format {fmt!r} is not available for model_type {model_type!r}; "
                                  f"available: {', '.join(spec.formats)}")
    return {**qc, "format": fmt, "block_size": block, "codec_version": version}


def read_config(ckpt_dir: str | Path) -> dict:
    """config.json of a checkpoint directory; a clear error when it is missing or not a JSON object."""
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"'{ckpt_dir}' has no config.json: not a Hugging Face model directory")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


# ------------------------------------------------------------------------------------------------ expert geometry
@dataclasses.dataclass(frozen=True)
class ExpertDims:
    """What config.json says about the routed experts; None where it does not say."""

    num_experts: int | None = None
    hidden: int | None = None
    intermediate: int | None = None
    num_layers: int | None = None
    source: str = "config.json"

    def shape(self, proj: str) -> tuple[int | None, int | None]:
        """Logical [N, K] of one expert's projection (gate_up: gpt-oss's fused rows, 2I)."""
        h, i = self.hidden, self.intermediate
        return {"gate": (i, h), "up": (i, h), "gate_up": (2 * i if i else None, h), "down": (h, i)}[proj]


def expert_dims(config: Mapping[str, Any], where: str = "config.json") -> ExpertDims:
    experts_key, inter_key = DIM_KEYS.get(config.get("model_type"), (None, None))

    def get(key):
        if key is None or key not in config:
            return None
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CheckpointError(f"{where}: {key} must be a positive integer, got {value!r}")
        return value

    return ExpertDims(get(experts_key), get("hidden_size"), get(inter_key), get("num_hidden_layers"), where)


@dataclasses.dataclass(frozen=True)
class ExpertHeader:
    """One expert tensor as its header describes it: logical [N, K] of one expert (K = input features)."""

    name: str
    layer: int
    expert: int | None  # None: fused over `count` experts (gpt-oss)
    proj: str  # gate / up / down, or gate_up when fused
    shape: tuple[int, ...]
    count: int = 1


def _infer_dims(headers: list[ExpertHeader], dims: ExpertDims) -> ExpertDims:
    """Fill hidden / intermediate that config.json does not give from the first expert tensor, so a single
    transposed or resized tensor still stands out against its siblings."""
    if dims.hidden and dims.intermediate or not headers:
        return dims
    first = headers[0]
    n, k = first.shape
    i, h = {"gate": (n, k), "up": (n, k), "gate_up": (n // 2, k), "down": (k, n)}[first.proj]
    return dataclasses.replace(dims, hidden=dims.hidden or h, intermediate=dims.intermediate or i,
                               source=f"{dims.source} and tensor '{first.name}'")


def _check_one(hd: ExpertHeader, dims: ExpertDims) -> None:
    want = dims.shape(hd.proj)
    if len(hd.shape) != 2 or any(w is not None and w != g for w, g in zip(want, hd.shape)):
        hint = " (transposed?)" if tuple(hd.shape) == tuple(reversed(want)) else ""
        raise ShapeError(f"tensor '{hd.name}': layer {hd.layer} {hd.proj} must be [N, K] = {tuple(want)} per expert "
                         f"(hidden_size {dims.hidden}, intermediate size {dims.intermediate} from {dims.source}), "
                         f"got {tuple(hd.shape)}{hint}")
    if dims.num_layers is not None and hd.layer >= dims.num_layers:
        raise CheckpointError(f"tensor '{hd.name}': layer {hd.layer} is not below num_hidden_layers "
                              f"{dims.num_layers} of {dims.source}")
    if dims.num_experts is None:
        return
    if hd.expert is not None and hd.expert >= dims.num_experts:
        raise CheckpointError(f"tensor '{hd.name}': expert id {hd.expert} is not below the {dims.num_experts} "
                              f"routed experts of {dims.source} (ids 0..{dims.num_experts - 1})")
    if hd.expert is None and hd.count != dims.num_experts:
        raise CheckpointError(f"tensor '{hd.name}': holds {hd.count} experts, {dims.source} says "
                              f"{dims.num_experts}")


def check_experts(headers: Iterable[ExpertHeader], dims: ExpertDims, complete: bool = True) -> None:
    """Shapes, expert ids and layers against the config, and (complete) every expert of a layer present."""
    headers = list(headers)
    dims = _infer_dims(headers, dims)
    seen: dict[int, set[tuple[int, str]]] = {}
    for hd in headers:
        _check_one(hd, dims)
        experts = range(hd.count) if hd.expert is None else (hd.expert,)
        projs = ("gate", "up") if hd.proj == "gate_up" else (hd.proj,)
        seen.setdefault(hd.layer, set()).update((e, p) for e in experts for p in projs)
    for layer, have in sorted(seen.items()) if complete else ():
        count = dims.num_experts or max(e for e, _ in have) + 1
        missing = [(e, p) for e in range(count) for p in PROJS if (e, p) not in have]
        if missing:
            shown = ", ".join(f"expert {e} {p}" for e, p in missing[:6]) + (" ..." if len(missing) > 6 else "")
            raise CheckpointError(f"layer {layer} lacks {len(missing)} of its {3 * count} routed-expert tensors "
                                  f"({shown}); every layer with routed experts needs gate, up and down of all "
                                  f"{count} experts")


# ------------------------------------------------------------------------------------------------------ scale bytes
@functools.lru_cache(maxsize=None)
def _reserved(profile: str) -> tuple[int, dict[int, str]]:
    reserved = reserved_scale_bytes(profile)
    low = min(reserved)
    assert set(range(low, 256)) == set(reserved), "reserved scale bytes are one range up to 0xFF"
    return low, reserved


def reserved_scale_low(profile: str) -> int:
    """The smallest scale byte the profile reserves (every byte from it up to 0xFF is): a check on a device can
    compare against it and read one flag back."""
    return _reserved(get_profile(profile).name)[0]


def check_scale_bytes(scales: torch.Tensor, profile: str, name: str) -> None:
    """Refuse a scale tensor (uint8 or float8_e8m0fnu, any layout) holding a byte the profile reserves."""
    low, reserved = _reserved(get_profile(profile).name)
    s = scales if scales.dtype == torch.uint8 else scales.view(torch.uint8)
    bad = s >= low
    if not bool(bad.any()):
        return
    idx = tuple(int(i) for i in bad.nonzero()[0])
    byte = int(s[idx])
    raise CheckpointError(f"tensor '{name}': scale byte 0x{byte:02X} ({reserved[byte]}) at index {idx[:-1]} block "
                          f"{idx[-1]}; {int(bad.sum())} block(s) hold bytes >= 0x{low:02X}, which profile "
                          f"{profile!r} reserves: served, they would dequantize to Inf/NaN")


# The engine computes in bf16: a decoded value above bf16's largest finite one (just under 2^128) is Inf. Only blocks
# with a scale byte of at least 253 get there: 6 * 2^125 still fits, 4 * 2^126 = 2^128 does not (quantizing weights
# within a hair of fp32's maximum can produce such a block: a profile's bytes alone do not exclude it).
_RISKY_SCALE = 253


def check_decoded_range(codes: torch.Tensor, scales: torch.Tensor, name: str) -> None:
    """Refuse a packed tensor (canonical codes [..., N, K/2], scales [..., N, K/32]) with a block whose decoded
    magnitude overflows bf16. Looks at the codes only where a scale byte is >= 253 (none in real checkpoints)."""
    s = scales if scales.dtype == torch.uint8 else scales.view(torch.uint8)
    risky = s >= _RISKY_SCALE
    if not bool(risky.any()):
        return
    c = codes if codes.dtype == torch.uint8 else codes.view(torch.uint8)
    nib = torch.stack((c & 0x7, (c >> 4) & 0x7), dim=-1).reshape(*s.shape, C.BLOCK_SIZE)
    top = torch.tensor(C.E2M1_VALUES, dtype=torch.float64)[nib.long().amax(-1)]
    value = top * torch.pow(2.0, s.to(torch.float64) - C.E8M0_BIAS)
    bad = risky & (value > torch.finfo(torch.bfloat16).max)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise CheckpointError(f"tensor '{name}': block {idx[-1]} at index {idx[:-1]} decodes to {float(value[idx]):.3g} "
                              f"(scale byte 0x{int(s[idx]):02X}), beyond bfloat16's range: served, it would be Inf")


# ------------------------------------------------------------------------------------------- packed tensors, planned
@dataclasses.dataclass(frozen=True)
class PackedEntry:
    """One packed expert weight of a checkpoint: its code and scale tensors (per expert, or fused gpt-oss)."""

    header: ExpertHeader
    codes: str
    scales: str


def _check_pair(c: TensorInfo, s: TensorInfo, cdtype: torch.dtype, sdtype: torch.dtype, rank: int) -> tuple:
    """Header checks of a code / scale pair; returns the codes' shape as [..., N, K/2] (gpt-oss blocks flattened)."""
    if c.dtype != cdtype:
        raise DTypeError(f"tensor '{c.name}': expected {cdtype} packed codes, got {c.dtype}")
    if s.dtype != sdtype:
        raise DTypeError(f"tensor '{s.name}': expected {sdtype} E8M0 scales, got {s.dtype}")
    shape = c.shape
    if rank == 3 and len(shape) == 4:  # gpt-oss *_blocks [E, N, K/32, 16]
        if shape[-1] != C.BLOCK_SIZE // 2:
            raise ShapeError(f"tensor '{c.name}': gpt-oss blocks must be [E, N, K/32, 16], got {shape}")
        shape = (*shape[:2], shape[2] * shape[3])
    if len(shape) != rank:
        raise ShapeError(f"tensor '{c.name}': expected {rank} dims, got shape {c.shape}")
    want = (*shape[:-1], shape[-1] * 2 // C.BLOCK_SIZE)
    if shape[-1] * 2 % C.BLOCK_SIZE or tuple(s.shape) != want or shape[-1] == 0:
        raise ShapeError(f"tensor '{s.name}': expected shape {want} to match codes '{c.name}' "
                         f"{c.shape}, got {s.shape}")
    return shape


def _plan_native(reader: CheckpointReader, spec: ArchSpec, fmt: str, strict: bool) -> list[PackedEntry]:
    dsv4 = fmt == "deepseek-v4"
    cdtype, sdtype, scale_suffix = (torch.int8, torch.float8_e8m0fnu, "scale") if dsv4 else \
        (torch.uint8, torch.uint8, "weight_scale")
    pairs: dict[tuple[int, int, str], dict[str, str]] = {}
    for name in reader.names():
        # DeepSeek-V4 names its scale `{prefix}.scale`; map it onto the native `{prefix}.weight_scale` to parse.
        key_name = name
        if dsv4:
            if name.endswith(".weight_scale"):
                continue
            key_name = name.removesuffix(".scale") + ".weight_scale" if name.endswith(".scale") else name
        parsed = spec.parse_native(key_name)
        if parsed is None:
            continue
        layer, expert, proj, suffix = parsed
        pairs.setdefault((layer, expert, proj), {})[suffix] = name
    entries = []
    for key in sorted(pairs, key=lambda k: (k[0], k[1], PROJS.index(k[2]))):
        found = pairs[key]
        try:
            for needed in ("weight", "weight_scale"):
                if needed not in found:
                    have = next(iter(found.values()))
                    missing = have.rsplit(".", 1)[0] + ("." + scale_suffix if needed == "weight_scale" else ".weight")
                    raise CheckpointError(f"tensor '{have}' has no partner '{missing}' in '{reader.dir}'")
            cname, sname = found["weight"], found["weight_scale"]
            shape = _check_pair(reader.info[cname], reader.info[sname], cdtype, sdtype, 2)
        except MXFP4Error:
            if strict:
                raise
            continue  # the engine's loader names this tensor as it arrives (tests/e2e/test_engine_errors.py)
        header = ExpertHeader(cname, key[0], key[1], key[2], (shape[0], shape[1] * 2))
        entries.append(PackedEntry(header, cname, sname))
    return entries


_GPT_OSS_FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)_(blocks|scales)")


def _plan_gpt_oss(reader: CheckpointReader, strict: bool) -> list[PackedEntry]:
    layers = sorted({int(m.group(1)) for m in map(_GPT_OSS_FUSED.fullmatch, reader.names()) if m})
    entries = []
    for layer in layers:
        stem = f"model.layers.{layer}.mlp.experts"
        for proj in ("gate_up_proj", "down_proj"):
            bname, sname = f"{stem}.{proj}_blocks", f"{stem}.{proj}_scales"
            try:
                for n in (bname, sname):
                    if n not in reader:
                        raise CheckpointError(f"tensor '{n}' is missing from '{reader.dir}' (layer {layer} has other "
                                              f"experts)")
                shape = _check_pair(reader.info[bname], reader.info[sname], torch.uint8, torch.uint8, 3)
            except MXFP4Error:
                if strict:
                    raise
                continue
            header = ExpertHeader(bname, layer, None, "gate_up" if proj == "gate_up_proj" else "down",
                                  (shape[1], shape[2] * 2), count=shape[0])
            entries.append(PackedEntry(header, bname, sname))
    return entries


def plan_packed(reader: CheckpointReader, spec: ArchSpec, fmt: str, strict: bool = True) -> list[PackedEntry]:
    """The packed expert weights of a checkpoint in `fmt`, from headers only, in (layer, expert, proj) order.
    strict=False skips a pair with a missing partner or a bad dtype / rank / scale shape instead of refusing it."""
    return _plan_gpt_oss(reader, strict) if fmt == "gpt-oss" else _plan_native(reader, spec, fmt, strict)


@dataclasses.dataclass(frozen=True)
class ValidatedCheckpoint:
    config: dict
    quant_config: dict
    spec: ArchSpec
    entries: list[PackedEntry]

    @property
    def profile(self) -> str:
        return self.quant_config["profile"]

    @property
    def fmt(self) -> str:
        return self.quant_config["format"]


def validate_checkpoint(ckpt_dir: str | Path, *, strict: bool = True) -> ValidatedCheckpoint:
    """Every check that needs no tensor data: config, quantization_config, packed tensor pairs, expert geometry.
    Scale bytes are checked as each scale tensor is read (check_scale_bytes).

    strict=False (the engine, before loading) leaves to its weight loader what that loader already reports in its
    own words, tensor by tensor: a missing partner or tensor, a wrong dtype, a scale shape not matching its codes.
    Everything the loader cannot see (quantization_config, format vs model_type, expert ids beyond the config,
    shapes contradicting config.json) is refused here with the message inspect and the learner give."""
    config = read_config(ckpt_dir)
    where = str(Path(ckpt_dir) / "config.json")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in ARCHS:
        raise CheckpointError(f"{where}: model_type {model_type!r} has no MXFP4 expert layout; supported: "
                              f"{', '.join(ARCHS)}")
    qc = check_quant_config(config.get("quantization_config") or {}, model_type=model_type,
                            where=f"{where}: quantization_config")
    spec = ARCHS[model_type]
    with CheckpointReader(ckpt_dir) as reader:
        entries = plan_packed(reader, spec, qc["format"], strict)
    if not entries and strict:
        raise CheckpointError(f"'{ckpt_dir}' declares quant_method {QUANT_METHOD!r} (format {qc['format']!r}) but "
                              f"holds no packed expert tensor named as that format names them for "
                              f"{spec.model_type!r}")
    check_experts([e.header for e in entries], expert_dims(config, where), complete=strict)
    return ValidatedCheckpoint(config, qc, spec, entries)

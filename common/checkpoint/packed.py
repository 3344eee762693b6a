"""Read the packed MXFP4 experts of an mxfp4_rl checkpoint (any of its formats) as canonical MXFP4Tensors.

Used by the engine plugin and the learner: both get the same bytes from the same loader. Every code tensor must
have its scale tensor (and vice versa) with matching dtype and shape; errors name the offending tensor.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from .. import constants as C
from ..errors import DTypeError, MXFP4Error, ShapeError
from ..layouts import deepseek_v4 as dsv4_layout
from ..layouts import gpt_oss as gpt_oss_layout
from ..profiles import get_profile
from ..tensor import MXFP4Tensor
from .archs import FORMATS, PROJS, ArchSpec, arch_spec
from .convert import QUANT_METHOD
from .safetensors_io import CheckpointReader

ExpertKey = tuple[int, int, str]  # (layer, expert, proj) with proj in gate / up / down


def read_quantization_config(ckpt_dir: str | Path) -> tuple[dict, dict]:
    """(config.json, its validated quantization_config) of an mxfp4_rl checkpoint."""
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"'{ckpt_dir}' has no config.json: not a Hugging Face model directory")
    config = json.loads(path.read_text())
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != QUANT_METHOD:
        raise MXFP4Error(f"{path}: quantization_config.quant_method must be {QUANT_METHOD!r}, "
                         f"got {qc.get('quant_method')!r} (convert with `mxfp4-rl quantize`)")
    get_profile(qc.get("profile", "<missing>"))  # raises UnknownProfileError listing the known ones
    if qc.get("format") not in FORMATS:
        raise MXFP4Error(f"{path}: quantization_config.format must be one of {FORMATS}, got {qc.get('format')!r}")
    if qc.get("block_size") != C.BLOCK_SIZE:
        raise MXFP4Error(f"{path}: quantization_config.block_size must be {C.BLOCK_SIZE}, got {qc.get('block_size')!r}")
    return config, qc


def _checked_pair(codes: torch.Tensor, scales: torch.Tensor, cname: str, sname: str, cdtype, sdtype, rank: int):
    if codes.dtype != cdtype:
        raise DTypeError(f"tensor '{cname}': expected {cdtype} packed codes, got {codes.dtype}")
    if scales.dtype != sdtype:
        raise DTypeError(f"tensor '{sname}': expected {sdtype} E8M0 scales, got {scales.dtype}")
    if codes.dim() != rank:
        raise ShapeError(f"tensor '{cname}': expected {rank} dims, got shape {tuple(codes.shape)}")
    want = (*codes.shape[:-1], codes.shape[-1] * 2 // C.BLOCK_SIZE)
    if codes.shape[-1] * 2 % C.BLOCK_SIZE or tuple(scales.shape) != want:
        raise ShapeError(f"tensor '{sname}': expected shape {want} to match codes '{cname}' "
                         f"{tuple(codes.shape)}, got {tuple(scales.shape)}")


def _native(reader: CheckpointReader, spec: ArchSpec, profile: str, code_dtype, scale_dtype, scale_suffix):
    pairs: dict[ExpertKey, dict[str, str]] = {}
    for name in reader.names():
        # DeepSeek-V4 names its scale `{prefix}.scale`; map it onto the native `{prefix}.weight_scale` to parse.
        key_name = name
        if scale_suffix == "scale":
            if name.endswith(".weight_scale"):
                continue
            key_name = name.removesuffix(".scale") + ".weight_scale" if name.endswith(".scale") else name
        parsed = spec.parse_native(key_name)
        if parsed is None:
            continue
        layer, expert, proj, suffix = parsed
        pairs.setdefault((layer, expert, proj), {})[suffix] = name
    for key in sorted(pairs, key=lambda k: (k[0], k[1], PROJS.index(k[2]))):
        found = pairs[key]
        for needed in ("weight", "weight_scale"):
            if needed not in found:
                have = next(iter(found.values()))
                missing = have.rsplit(".", 1)[0] + ("." + scale_suffix if needed == "weight_scale" else ".weight")
                raise MXFP4Error(f"tensor '{have}' has no partner '{missing}' in '{reader.dir}'")
        cname, sname = found["weight"], found["weight_scale"]
        codes, scales = reader.get(cname), reader.get(sname)
        _checked_pair(codes, scales, cname, sname, code_dtype, scale_dtype, 2)
        if code_dtype == torch.int8:
            yield key, dsv4_layout.from_deepseek_v4(codes, scales, profile, name=cname)
        else:
            yield key, MXFP4Tensor(codes, scales, profile)


def _gpt_oss(reader: CheckpointReader, profile: str):
    layers = sorted({int(n.split(".")[2]) for n in reader.names() if n.endswith("_proj_blocks")})
    for layer in layers:
        stem = f"model.layers.{layer}.mlp.experts"
        loaded = {}
        for proj in ("gate_up_proj", "down_proj"):
            bname, sname = f"{stem}.{proj}_blocks", f"{stem}.{proj}_scales"
            for n in (bname, sname):
                if n not in reader:
                    raise MXFP4Error(f"tensor '{n}' is missing from '{reader.dir}' (layer {layer} has other experts)")
            blocks, scales = reader.get(bname), reader.get(sname)
            _checked_pair(blocks.flatten(-2) if blocks.dim() == 4 else blocks, scales, bname, sname, torch.uint8,
                          torch.uint8, 3)
            loaded[proj] = (blocks, scales)
        gate, up = gpt_oss_layout.from_gpt_oss_gate_up(*loaded["gate_up_proj"], profile)
        down = gpt_oss_layout.from_gpt_oss_down(*loaded["down_proj"], profile)
        for e in range(gate.codes.shape[0]):
            yield (layer, e, "gate"), gate[e]
            yield (layer, e, "up"), up[e]
            yield (layer, e, "down"), down[e]


def iter_packed_experts(ckpt_dir: str | Path) -> Iterator[tuple[ExpertKey, MXFP4Tensor]]:
    """Yield ((layer, expert, proj), MXFP4Tensor [N, K]) for every routed expert, one source tensor in memory at a time.

    proj is "gate", "up" or "down" whatever the checkpoint calls them (DeepSeek w1 / w3 / w2).
    """
    config, qc = read_quantization_config(ckpt_dir)
    spec = arch_spec(config, where=str(Path(ckpt_dir) / "config.json"))
    profile, fmt = qc["profile"], qc["format"]
    with CheckpointReader(ckpt_dir) as reader:
        if fmt == "gpt-oss":
            yield from _gpt_oss(reader, profile)
        elif fmt == "deepseek-v4":
            yield from _native(reader, spec, profile, torch.int8, torch.float8_e8m0fnu, "scale")
        else:
            yield from _native(reader, spec, profile, torch.uint8, torch.uint8, "weight_scale")


def load_packed_experts(ckpt_dir: str | Path) -> dict[ExpertKey, MXFP4Tensor]:
    """All routed experts of an mxfp4_rl checkpoint: {(layer, expert, proj): MXFP4Tensor}; refuses an empty set."""
    out = dict(iter_packed_experts(ckpt_dir))
    if not out:
        raise MXFP4Error(f"'{ckpt_dir}' declares quant_method {QUANT_METHOD!r} but holds no packed expert tensor")
    return out

"""Seeded fuzzing of checkpoint files and metadata (issue 26): random corruptions of a tiny mxfp4_rl checkpoint
(header bytes, truncation, data bytes, header dtypes and shapes, config.json values, tensor names, the shard index)
must end in a clear error (MXFP4Error or OSError, one line naming something) or a correct result (the bytes on disk,
no reserved scale byte, nothing that decodes beyond bf16): never a traceback of another kind, never garbage served.

CI runs a bounded number of cases (150, about 30 s on 2 cores); MXFP4_RL_FUZZ_CASES=5000 searches longer. Case i
uses seed i, so a failure names the case to replay: pytest -k "fuzz and 37".
"""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch

from common import envs
from common.checkpoint import load_packed_experts, quantize_checkpoint, write_tiny_checkpoint
from common.checkpoint.inspect import inspect_checkpoint
from common.checkpoint.safetensors_io import INDEX_NAME
from common.cli import main
from common.errors import MXFP4Error
from common.profiles import reserved_scale_bytes

PROFILE = "flashinfer"
CI_CASES = 150
N_CASES = int(envs.FUZZ_CASES.get() or CI_CASES)
REFUSE, ACCEPT, EITHER = "refuse", "accept", "either"
TAGS = ["BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "F32", "F64", "I32", "I64", "F8_E4M3", "F8_E5M2", "F8_E8M0",
        "F4", "XX"]
CONFIG_VALUES = [None, 0, 1, 2, 99, -1, "1", 1.0, True, [], {}, "native", "gpt-oss", "deepseek-v4", "ocp", "nope",
                 "qwen3_moe", "gpt_oss", "llama", 7, 8, 9, 32, 64, 128, 16]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    src = write_tiny_checkpoint(root / "bf16", arch="qwen3_moe", seed=4)
    single = quantize_checkpoint(src, root / "single", profile=PROFILE, progress=False)
    sharded = quantize_checkpoint(src, root / "sharded", profile=PROFILE, max_shard_bytes="60KB", progress=False)
    return root, single, sharded, load_packed_experts(single)


# ------------------------------------------------------------------------------------------------ file surgery
def _split(path: Path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(path: Path, header: dict, data: bytes) -> None:
    hdr = json.dumps(header).encode()
    hdr += b" " * (-len(hdr) % 8)
    path.write_bytes(struct.pack("<Q", len(hdr)) + hdr + data)


def _shard(d: Path, rng, experts: bool = False) -> Path:
    """A random shard file (experts: one holding expert tensors)."""
    files = sorted(d.glob("*.safetensors"))
    if experts:
        files = [f for f in files if _experts(_split(f)[0])]
    return rng.choice(files)


def _experts(header: dict) -> list[str]:
    return sorted(k for k in header if ".experts." in k)


def _retype(d: Path, rng):
    """One tensor gets another dtype tag and/or shape, with consistent offsets (zero data): only the header lies."""
    path = _shard(d, rng)
    header, data = _split(path)
    meta = header.pop("__metadata__", None)
    name = rng.choice(_experts(header) or sorted(header))
    h = header[name]
    old = (h["dtype"], list(h["shape"]))
    if rng.random() < 0.5:
        h["dtype"] = rng.choice(TAGS[:-2])  # tags safetensors knows (F4 / XX: _raw_header)
    else:
        first, *rest = h["shape"] or [1]
        h["shape"] = rng.choice([h["shape"][::-1], [first + 1, *rest], [first], [*h["shape"], 1],
                                 [first, *(2 * r for r in rest)]])
    size = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
            "BF16": 2, "F32": 4, "I32": 4, "F64": 8, "I64": 8}[h["dtype"]]
    chunks, offset = {}, 0
    for key, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        a, b = v["data_offsets"]
        n = 1
        for s in v["shape"]:
            n *= s
        chunk = bytes(n * size) if key == name else data[a:b]
        v["data_offsets"] = [offset, offset + len(chunk)]
        chunks[key] = chunk
        offset += len(chunk)
    _join(path, {**({"__metadata__": meta} if meta else {}), **header}, b"".join(chunks.values()))
    if ".experts." not in name:
        return ACCEPT  # the packed loader never reads it; inspect lists it under its dtype
    return REFUSE if (h["dtype"], list(h["shape"])) != old else ACCEPT


def _raw_header(d: Path, rng):
    """Edit the header JSON text: a random byte, an unknown dtype tag, or the length prefix."""
    path = _shard(d, rng)
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    kind = rng.choice(["byte", "tag", "length"])
    if kind == "byte":
        raw[8 + rng.randrange(n)] = rng.randrange(256)
        path.write_bytes(bytes(raw))
        return EITHER
    if kind == "tag":
        text = raw[8:8 + n].decode()
        if '"U8"' not in text:
            return ACCEPT
        text = text.replace('"U8"', f'"{rng.choice(["F4", "XX", "u8"])}"', 1)
        path.write_bytes(struct.pack("<Q", len(text)) + text.encode() + bytes(raw[8 + n:]))
        return REFUSE
    path.write_bytes(struct.pack("<Q", rng.choice([0, 1, n - 1, n + 8, len(raw), 2**62])) + bytes(raw[8:]))
    return REFUSE


def _truncate(d: Path, rng):
    path = _shard(d, rng)
    raw = path.read_bytes()
    path.write_bytes(raw[:rng.randrange(len(raw))])
    return REFUSE


def _data_bytes(d: Path, rng):
    """Overwrite random bytes of one expert tensor's data: codes are always valid, scales may hit reserved bytes."""
    path = _shard(d, rng, experts=True)
    header, data = _split(path)
    name = rng.choice(_experts(header))
    a, b = header[name]["data_offsets"]
    data = bytearray(data)
    reserved = set(reserved_scale_bytes(PROFILE))
    verdict = ACCEPT
    for _ in range(rng.randint(1, 4)):
        byte = rng.choice([rng.randrange(256), 0xFE, 0xFF, 0xFD, 0x00])
        data[a + rng.randrange(b - a)] = byte
        if name.endswith("weight_scale") and (byte in reserved or byte >= 0xFD):
            verdict = EITHER  # a reserved byte must be refused; 0xFD is refused when its block decodes beyond bf16
    _join(path, header, bytes(data))
    return verdict


def _config(d: Path, rng):
    cfg = json.loads((d / "config.json").read_text())
    if not isinstance(cfg, dict) or not isinstance(cfg.get("quantization_config"), dict):
        return EITHER  # replaced by an earlier edit
    target = cfg if rng.random() < 0.4 else cfg["quantization_config"]
    keys = (["model_type", "num_experts", "hidden_size", "moe_intermediate_size", "num_hidden_layers"]
            if target is cfg else ["quant_method", "profile", "format", "block_size", "codec_version"])
    key = rng.choice(keys)
    value = rng.choice(CONFIG_VALUES)
    if rng.random() < 0.15:
        target.pop(key)
    else:
        target[key] = value
    if rng.random() < 0.05:
        cfg = rng.choice([[], "x", None, {"quantization_config": 3}])
    (d / "config.json").write_text(json.dumps(cfg))
    return EITHER


def _rename(d: Path, rng):
    """An expert tensor (and its partner) renamed to an expert id or layer the config does not have."""
    path = _shard(d, rng, experts=True)
    header, data = _split(path)
    name = rng.choice([k for k in _experts(header) if k.endswith(".weight")] or _experts(header))
    parts = name.split(".")
    if rng.random() < 0.5:
        parts[5] = str(rng.choice([8, 9, 100]))  # expert id
    else:
        parts[2] = str(rng.choice([2, 7]))  # layer
    new = ".".join(parts)
    for old_n, new_n in ((name, new), (name + "_scale", new + "_scale")):
        if old_n in header:
            header[new_n] = header.pop(old_n)
    _join(path, header, data)
    index = d / INDEX_NAME
    if index.is_file():
        idx = json.loads(index.read_text())
        for old_n, new_n in ((name, new), (name + "_scale", new + "_scale")):
            if old_n in idx["weight_map"]:
                idx["weight_map"][new_n] = idx["weight_map"].pop(old_n)
        index.write_text(json.dumps(idx))
    return REFUSE


def _index(d: Path, rng):
    index = d / INDEX_NAME
    idx = json.loads(index.read_text())
    wm = idx["weight_map"]
    kind = rng.choice(["drop", "list", "str", "outside", "missing", "swap", "json", "extra"])
    name = rng.choice(sorted(wm))
    if kind == "drop":
        idx.pop("weight_map")
    elif kind == "list":
        idx["weight_map"] = sorted(wm)
    elif kind == "str":
        idx["weight_map"] = "model.safetensors"
    elif kind == "outside":
        shutil.copy(d / wm[name], d.parent / f"{d.name}-{wm[name]}")
        wm[name] = f"../{d.name}-{wm[name]}"
    elif kind == "missing":
        wm[name] = "model-00009-of-00009.safetensors"
    elif kind == "swap":
        others = sorted(set(wm.values()) - {wm[name]})
        wm[name] = others[0]
    elif kind == "extra":
        wm["model.layers.0.mlp.experts.0.gate_proj.weight_extra"] = wm[name]
    if kind == "json":
        index.write_text(json.dumps(idx)[:-3])
    else:
        index.write_text(json.dumps(idx))
    return REFUSE


MUTATIONS = [_retype, _raw_header, _truncate, _data_bytes, _config, _rename]


# ---------------------------------------------------------------------------------------------------------- oracle
def _check_result(experts: dict, good: dict, ckpt: Path) -> None:
    """An accepted checkpoint: the bytes on disk, nothing reserved, nothing that decodes beyond bf16."""
    reserved = torch.tensor(sorted(reserved_scale_bytes(PROFILE)), dtype=torch.uint8)
    for key, q in experts.items():
        assert not torch.isin(q.scales, reserved).any(), (key, "reserved scale byte accepted")
        assert torch.isfinite(q.dequantize(torch.bfloat16)).all(), (key, "decodes to Inf/NaN")
    assert experts.keys() == good.keys(), "expert set changed silently"


def _run(path: Path, good: dict, verdict: str, capsys) -> None:
    try:
        experts = load_packed_experts(path)
    except (MXFP4Error, OSError) as exc:
        msg = str(exc)
        assert msg and "\n" not in msg.strip(), msg
        assert verdict != ACCEPT, f"refused a checkpoint that should load: {msg}"
        # inspect refuses it too, in one line and exit 2 (or reports a checkpoint that no longer claims mxfp4_rl)
        rc = main(["inspect", str(path)])
        out, err = capsys.readouterr()
        if rc == 0:
            cfg = json.loads((path / "config.json").read_text())
            qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
            assert not (isinstance(qc, dict) and qc.get("quant_method") == "mxfp4_rl"), (msg, out)
            return
        assert rc == 2 and err.startswith("mxfp4-rl: error: ") and err.count("\n") == 1, err
        return
    assert verdict != REFUSE, "accepted a corruption that must be refused"
    _check_result(experts, good, path)
    report = inspect_checkpoint(path)
    assert report["summary"]["expert_tensors"] == len(experts)


@pytest.mark.parametrize("case", range(N_CASES))
def test_fuzz_checkpoint(seeds, tmp_path, capsys, case):
    root, single, sharded, good = seeds
    rng = random.Random(case)
    base = sharded if rng.random() < 0.35 else single
    mutations = MUTATIONS + ([_index] if base is sharded else [])
    path = tmp_path / "ckpt"
    shutil.copytree(base, path)
    verdicts = [rng.choice(mutations)(path, rng)]
    if rng.random() < 0.25:  # and a config edit on top (file edits assume a readable file)
        verdicts.append(_config(path, rng))
    verdict = REFUSE if REFUSE in verdicts else EITHER if EITHER in verdicts else ACCEPT
    _run(path, good, verdict, capsys)

"""Safetensors checkpoints read and written one tensor at a time.

Reading: `CheckpointReader` resolves a directory (single `model.safetensors`, a sharded set with
`model.safetensors.index.json`, or loose `*.safetensors` files) and loads one tensor per call through `safe_open`, so a
conversion never holds the whole model in memory.

Writing: `write_sharded` lays out every shard's header from a plan (names, dtypes, shapes known in advance), then
streams each tensor's bytes to disk as it is produced. Peak memory is one produced group of tensors, not one shard.
The file layout follows the safetensors format (8-byte little-endian header length, JSON header with byte offsets
into the data section, header padded with spaces to 8 bytes, tensors back to back); safetensors' own loader reads the
result (tests/common/test_checkpoint.py).
"""

from __future__ import annotations

import dataclasses
import json
import struct
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError, DTypeError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# torch dtype <-> safetensors dtype tag (safetensors format spec, "dtype" field).
_TO_TAG = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.uint16: "U16",
    torch.int32: "I32", torch.uint32: "U32", torch.int64: "I64", torch.uint64: "U64", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2", torch.float8_e8m0fnu: "F8_E8M0",
}
_FROM_TAG = {tag: dt for dt, tag in _TO_TAG.items()}


def dtype_from_tag(tag: str) -> torch.dtype:
    if tag not in _FROM_TAG:
        raise DTypeError(f"safetensors dtype {tag!r} is not supported; known: {sorted(_FROM_TAG)}")
    return _FROM_TAG[tag]


def _read_header(f: Path) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor of one safetensors file; a one-line error naming the file and tensor
    for a truncated or corrupt file or a dtype torch cannot hold."""
    try:
        with safe_open(str(f), framework="pt") as h:
            out = []
            for name in h.keys():
                sl = h.get_slice(name)
                try:
                    dtype = dtype_from_tag(sl.get_dtype())
                except DTypeError as exc:
                    raise DTypeError(f"tensor '{name}' in '{f}': {exc}") from None
                out.append((name, dtype, tuple(sl.get_shape())))
            return out
    except SafetensorError as exc:
        raise CheckpointError(f"'{f}' is not a readable safetensors file (truncated or corrupt?): {exc}") from None


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class TensorInfo(TensorSpec):
    """A tensor of a checkpoint on disk: its spec and the shard file that holds it."""

    file: Path


class CheckpointReader:
    """The tensors of a safetensors checkpoint directory; `get(name)` loads exactly one tensor."""

    def __init__(self, ckpt_dir: str | Path):
        self.dir = Path(ckpt_dir)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"checkpoint directory '{self.dir}' does not exist")
        self.files = self._resolve_files()
        self._handles: dict[Path, object] = {}
        self.info: dict[str, TensorInfo] = {}
        for f in self.files:
            for name, dtype, shape in _read_header(f):
                if name in self.info:
                    raise CheckpointError(f"tensor '{name}' appears in both '{self.info[name].file.name}' and "
                                          f"'{f.name}' of checkpoint '{self.dir}'")
                self.info[name] = TensorInfo(name, dtype, shape, f)
        self._check_index_names()

    def _read_index(self, index: Path) -> dict[str, str]:
        try:
            data = json.loads(index.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"'{index}': not valid JSON ({exc})") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                                       for k, v in weight_map.items()):
            got = type(weight_map).__name__ if isinstance(data, dict) and "weight_map" in data else "none"
            raise CheckpointError(f"'{index}': 'weight_map' must be an object mapping tensor names to shard file "
                                  f"names, got {got}")
        root = self.dir.resolve()
        for f in set(weight_map.values()):
            if not (root / f).resolve().is_relative_to(root) or Path(f).is_absolute():
                raise CheckpointError(f"'{index}' maps tensors to '{f}', which is outside the checkpoint directory "
                                      f"'{self.dir}'; shards must be files inside it")
        return weight_map

    def _resolve_files(self) -> list[Path]:
        index = self.dir / INDEX_NAME
        if index.is_file():
            self.weight_map: dict[str, str] | None = self._read_index(index)
            files = sorted(set(self.weight_map.values()))
            for f in files:
                if not (self.dir / f).is_file():
                    raise FileNotFoundError(f"shard '{f}' named by {INDEX_NAME} is missing from '{self.dir}'")
            return [self.dir / f for f in files]
        self.weight_map = None
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors file in checkpoint directory '{self.dir}'")
        return files

    def _check_index_names(self) -> None:
        if self.weight_map is None:
            return
        for name, f in self.weight_map.items():
            if name not in self.info or self.info[name].file != self.dir / f:
                raise CheckpointError(f"{INDEX_NAME} maps tensor '{name}' to '{f}', but that shard does not hold it")

    def names(self) -> list[str]:
        return list(self.info)

    def __contains__(self, name: str) -> bool:
        return name in self.info

    def get(self, name: str) -> torch.Tensor:
        if name not in self.info:
            raise KeyError(f"tensor '{name}' is not in checkpoint '{self.dir}'")
        f = self.info[name].file
        try:
            if f not in self._handles:
                self._handles[f] = safe_open(str(f), framework="pt")
            return self._handles[f].get_tensor(name)
        except SafetensorError as exc:
            raise CheckpointError(f"tensor '{name}' of '{f}' cannot be read: {exc}") from None

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()




# A group is the set of output tensors produced together (e.g. codes + scales of one weight); groups never straddle
# shards, so a group is produced exactly once.
Group = Sequence[TensorSpec]


def plan_shards(groups: Sequence[Group], max_shard_bytes: int | None) -> list[list[int]]:
    """Split group indices into shards of at most max_shard_bytes (a larger single group gets its own shard)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, g in enumerate(groups):
        gbytes = sum(s.nbytes for s in g)
        if max_shard_bytes is not None and shards[-1] and size + gbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += gbytes
    return shards


def _header(specs: list[TensorSpec], metadata: dict[str, str] | None) -> bytes:
    entries: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for s in specs:
        entries[s.name] = {"dtype": _TO_TAG[s.dtype], "shape": list(s.shape),
                           "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; writing on a big-endian host is not supported")
    return memoryview(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())


def _check_produced(spec: TensorSpec, t: torch.Tensor | None) -> torch.Tensor:
    if t is None:
        raise RuntimeError(f"internal: producer did not return planned tensor '{spec.name}'")
    if t.dtype != spec.dtype or tuple(t.shape) != spec.shape:
        raise RuntimeError(f"internal: tensor '{spec.name}' was planned as {spec.dtype} {spec.shape}, "
                           f"produced {t.dtype} {tuple(t.shape)}")
    return t


def write_sharded(out_dir: str | Path, groups: Sequence[Group], produce: Callable[[int], dict[str, torch.Tensor]], *,
                  max_shard_bytes: int | str | None = None, metadata: dict[str, str] | None = None,
                  on_group_done: Callable[[int], None] | None = None) -> list[Path]:
    """Write the planned groups as model.safetensors (one shard) or model-0000i-of-0000n.safetensors + index.json.

    produce(i) returns the tensors of group i by name; it is called once per group, in order.
    """
    out = Path(out_dir)
    shards = plan_shards(groups, parse_size(max_shard_bytes))
    n = len(shards)
    names = [SINGLE_NAME] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    weight_map: dict[str, str] = {}
    total = 0
    for fname, shard in zip(names, shards):
        specs = [s for i in shard for s in groups[i]]
        with open(out / fname, "wb") as fh:
            fh.write(_header(specs, metadata or {"format": "pt"}))
            for i in shard:
                produced = produce(i)
                for spec in groups[i]:
                    fh.write(_tensor_bytes(_check_produced(spec, produced.get(spec.name))))
                    weight_map[spec.name] = fname
                    total += spec.nbytes
                del produced  # free this group before the next one is read: peak memory stays one group
                if on_group_done is not None:
                    on_group_done(i)
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return [out / f for f in names]


def parse_size(text: str | int | None) -> int | None:
    """'5GB' / '500MB' / '10KiB' / 1234 -> bytes (decimal units as huggingface_hub, binary with 'i')."""
    if text is None or isinstance(text, int):
        return text
    t = text.strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "B": 1}
    for suffix, mult in units.items():
        if t.endswith(suffix) and t[: -len(suffix)].replace(".", "", 1).isdigit():
            return int(float(t[: -len(suffix)]) * mult)
    if t.isdigit():
        return int(t)
    raise ValueError(f"cannot parse size {text!r}; expected e.g. '5GB', '500MB', '64KiB' or a byte count")


def save_tensors(out_dir: str | Path, tensors: dict[str, torch.Tensor], *, max_shard_bytes: int | str | None = None,
                 metadata: dict[str, str] | None = None) -> list[Path]:
    """Write an in-memory dict of tensors, sharded like write_sharded (names kept in the dict's order)."""
    items = list(tensors.items())
    groups = [[TensorSpec(k, v.dtype, tuple(v.shape))] for k, v in items]
    return write_sharded(out_dir, groups, lambda i: dict([items[i]]), max_shard_bytes=max_shard_bytes,
                         metadata=metadata)

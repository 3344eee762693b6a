"""Issue 26, "tracebacks and lost work in the CLI": every failure class ends in one line naming the file or tensor
and a non-zero exit, DST is checked before any work, SIGTERM removes the staging directory like Ctrl-C, a closed
pipe ends `inspect` quietly, and DST gets ordinary (umask) modes so another user can read it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from common.checkpoint import quantize_checkpoint, save_tensors, write_tiny_checkpoint
from common.checkpoint.safetensors_io import INDEX_NAME
from common.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def src(tmp_path):
    return write_tiny_checkpoint(tmp_path / "src", arch="qwen3_moe", seed=2)


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("mxfp4-rl: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def _left(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


def _sharded(src: Path, dst: Path) -> Path:
    """src re-saved as several shards with an index."""
    from common.checkpoint import CheckpointReader

    dst.mkdir()
    with CheckpointReader(src) as r:
        save_tensors(dst, {n: r.get(n) for n in r.names()}, max_shard_bytes="200KB")
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


def _set_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


# --------------------------------------------------------------------------------------- bad source files: one line
def test_truncated_shard_names_the_file(src, tmp_path, capsys):
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    for argv in (["quantize", str(src), str(tmp_path / "out"), "-q"], ["inspect", str(src)]):
        assert main(argv) == 2
        _one_line_error(capsys, str(f), "truncated or corrupt")
    assert "out" not in _left(tmp_path)


def _retag(path: Path, name: str, tag: str, itemsize_bits: int) -> None:
    """Rewrite a safetensors file with tensor `name` stored under dtype `tag` (consistent offsets, zero bytes)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", None)
    data, out, offset = raw[8 + n:], {}, 0
    for key, h in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        a, b = h["data_offsets"]
        chunk = data[a:b]
        if key == name:
            elems = 1
            for d in h["shape"]:
                elems *= d
            h["dtype"], chunk = tag, bytes(elems * itemsize_bits // 8)
        out[key] = {**h, "data_offsets": [offset, offset + len(chunk)]}
        offset += len(chunk)
        out[key]["_bytes"] = chunk
    body = b"".join(v.pop("_bytes") for v in out.values())
    hdr = json.dumps({**({"__metadata__": meta} if meta else {}), **out}).encode()
    hdr += b" " * (-len(hdr) % 8)
    path.write_bytes(struct.pack("<Q", len(hdr)) + hdr + body)


@pytest.mark.parametrize("tag,bits,needle", [
    ("F4", 4, "safetensors dtype 'F4' is not supported"),
    ("F8_E4M3", 8, "routed-expert weights must be bf16/fp16/fp32 to quantize, got torch.float8_e4m3fn"),
])
def test_unsupported_header_dtype_names_file_and_tensor(src, tmp_path, capsys, tag, bits, needle):
    name = "model.layers.0.mlp.experts.1.down_proj.weight"
    _retag(src / "model.safetensors", name, tag, bits)
    for argv in (["quantize", str(src), str(tmp_path / "out"), "-q"], ["inspect", str(src)]):
        if tag == "F8_E4M3" and argv[0] == "inspect":
            assert main(argv) == 0  # a readable dtype: inspect of a bf16 checkpoint reports it
            capsys.readouterr()
            continue
        assert main(argv) == 2
        _one_line_error(capsys, name, needle)
    assert "out" not in _left(tmp_path)


def test_corrupt_header_names_the_file(src, tmp_path, capsys):
    _set_header(src / "model.safetensors", lambda h: h["model.norm.weight"].__setitem__("dtype", "XX"))
    assert main(["inspect", str(src)]) == 2
    _one_line_error(capsys, str(src / "model.safetensors"), "unknown variant `XX`")


@pytest.mark.parametrize("index,needle", [
    ({"metadata": {}}, "'weight_map' must be an object mapping tensor names to shard file names, got none"),
    ({"weight_map": ["model-00001-of-00002.safetensors"]}, "got list"),
    ("{broken", "not valid JSON"),
])
def test_bad_index_names_the_index(src, tmp_path, capsys, index, needle):
    sharded = _sharded(src, tmp_path / "sharded")
    (sharded / INDEX_NAME).write_text(index if isinstance(index, str) else json.dumps(index))
    for argv in (["quantize", str(sharded), str(tmp_path / "out"), "-q"], ["inspect", str(sharded)]):
        assert main(argv) == 2
        _one_line_error(capsys, INDEX_NAME, needle)


def test_index_entry_outside_the_checkpoint_is_refused_as_such(src, tmp_path, capsys):
    sharded = _sharded(src, tmp_path / "sharded")
    index = json.loads((sharded / INDEX_NAME).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    shutil.copy(sharded / first, tmp_path / first)  # exists, but outside the checkpoint directory
    index["weight_map"] = {k: (f"../{v}" if v == first else v) for k, v in index["weight_map"].items()}
    (sharded / INDEX_NAME).write_text(json.dumps(index))
    assert main(["inspect", str(sharded)]) == 2
    _one_line_error(capsys, f"'../{first}', which is outside the checkpoint directory")


# ------------------------------------------------------------------------------------ DST: checked before any work
def _no_work(monkeypatch):
    """Fail the test if any expert is quantized."""
    import common.checkpoint.convert as convert

    def boom(*a, **k):
        raise AssertionError("quantized an expert before DST was checked")

    monkeypatch.setattr(convert, "quantize", boom)


def test_dst_on_a_read_only_mount_is_refused_before_work(src, tmp_path, capsys, monkeypatch):
    _no_work(monkeypatch)
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == ro else real_access(p, mode, **k))
    assert main(["quantize", str(src), str(ro / "out"), "-q"]) == 2
    _one_line_error(capsys, "cannot write the staging directory", str(ro))
    assert list(ro.iterdir()) == []


def test_full_disk_is_refused_before_work(src, tmp_path, capsys, monkeypatch):
    _no_work(monkeypatch)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    assert main(["quantize", str(src), str(tmp_path / "out"), "-q"]) == 2
    _one_line_error(capsys, "the output needs", "only 4,096 are free")
    assert _left(tmp_path) == ["src"]


def test_disk_full_while_writing_is_one_line_and_leaves_nothing(src, tmp_path, capsys, monkeypatch):
    import common.checkpoint.safetensors_io as io

    def enospc(t):
        raise OSError(28, "No space left on device", str(tmp_path / "out"))

    monkeypatch.setattr(io, "_tensor_bytes", enospc)
    assert main(["quantize", str(src), str(tmp_path / "out"), "-q"]) == 2
    _one_line_error(capsys, "No space left on device")
    assert _left(tmp_path) == ["src"]


def test_dst_mount_point_is_refused_before_work(src, tmp_path, capsys, monkeypatch):
    _no_work(monkeypatch)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == mnt or real(p))
    assert main(["quantize", str(src), str(mnt), "-q"]) == 2
    _one_line_error(capsys, "is a mount point", str(mnt / "model"))
    assert _left(tmp_path) == ["mnt", "src"] and list(mnt.iterdir()) == []


def test_dst_symlink_to_an_empty_dir_receives_the_checkpoint(src, tmp_path, capsys):
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    assert main(["quantize", str(src), str(tmp_path / "link"), "-q"]) == 0
    assert (target / "config.json").is_file() and (tmp_path / "link").is_symlink()
    assert main(["inspect", str(tmp_path / "link")]) == 0
    assert not [p for p in _left(tmp_path) if ".partial-" in p]


def test_dst_modes_follow_the_umask_so_other_users_can_read_it(src, tmp_path):
    old = os.umask(0o022)
    try:
        out = quantize_checkpoint(src, tmp_path / "out", profile="flashinfer", progress=False)
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(out).st_mode)
    assert mode == 0o755, oct(mode)  # mkdtemp's 0700 kept a container's non-root user out
    for f in out.iterdir():
        assert os.stat(f).st_mode & stat.S_IROTH, f


# -------------------------------------------------------------------------------------------- signals and pipes
_SLOW_QUANTIZE = textwrap.dedent("""
    import sys, time
    import common.checkpoint.convert as convert
    def slow(*a, **k):
        print("started", flush=True)
        time.sleep(60)
    convert.quantize = slow
    from common.cli import main
    sys.exit(main(["quantize", sys.argv[1], sys.argv[2], "-q"]))
""")


def test_sigterm_removes_the_staging_directory(src, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_QUANTIZE, str(src), str(tmp_path / "out")], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "started\n"
        assert [p for p in _left(tmp_path) if p.startswith(".out.partial-")]  # staging exists mid-conversion
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143 and "Traceback" not in err
    assert err == "mxfp4-rl: terminated by SIGTERM; the partial output was removed\n"
    assert _left(tmp_path) == ["src"]


def test_inspect_into_a_closed_pipe_exits_quietly(src):
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head -1` that has already exited
    try:
        r = subprocess.run([sys.executable, "-m", "common.cli", "inspect", str(src)], cwd=ROOT, stdout=write_end,
                           stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_inspect_piped_to_head_exits_zero(tmp_path):
    ckpt = quantize_checkpoint(write_tiny_checkpoint(tmp_path / "s", seed=3), tmp_path / "q", profile="flashinfer",
                               progress=False)
    r = subprocess.run(f"set -o pipefail; '{sys.executable}' -m common.cli inspect --json '{ckpt}' | head -1",
                       shell=True, executable="/bin/bash", cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == "{\n" and "Error" not in r.stderr, r.stderr

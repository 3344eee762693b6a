"""The compose `quantize` profile's command, run for real on a tiny bf16 checkpoint (container paths mapped to tmp)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.checkpoint import quantize_checkpoint, write_tiny_checkpoint


def _cli() -> Path:
    if importlib.util.find_spec("common.cli") is None:
        pytest.skip("common.cli (the mxfp4-rl console script) does not exist yet")
    exe = Path(sys.executable).parent / "mxfp4-rl"
    assert exe.is_file(), f"console script mxfp4-rl missing beside {sys.executable}: reinstall the project"
    return exe


def _run(compose: dict, src: Path, models: Path) -> subprocess.CompletedProcess:
    svc = compose["services"]["quantize"]
    # The service's mounts: /src -> the bf16 checkpoint, /models -> the served models' directory.
    mapped = [str(src) if a == "/src" else a.replace("/models/", f"{models}/", 1) for a in svc["command"]]
    (entry,) = svc["entrypoint"]
    assert entry == "mxfp4-rl"
    return subprocess.run([str(_cli()), *mapped], capture_output=True, text=True, timeout=300)


def test_quantize_command_writes_the_served_checkpoint(compose, example_env, tmp_path):
    src = write_tiny_checkpoint(tmp_path / "bf16", "qwen3_moe", seed=1)
    models = tmp_path / "models"
    models.mkdir()
    out = _run(compose, src, models)
    assert out.returncode == 0, out.stderr[-3000:]
    served = models / example_env["MODEL_NAME"]
    qcfg = json.loads((served / "config.json").read_text())["quantization_config"]
    expected = ("mxfp4_rl", example_env["MXFP4_PROFILE"], "native")
    assert (qcfg["quant_method"], qcfg["profile"], qcfg["format"]) == expected
    # The CLI is the codec's converter: the same files, byte for byte, as the library call with the same settings.
    ref = quantize_checkpoint(src, tmp_path / "ref", profile=example_env["MXFP4_PROFILE"], progress=False,
                              max_shard_bytes=example_env["MXFP4_MAX_SHARD_SIZE"])
    names = sorted(p.name for p in ref.iterdir())
    assert sorted(p.name for p in served.iterdir()) == names and any(n.endswith(".safetensors") for n in names)
    for name in names:
        assert (served / name).read_bytes() == (ref / name).read_bytes(), name

    # A second `up --profile quantize` must not overwrite the existing conversion (docs/deploy.md says so).
    again = _run(compose, src, models)
    assert again.returncode != 0 and "not empty" in again.stderr, again.stderr[-3000:]

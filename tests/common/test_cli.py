"""The `mxfp4-rl` console script: quantize, inspect, example, plugin subcommands and error handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from common.audit import tensor_hash
from common.checkpoint import load_packed_experts, write_tiny_checkpoint
from common.cli import main


def test_example_builds_quantizes_inspects_and_verifies(tmp_path, capsys):
    assert main(["example", "--out", str(tmp_path), "-q"]) == 0
    out = capsys.readouterr().out
    assert "quantization mxfp4_rl  profile=flashinfer format=native block_size=32" in out
    assert "summary: 48 MXFP4 expert tensors, 393,216 params at 4.25 bits/param" in out
    assert "verified: all 48 packed expert tensors read back from disk equal quantize(bf16 source) bit for bit" in out
    assert "scale exponent histogram" in out and "L0.E0.gate" in out
    assert (tmp_path / "qwen3_moe-mxfp4" / "config.json").is_file()
    # a second run into the same place is refused cleanly, before anything is overwritten
    assert main(["example", "--out", str(tmp_path), "-q"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_example_gpt_oss_format(tmp_path, capsys):
    assert main(["example", "--arch", "gpt_oss", "--format", "gpt-oss", "--profile", "ocp", "--out", str(tmp_path),
                 "-q"]) == 0
    out = capsys.readouterr().out
    assert "profile=ocp format=gpt-oss" in out and "mxfp4/gpt-oss" in out and "verified: all 48" in out


def test_quantize_then_inspect_json(tmp_path, capsys):
    src = write_tiny_checkpoint(tmp_path / "src", arch="deepseek_v3")
    assert main(["quantize", str(src), str(tmp_path / "dst"), "--profile", "even", "--max-shard-size", "300KB",
                 "-q"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "dst"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["files"] > 1 and report["quantization_config"]["profile"] == "even"
    assert report["summary"]["expert_tensors"] == 24 and report["summary"]["expert_bits_per_param"] == 4.25
    packed = load_packed_experts(tmp_path / "dst")
    for row in report["experts"]:
        q = packed[(row["layer"], row["expert"], row["proj"])]
        assert row["hash"] == tensor_hash(q) and row["shape"] == list(q.shape)
        assert sum(row["scale_exponents"].values()) == q.scales.numel()


def test_inspect_bf16_checkpoint(tmp_path, capsys):
    src = write_tiny_checkpoint(tmp_path / "src")
    assert main(["inspect", str(src)]) == 0
    assert "summary: no mxfp4_rl expert tensors" in capsys.readouterr().out


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["quantize", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mxfp4-rl: error: ") and "has no config.json" in err and err.count("\n") == 1
    src = write_tiny_checkpoint(tmp_path / "src", hidden_size=48)
    assert main(["quantize", str(src), str(tmp_path / "out"), "-q"]) == 2
    assert "must be a multiple of 32" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse's own usage errors also exit 2
        main(["quantize", str(src), str(tmp_path / "o2"), "--profile", "nvfp4"])
    assert exc.value.code == 2


def test_module_entry_point_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-m", "common.cli", "inspect", str(tmp_path / "missing")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "mxfp4-rl: error: checkpoint directory" in r.stderr and "does not exist" in r.stderr


@pytest.fixture
def plugin_dist(tmp_path, monkeypatch):
    """A real installed distribution (dist-info on sys.path) declaring three `mxfp4_rl.commands` entry points."""
    (tmp_path / "fake_mxfp4_plugin.py").write_text(textwrap.dedent("""
        def register(subparsers):
            p = subparsers.add_parser("hello", help="plugin command")
            p.add_argument("--name", default="world")
            p.set_defaults(func=lambda args: print(f"hello {args.name}") or 0)

        def broken(subparsers):
            raise RuntimeError("plugin exploded")
    """))
    info = tmp_path / "fake_mxfp4_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-mxfp4-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[mxfp4_rl.commands]\nhello = fake_mxfp4_plugin:register\nbroken = fake_mxfp4_plugin:broken\n"
        "missing = no_such_module_xyz:register\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_plugin_commands_load_and_broken_ones_only_warn(plugin_dist, capsys):
    assert main(["hello", "--name", "mxfp4"]) == 0
    captured = capsys.readouterr()
    assert "hello mxfp4" in captured.out
    assert "warning: skipping command plugin 'broken' (fake_mxfp4_plugin:broken): RuntimeError: plugin exploded" \
        in captured.err
    assert "warning: skipping command plugin 'missing'" in captured.err and "ModuleNotFoundError" in captured.err
    assert main(["inspect", str(plugin_dist / "nowhere")]) == 2  # core commands unaffected

"""Logging (common/log.py): results on stdout, everything else on stderr; --quiet and MXFP4_RL_LOG_LEVEL; no print
in library code; the engines our commands start log at WARNING unless the user chose a level."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from common import cli

ROOT = Path(__file__).resolve().parents[2]
# Where print is right: the CLI and the demo print their results; `python -m common.envs` prints the README table.
PRINT_ALLOWED = {"common/cli.py", "common/envs.py", "mxfp4_train/demo.py"}


def test_library_code_logs_instead_of_printing():
    offenders = []
    for pkg in ("common", "mxfp4_serve", "mxfp4_train"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in PRINT_ALLOWED:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                    offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, f"print() in library code (use logging.getLogger(__name__)): {offenders}"


def test_cli_results_on_stdout_and_quiet_stderr(tmp_path, capsys, monkeypatch):
    for k in ("VLLM_LOGGING_LEVEL", "VLLM_LOGGING_STREAM"):
        # setenv first so that monkeypatch records the variable's absence and removes what the command sets:
        # a delenv of an absent variable records nothing, and the command's setdefault would outlive the test
        # (later tests' engine subprocesses would inherit errors-only logging)
        monkeypatch.setenv(k, "unset-by-test")
        monkeypatch.delenv(k)
    assert cli.main(["-q", "example", "--out", str(tmp_path / "a")]) == 0
    out, err = capsys.readouterr()
    assert "verified: all" in out and "MXFP4 checkpoint" in out
    assert err == ""  # no progress bar, no info lines
    # for any engine a command starts (the demo's children): errors only, and on stderr (vLLM's default is stdout)
    assert os.environ["VLLM_LOGGING_LEVEL"] == "ERROR"
    assert os.environ["VLLM_LOGGING_STREAM"] == "ext://sys.stderr"


def test_a_level_the_user_set_for_vllm_is_kept(monkeypatch):
    from common.log import setup_command_logging

    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    monkeypatch.setenv("VLLM_LOGGING_STREAM", "ext://sys.stdout")
    assert setup_command_logging(quiet=True) == "WARNING"
    assert (os.environ["VLLM_LOGGING_LEVEL"], os.environ["VLLM_LOGGING_STREAM"]) == ("DEBUG", "ext://sys.stdout")
    monkeypatch.setenv("MXFP4_RL_LOG_LEVEL", "ERROR")
    assert setup_command_logging() == "ERROR"


def _learner_logs(level: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MXFP4_RL_LOG_LEVEL"}
    if level is not None:
        env["MXFP4_RL_LOG_LEVEL"] = level
    code = ("import logging, mxfp4_train\n"
            "log = logging.getLogger('mxfp4_train.probe')\n"
            "log.debug('d-line'); log.info('i-line'); log.warning('w-line')\n"
            "print('result')")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=env)


def test_mxfp4_rl_log_level_in_a_learner_process():
    debug, unset, bad = _learner_logs("DEBUG"), _learner_logs(None), _learner_logs("LOUD")
    assert debug.stdout == unset.stdout == "result\n"  # logs never reach stdout
    assert all(f"mxfp4_train.probe: {w}-line" in debug.stderr for w in "diw"), debug.stderr
    # unset: the host application decides; Python's last resort shows warnings only
    assert "i-line" not in unset.stderr and "d-line" not in unset.stderr and "w-line" in unset.stderr
    assert bad.returncode != 0 and "MXFP4_RL_LOG_LEVEL must be one of" in bad.stderr

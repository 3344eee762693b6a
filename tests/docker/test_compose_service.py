"""What the rollout deployment promises, read from docker/compose.yaml as Compose resolves it with .env.example."""

from __future__ import annotations

import pytest

import common

from .compose_env import load_compose, read_env_file
from .conftest import COMPOSE_FILE, DOCKERFILE, ENV_EXAMPLE, REPO
from .test_dockerfile import instructions, json_form


def _flag(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, f"{name} must appear exactly once in {argv}"
    return argv[argv.index(name) + 1]


def _bind(svc: dict, target: str) -> dict:
    (vol,) = [v for v in svc["volumes"] if isinstance(v, dict) and v["target"] == target]
    assert vol["type"] == "bind" and vol["bind"]["create_host_path"] is False, vol
    return vol


@pytest.fixture(scope="module")
def vllm(compose) -> dict:
    return compose["services"]["vllm"]


@pytest.fixture(scope="module")
def quantize(compose) -> dict:
    return compose["services"]["quantize"]


def test_serves_mounted_model_read_only_with_our_quantization(vllm, example_env):
    argv = vllm["command"]
    assert _flag(argv, "--quantization") == "mxfp4_rl"
    models = _bind(vllm, "/models")
    assert models["read_only"] is True and models["source"] == example_env["MODELS_DIR"]
    assert argv[0] == f"/models/{example_env['MODEL_NAME']}"
    # The engine reads the profile from the checkpoint; a flag here could contradict it.
    assert not any("profile" in a for a in argv), argv


def test_port_healthcheck_and_published_port_agree(vllm, example_env):
    port = _flag(vllm["command"], "--port")
    assert vllm["healthcheck"]["test"] == ["CMD", "curl", "-fsS", f"http://127.0.0.1:{port}/health"]
    expected = f"{example_env['VLLM_BIND']}:{example_env['VLLM_HOST_PORT']}:{port}"
    assert vllm["ports"] == [expected]
    assert example_env["VLLM_BIND"] == "127.0.0.1", "publish on loopback by default; opening up is the user's choice"
    (expose,) = instructions(DOCKERFILE, "EXPOSE")
    assert expose == port


def test_rollout_engine_flags_come_from_env(vllm, example_env):
    argv = vllm["command"]
    assert _flag(argv, "--max-model-len") == example_env["MAX_MODEL_LEN"]
    assert _flag(argv, "--gpu-memory-utilization") == example_env["GPU_MEMORY_UTILIZATION"]
    assert _flag(argv, "--tensor-parallel-size") == example_env["TENSOR_PARALLEL_SIZE"]
    assert example_env["EXPERT_PARALLEL"] in argv
    assert example_env["EXPERT_PARALLEL"] in ("--enable-expert-parallel", "--no-enable-expert-parallel")
    assert _flag(argv, "--generation-config") == "vllm"


def test_gpu_reservation_restart_and_secrets(vllm, example_env):
    (device,) = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": example_env["GPU_COUNT"], "capabilities": ["gpu"]}
    assert vllm["restart"] == "unless-stopped"
    assert vllm["environment"]["VLLM_API_KEY"] == example_env["VLLM_API_KEY"] == ""
    assert "privileged" not in vllm and "user" not in vllm, "the vllm service runs as the image's non-root user"


def test_quantize_profile_converts_into_the_served_checkpoint(vllm, quantize, example_env):
    assert quantize["profiles"] == ["quantize"] and "profiles" not in vllm
    assert quantize["entrypoint"] == ["mxfp4-rl"]
    sub, src, dst, flag, profile, shard_flag, shard = quantize["command"]
    assert (sub, flag, shard_flag) == ("quantize", "--profile", "--max-shard-size")
    assert shard == example_env["MXFP4_MAX_SHARD_SIZE"]
    assert profile == example_env["MXFP4_PROFILE"] and profile in common.profile_names()
    assert _bind(quantize, "/src") == {
        "type": "bind", "source": example_env["BF16_MODEL_DIR"], "target": src, "read_only": True,
        "bind": {"create_host_path": False},
    }
    out = _bind(quantize, "/models")
    assert out.get("read_only", False) is False and out["source"] == _bind(vllm, "/models")["source"]
    assert dst == vllm["command"][0], "quantize must write exactly the checkpoint that vllm serves"
    assert vllm["depends_on"]["quantize"] == {"condition": "service_completed_successfully", "required": False}
    assert quantize["restart"] == "no"


def test_quantize_runs_as_configurable_user(quantize, example_env):
    assert quantize["user"] == f"{example_env['MXFP4_UID']}:{example_env['MXFP4_GID']}"
    (user,) = instructions(DOCKERFILE, "USER")
    assert quantize["user"] == user, "default quantize user should be the image's own non-root user"


def test_dockerfile_default_command_matches_compose_shape(vllm):
    (cmd,) = instructions(DOCKERFILE, "CMD")
    default = json_form(cmd)
    assert _flag(default, "--quantization") == "mxfp4_rl"
    assert _flag(default, "--port") == _flag(vllm["command"], "--port")


def test_documented_uid_step_gives_compose_a_numeric_user(tmp_path):
    """docs/deploy.md's line that sets MXFP4_UID/GID in docker/.env, run as written on a copy of .env.example: the
    quantize service then runs as this user's numeric ids (a `$(id -u)` left inside .env is not expanded by Compose,
    and read_env_file refuses it like Compose's own parser would misread it)."""
    import os
    import shutil
    import subprocess

    (line,) = [ln.strip() for ln in (REPO / "docs" / "deploy.md").read_text().splitlines()
               if ln.strip().startswith("sed -i") and "MXFP4_UID" in ln]
    (tmp_path / "docker").mkdir()
    shutil.copy(ENV_EXAMPLE, tmp_path / "docker" / ".env")
    subprocess.run(["bash", "-c", line], cwd=tmp_path, check=True)
    env = read_env_file(tmp_path / "docker" / ".env")
    assert (env["MXFP4_UID"], env["MXFP4_GID"]) == (str(os.getuid()), str(os.getgid()))
    quantize = load_compose(COMPOSE_FILE, env)["services"]["quantize"]
    assert quantize["user"] == f"{os.getuid()}:{os.getgid()}"


def test_engine_accepts_learner_syncs_only_when_asked(vllm, example_env):
    """The weight-transfer engine and the sync extension are always configured; vLLM's weight-update endpoints
    (dev mode, not covered by VLLM_API_KEY) stay off unless REFIT_ENDPOINTS=1, and the port stays on loopback."""
    import json

    assert json.loads(_flag(vllm["command"], "--weight-transfer-config")) == {"backend": "mxfp4_rl"}
    assert _flag(vllm["command"], "--worker-extension-cls") == "mxfp4_serve.sync.worker.MXFP4SyncExtension"
    assert example_env["REFIT_ENDPOINTS"] == "0" and vllm["environment"]["VLLM_SERVER_DEV_MODE"] == "0"
    assert example_env["VLLM_BIND"] == "127.0.0.1"

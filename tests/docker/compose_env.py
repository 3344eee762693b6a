"""Read docker/.env.example and resolve ${VAR} references of docker/compose.yaml the way Compose does.

Only the subset of the Compose interpolation syntax that our files use is implemented (`${VAR}`,
`${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`, `${VAR?error}`, `$$`); anything else raises, so a
new construct in compose.yaml cannot slip past the tests. When a real `docker compose` v2 binary is present,
test_compose_spec.py checks this resolver against it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

# Compose spec, "Interpolation": braced form with optional modifier; bare $VAR; $$ escapes a dollar.
_TOKEN = re.compile(
    r"\$\$"
    r"|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?])?(?P<arg>[^}]*)\}"
    r"|\$(?P<bare>[A-Za-z_]\w*)"
)
_ENV_LINE = re.compile(r"^(?P<key>[A-Za-z_][A-Za-z0-9_]*)=(?P<value>[^\"'`$#\s]*)$")


class InterpolationError(ValueError):
    """A required variable is missing, or compose.yaml uses syntax this resolver does not know."""


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; blank lines and # comments skipped. Quotes, `export` and inline comments are
    rejected: Compose and shells disagree on them, so .env.example stays in the form both read alike."""
    env: dict[str, str] = {}
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _ENV_LINE.match(line)
        if m is None:
            raise ValueError(f"{path}:{lineno}: expected KEY=VALUE without quotes or spaces, got {raw!r}")
        if m["key"] in env:
            raise ValueError(f"{path}:{lineno}: {m['key']} is set twice")
        env[m["key"]] = m["value"]
    return env


def variables_used(node: Any) -> dict[str, bool]:
    """Every variable referenced in the values of a loaded compose document (comments do not count)
    -> whether some reference to it carries a default or error clause."""
    used: dict[str, bool] = {}
    if isinstance(node, dict):
        node = list(node.values())
    if isinstance(node, list):
        for child in node:
            for name, guarded in variables_used(child).items():
                used[name] = used.get(name, False) or guarded
    elif isinstance(node, str):
        for m in _TOKEN.finditer(node):
            name = m["name"] or m["bare"]
            if name:
                used[name] = used.get(name, False) or bool(m["op"])
    return used


def interpolate_str(value: str, env: dict[str, str], where: str) -> str:
    def repl(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m["name"] or m["bare"], m["op"], m["arg"] or ""
        if op is None and arg:
            raise InterpolationError(f"{where}: unsupported interpolation {m.group(0)!r}")
        if "$" in arg:
            raise InterpolationError(f"{where}: nested interpolation in {m.group(0)!r} is not supported here")
        have = name in env
        unset_or_empty = not env.get(name)
        if op in (":-", "-"):
            return arg if (unset_or_empty if op == ":-" else not have) else env[name]
        if op in (":?", "?"):
            if unset_or_empty if op == ":?" else not have:
                raise InterpolationError(f"{where}: required variable {name} is missing a value: {arg}")
            return env[name]
        return env.get(name, "")

    return _TOKEN.sub(repl, value)


def interpolate(node: Any, env: dict[str, str], where: str = "$") -> Any:
    """Resolve every string value (never keys, as Compose does) of a loaded compose document."""
    if isinstance(node, dict):
        return {k: interpolate(v, env, f"{where}.{k}") for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env, f"{where}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, str):
        return interpolate_str(node, env, where)
    return node


def load_compose(path: Path, env: dict[str, str] | None) -> dict:
    """The compose document as YAML (merge keys applied); interpolated when env is given."""
    doc = yaml.safe_load(path.read_text())
    return doc if env is None else interpolate(doc, env)

"""Environment switches are declared once (common/envs.py) and read only through it.

A second reader of an `MXFP4_*` variable would parse it its own way (the kernels once took "off" or "no" for 0) and
escape the README's table; a name mentioned nowhere in common.envs.VARIABLES is a switch nobody can find. The
source scan runs over the production packages only: tests and benches may set variables as they like.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest
import torch

from common import envs

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "mxfp4_serve", "mxfp4_train")
ENVS_FILE = ROOT / "common" / "envs.py"
_NAME = re.compile(r"\bMXFP4_[A-Z0-9][A-Z0-9_]*")


def _sources() -> list[Path]:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert files, f"no sources under {ROOT} for {PACKAGES}"
    return files


def _is_environ(node: ast.AST) -> bool:
    """os.environ, or environ imported from os."""
    return ((isinstance(node, ast.Attribute) and node.attr == "environ" and isinstance(node.value, ast.Name)
             and node.value.id == "os") or (isinstance(node, ast.Name) and node.id == "environ"))


def _is_getenv(node: ast.AST) -> bool:
    return ((isinstance(node, ast.Attribute) and node.attr == "getenv" and isinstance(node.value, ast.Name)
             and node.value.id == "os") or (isinstance(node, ast.Name) and node.id == "getenv"))


def _string(node: ast.AST | None, constants: dict[str, str]) -> str | None:
    """The variable name a key expression spells: a literal, a module-level string constant, or an f-string's
    literal head (enough to see the MXFP4_ prefix)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return constants.get(node.id)
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return str(node.values[0].value)
    return None


def env_reads(source: str) -> list[tuple[int, str]]:
    """(line, name) of every read of an environment variable whose name is known from the source: os.environ[...]
    loads, os.environ.get / setdefault / pop, os.getenv, and `... in os.environ`."""
    tree = ast.parse(source)
    constants = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
                 and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
                 for t in n.targets if isinstance(t, ast.Name)}
    reads = []
    for node in ast.walk(tree):
        key = None
        if isinstance(node, ast.Call):
            f = node.func
            method = isinstance(f, ast.Attribute) and f.attr in ("get", "setdefault", "pop") and _is_environ(f.value)
            if (method or _is_getenv(f)) and node.args:
                key = node.args[0]
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and _is_environ(node.value):
            key = node.slice
        elif isinstance(node, ast.Compare) and any(_is_environ(c) for c in node.comparators):
            key = node.left
        name = _string(key, constants)
        if name is not None:
            reads.append((node.lineno, name))
    return reads


def test_the_scanner_sees_every_kind_of_read():
    src = ("import os\nfrom os import environ, getenv\nNAME = 'MXFP4_D'\n"
           "a = os.environ.get('MXFP4_A', '1')\nb = os.environ['MXFP4_B']\nc = os.getenv('MXFP4_C')\n"
           "d = environ.get(NAME)\ne = 'MXFP4_E' in os.environ\nf = getenv(f'MXFP4_{a}')\n"
           "os.environ['MXFP4_W'] = '1'\ng = os.environ.get('HOME')\n")
    # every read, the f-string by its literal head; the assignment to os.environ is no read
    assert sorted(n for _, n in env_reads(src)) == ["HOME", "MXFP4_", "MXFP4_A", "MXFP4_B", "MXFP4_C", "MXFP4_D",
                                                    "MXFP4_E"]


def test_mxfp4_variables_are_read_only_in_common_envs():
    stray = [f"{path.relative_to(ROOT)}:{line}: {name}" for path in _sources() if path != ENVS_FILE
             for line, name in env_reads(path.read_text()) if name.startswith("MXFP4_")]
    assert not stray, ("read these through common.envs (declare the variable there, then envs.NAME.get()):\n"
                       + "\n".join(stray))


def test_every_mxfp4_name_in_production_code_is_declared():
    declared = set(envs.VARIABLES) | set(envs.RETIRED)  # retired ones are named only to warn that they are ignored
    unknown = []
    for path in _sources():
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            for name in _NAME.findall(line):
                # "MXFP4_RL_*" in prose names a family: some declared variable must start with it
                ok = name in declared or (name.endswith("_") and any(d.startswith(name) for d in declared))
                if not ok:
                    unknown.append(f"{path.relative_to(ROOT)}:{line_no}: {name}")
    assert not unknown, ("MXFP4_* names not declared in common.envs.VARIABLES (declare them, or drop the mention "
                         "of a removed switch):\n" + "\n".join(unknown))


@pytest.mark.parametrize("reader, name", [("fast_launch", "MXFP4_FAST_LAUNCH"), ("autotune", "MXFP4_GG_AUTOTUNE")])
def test_kernel_switches_parse_through_envs(reader, name, monkeypatch):
    """The kernels' two switches take exactly 0 or 1, with envs' error; unset means on."""
    from common.grouped_gemm import ops
    from common.kernels import fast_launch

    read = fast_launch.enabled if reader == "fast_launch" else ops.autotune_enabled
    monkeypatch.delenv(name, raising=False)
    assert read() is True
    monkeypatch.setenv(name, "0")
    assert read() is False
    monkeypatch.setenv(name, "1")
    assert read() is True
    monkeypatch.setenv(name, "off")
    with pytest.raises(ValueError, match=f"{name} must be 0 or 1, got 'off'"):
        read()

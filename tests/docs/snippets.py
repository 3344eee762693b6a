"""Fenced code blocks of the user docs (README.md, docs/*.md) and the marker that says how CI covers each one.

Every block a user could paste is preceded (blank lines allowed in between) by one HTML comment, invisible on
GitHub:

  <!-- run -->                                 CI runs the block as written (tests/docs/test_snippets.py): python
                                               blocks in a fresh interpreter of the project's venv, bash blocks
                                               with `bash -euo pipefail`; the blocks of one document run in order
                                               in one scratch directory, as a reader following the page would.
  <!-- test: tests/x.py::test_a[, ...] -->     the block is mirrored by those tests (they must exist); used where
                                               running it would start an engine (a minute each on CPU).
  <!-- needs: GPU (H100/H200), vLLM 0.25 -->   the block cannot run on CI's CPU machine; says what it needs.
  <!-- output: tests/x.py::test_a -->          sample output of a command, whose format that test checks.

A block without a marker fails the suite, so a new snippet is either run, mirrored or explained.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KINDS = ("run", "test", "needs", "output")
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)(?P<lang>[\w+-]*)\s*$")
_MARKER = re.compile(rf"^\s*<!--\s*(?P<kind>{'|'.join(KINDS)})\s*(?::\s*(?P<arg>.*?))?\s*-->\s*$")


@dataclasses.dataclass(frozen=True)
class Block:
    doc: Path          # the markdown file
    line: int          # 1-based line of the opening fence
    lang: str          # info string ("python", "bash", "" ...)
    code: str          # the block's text, dedented by the fence's indent
    kind: str | None   # marker kind (KINDS) or None when unmarked
    arg: str           # text after "kind:" ("" for run)

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def user_docs() -> list[Path]:
    """The documents a user reads: README.md and docs/*.md (bench/ and tests hold records, not instructions)."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def extract(doc: Path) -> list[Block]:
    lines = doc.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence = m["indent"], m["fence"]
        body, j = [], i + 1
        while j < len(lines) and lines[j].strip() != fence:
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        if j == len(lines):
            raise ValueError(f"{doc.relative_to(ROOT)}:{i + 1}: code fence never closed")
        kind, arg = _marker_before(lines, i)
        blocks.append(Block(doc, i + 1, m["lang"], "\n".join(body) + "\n", kind, arg))
        i = j + 1
    return blocks


def _marker_before(lines: list[str], fence: int) -> tuple[str | None, str]:
    k = fence - 1
    while k >= 0 and not lines[k].strip():
        k -= 1
    m = _MARKER.match(lines[k]) if k >= 0 else None
    return (m["kind"], (m["arg"] or "").strip()) if m else (None, "")


def all_blocks() -> list[Block]:
    return [b for doc in user_docs() for b in extract(doc)]


def node_ids(arg: str) -> list[str]:
    """'tests/a.py::test_x, tests/b.py::test_y' -> the two node ids."""
    return [t.strip() for t in arg.split(",") if t.strip()]

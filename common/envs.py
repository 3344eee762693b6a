"""Every environment switch of mxfp4-rl, declared once: name, type, default and one line of doc.

The learner, the engine plugin and the kernels read their `MXFP4_*` variables through this module only (the style
of vLLM's `envs.py`), so a variable is parsed one way everywhere and the docs list them from here
(`python -m common.envs` prints the table of README's "Environment switches"; a test keeps the two equal).
Values are read on every call, not cached at import: tests and benches flip them with monkeypatch / os.environ.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any

_TRUE, _FALSE = "1", "0"


@dataclasses.dataclass(frozen=True)
class EnvVar:
    """One switch. kind "bool" takes exactly 0 or 1; "choice" one of `choices`; "str" any non-empty string.
    default None means unset (the caller decides, e.g. from the checkpoint's quantization_config)."""

    name: str
    kind: str
    default: Any
    doc: str
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("bool", "choice", "str"):
            raise ValueError(f"env var {self.name}: unknown kind {self.kind!r}; expected bool, choice or str")
        if self.kind == "choice" and not self.choices:
            raise ValueError(f"env var {self.name}: kind 'choice' needs its choices")

    def raw(self) -> str | None:
        """The variable as set, or None when unset or empty."""
        value = os.environ.get(self.name)
        return value if value else None

    def get(self, default: Any = None) -> Any:
        """The parsed value; `default` overrides the declared default (for defaults that depend on the device)."""
        warn_retired()
        value = self.raw()
        fallback = self.default if default is None else default
        if value is None:
            return fallback
        if self.kind == "bool":
            if value not in (_TRUE, _FALSE):
                raise ValueError(f"{self.name} must be 0 or 1, got {value!r}")
            return value == _TRUE
        if self.kind == "choice" and value not in self.choices:
            raise ValueError(f"{self.name} must be one of {self.choices}, got {value!r}")
        return value

    def is_set(self) -> bool:
        return self.raw() is not None


VARIABLES: dict[str, EnvVar] = {}
# Switches that existed once and are ignored now, with what replaced them: a user who still sets one is told.
RETIRED = {
    "MXFP4_GG_DECODE": "the decode is chosen by the device (bf16x2 on sm_90+, bits elsewhere); bench/decode_ab.py "
                       "forces one for A/B runs",
    "MXFP4_GG_WORDS": "the word/byte decode is chosen per shape bucket; bench/decode_ab.py forces the byte decode",
    "MXFP4_GG_DOT_SCALED": "tl.dot_scaled was removed (1.2-1.6x slower on Hopper, bench/RESULTS.md)",
}
_warned_retired = False


def warn_retired() -> None:
    """Log once per process for every retired switch that is still set (it would otherwise be ignored silently)."""
    global _warned_retired
    if _warned_retired:
        return
    _warned_retired = True
    for name, why in RETIRED.items():
        if os.environ.get(name):
            logging.getLogger(__name__).warning("%s is set but no longer read: %s", name, why)


def _declare(name: str, kind: str, default: Any, doc: str, choices: tuple[str, ...] = ()) -> EnvVar:
    var = EnvVar(name, kind, default, doc, choices)
    if name in VARIABLES:
        raise ValueError(f"env var {name} declared twice")
    VARIABLES[name] = var
    return var


# ---- engine plugin (mxfp4_serve) ----
PROFILE = _declare(
    "MXFP4_RL_PROFILE", "str", None,
    "codec profile for checkpoints that record none (online quantization of a bf16 checkpoint, other tools' MXFP4 "
    "checkpoints); a checkpoint's own profile always wins")
MOE_BACKEND = _declare(
    "MXFP4_RL_MOE_BACKEND", "str", None,
    "force an MXFP4 MoE backend (cpu_reference, hopper_triton, sm100_flashinfer) instead of the device oracle's "
    "choice; a forced backend that cannot run says why")
MOE_ACTIVATIONS = _declare(
    "MXFP4_RL_MOE_ACTIVATIONS", "choice", None,
    "expert-input format: bf16 (W4A16) or mxfp8 (W4A8, activations quantized by the codec: MXFP8 MMAs on "
    "`sm100_flashinfer`, an emulation on `hopper_triton` and `cpu_reference`, docs/serve.md); overrides the "
    "checkpoint's 'activations'", ("bf16", "mxfp8"))
HOPPER_ONE_MUL = _declare(
    "MXFP4_RL_HOPPER_ONE_MUL", "bool", True,
    "1: hopper_triton layers whose scale bytes are all <= 128 at load use the one-multiply decode (a later sync "
    "bringing a larger byte is refused); 0: always two multiplies")
FINITE_GUARD = _declare(
    "MXFP4_RL_FINITE_GUARD", "choice", "auto",
    "a MoE layer whose output holds NaN/Inf stops the engine with an error naming the layer (HTTP 500, not NaN "
    "log-probs): auto checks CPU engines; 1 also CUDA layers run eagerly (a host sync per layer; CUDA graphs are "
    "never checked); 0 never", ("auto", "0", "1"))

# ---- kernels (common.kernels, common.grouped_gemm) ----
FAST_LAUNCH = _declare(
    "MXFP4_FAST_LAUNCH", "bool", True,
    "1: repeat launches of the grouped-GEMM and LoRA kernels go through the compiled kernel's launcher (less host "
    "time); 0: every launch through kernel[grid]")
PDL = _declare(
    "MXFP4_PDL", "choice", "loop",
    "programmatic dependent launch of the MoE layer's kernels on sm_90+ (common/kernels/pdl.py): off; wait (each "
    "launched early, waits for its predecessor first); early (and lets its successor launch at once); loop (the "
    "GEMMs let it launch after their K loop)", ("off", "wait", "early", "loop"))
GG_AUTOTUNE = _declare(
    "MXFP4_GG_AUTOTUNE", "bool", True,
    "1: autotune the grouped GEMMs per shape bucket; 0: first candidate tile of the bucket (fast start, tests)")

HOPPER_PREFILL = _declare(
    "MXFP4_RL_HOPPER_PREFILL", "choice", "auto",
    "hopper_triton's MoE layer at prefill sizes: auto takes the dense path (experts dequantized into a bounded bf16 "
    "scratch, cuBLAS grouped GEMM) from the measured rows per expert on, fused never, dense always (tests)",
    ("auto", "dense", "fused"))
PREFILL_SCRATCH_MB = _declare(
    "MXFP4_RL_PREFILL_SCRATCH_MB", "str", "2048",
    "the most bf16 weight scratch (MiB) one MoE layer call of the dense prefill path holds; a layer whose experts "
    "need more is done in chunks of experts (one host read of the routing per layer)")

# ---- logging (common.log) ----
LOG_LEVEL = _declare(
    "MXFP4_RL_LOG_LEVEL", "choice", None,
    "level of the common / mxfp4_serve / mxfp4_train loggers, printed on stderr (also inside a vLLM server); unset: "
    "our commands log INFO (WARNING with --quiet) and library use leaves logging to the host application",
    ("DEBUG", "INFO", "WARNING", "ERROR"))

# ---- tests ----
FUZZ_CASES = _declare(
    "MXFP4_RL_FUZZ_CASES", "str", None,
    "tests only: how many seeded random corruptions of a tiny checkpoint tests/common/test_fuzz_checkpoints.py tries "
    "(unset: the bounded CI run of 150); raise it to search longer")


def markdown_table() -> str:
    """The README table of every switch (README's "Environment switches" section holds exactly this)."""
    rows = ["| variable | values | default | what it does |", "|---|---|---|---|"]
    for var in VARIABLES.values():
        values = {"bool": "0 / 1", "str": "name"}.get(var.kind) or " / ".join(var.choices)
        default = "unset" if var.default is None else ("1" if var.default is True else
                                                       "0" if var.default is False else str(var.default))
        rows.append(f"| `{var.name}` | {values} | {default} | {var.doc} |")
    return "\n".join(rows)


def snapshot(names: Callable[[str], bool] = lambda n: True) -> dict[str, str]:
    """The switches currently set (name -> raw value), e.g. to hand them to a child process or log them."""
    return {n: v.raw() for n, v in VARIABLES.items() if names(n) and v.is_set()}


if __name__ == "__main__":
    print(markdown_table())

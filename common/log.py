"""Logging of mxfp4-rl: every module logs through `logging.getLogger(__name__)` under one of three package loggers.

Library code does not configure handlers on its own: inside a user's trainer the host application decides what is
shown (Python's last-resort handler prints our warnings on stderr when nobody configured anything). Where we do:
- in every vLLM process, the plugin's entry point (`mxfp4_serve.plugin.register`) gives our loggers a stderr handler
  at INFO, so the engine log says which profile and backend it picked;
- `MXFP4_RL_LOG_LEVEL` (common.envs) sets that level there, and when `mxfp4_train` is imported, as vLLM's
  `VLLM_LOGGING_LEVEL` does for its own logger;
- our commands (`mxfp4-rl`, the demo, the examples) call `setup_command_logging`: results go to stdout (print),
  everything else (progress, info, warnings) to stderr through logging; `--quiet` keeps warnings and errors only;
  the vLLM engines they start log errors only, on stderr (`VLLM_LOGGING_LEVEL` / `VLLM_LOGGING_STREAM` override).
"""

from __future__ import annotations

import logging
import os
import sys

from . import envs

PACKAGES = ("common", "mxfp4_serve", "mxfp4_train")
_FORMAT = "%(levelname)s %(name)s: %(message)s"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record arrives (pytest's capture, a redirected CLI), not to the
    stream that was current when the handler was made."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # StreamHandler.__init__ assigns it; the property always reads sys.stderr
        pass


def configure(level: str | int) -> None:
    """Give the package loggers `level` and one stderr handler (idempotent: a second call replaces the first)."""
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        for h in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
            logger.removeHandler(h)
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(_FORMAT))
        logger.addHandler(handler)
        # propagate stays on: handlers a host put on the root logger (pytest's caplog, a trainer's file log) still
        # get our records; a host that configured root and also sets MXFP4_RL_LOG_LEVEL sees them twice.


def apply_env(default: str | None = None) -> None:
    """Level `MXFP4_RL_LOG_LEVEL`, else `default`; with neither, logging is left to the host application."""
    level = envs.LOG_LEVEL.get() or default
    if level is not None:
        configure(level)


# What the vLLM engines our commands start (in process, or children inheriting the environment) log, unless the
# user set these: errors only, on stderr. vLLM logs to stdout by default, between our results; its warnings there
# are about its own CPU set-up (tcmalloc, oneDNN, Triton), ~40 lines per engine, none actionable by our command.
QUIET_VLLM = {"VLLM_LOGGING_LEVEL": "ERROR", "VLLM_LOGGING_STREAM": "ext://sys.stderr"}


def setup_command_logging(quiet: bool = False) -> str:
    """For our own commands. Level: WARNING with --quiet, else `MXFP4_RL_LOG_LEVEL`, else INFO; vLLM engines they
    start: QUIET_VLLM unless the user set those variables. Returns our level."""
    level = "WARNING" if quiet else (envs.LOG_LEVEL.get() or "INFO")
    configure(level)
    for k, v in QUIET_VLLM.items():
        os.environ.setdefault(k, v)
    return level

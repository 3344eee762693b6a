"""Suite-wide set-up. Without a GPU every Triton kernel runs under the interpreter, which must be switched on
before any `@triton.jit` function is created, i.e. before the kernel modules are imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402

# Our commands (mxfp4-rl's main, examples' main) set vLLM's logging variables for the engines they start; run in the
# pytest process, that would silence every later test's engine subprocess (which read their config line from logs).
_COMMAND_ENV = ("VLLM_LOGGING_LEVEL", "VLLM_LOGGING_STREAM")


@pytest.fixture(autouse=True)
def _commands_leave_the_environment_as_it_was():
    saved = {k: os.environ.get(k) for k in _COMMAND_ENV}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def pytest_collection_modifyitems(config, items):
    """The files that start vLLM engines first (about 15 of the suite's 21 serial minutes on 2 cores): with `make
    test`'s workers taking one file at a time in this order, the long files start early and the many short ones
    fill in behind them, instead of one engine file running alone at the end. Order within each part kept."""
    items.sort(key=lambda item: not item.nodeid.startswith("tests/e2e/"))

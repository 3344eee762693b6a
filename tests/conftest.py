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

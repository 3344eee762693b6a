"""Suite-wide set-up. Without a GPU every Triton kernel runs under the interpreter, which must be switched on
before any `@triton.jit` function is created, i.e. before the kernel modules are imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

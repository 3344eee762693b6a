"""Learner side of mxfp4-rl: MoE experts that stay MXFP4 in training (LoRA or fake-QAT), HF integration, export
to the engine and train/serve parity metrics. Imports common + torch/transformers/peft; never vllm at import time."""

from common import log as _log

from .adapters import load_adapters, save_adapters
from .checkpoint_io import load_mxfp4_model, save_mxfp4_checkpoint
from .conversion import convert, experts_modules
from .experts import MXFP4Experts
from .grouped import grouped_mlp, register_backend
from . import grouped_triton  # noqa: F401  (registers the fused GPU backend; imports triton lazily)
from .lora import LoRASpec

# The submodules the docs use by their dotted name after a plain `import mxfp4_train`
# (`mxfp4_train.export.export_for_engine`, `mxfp4_train.sync.connect`, `mxfp4_train.parity.parity`). None of them
# imports vLLM or triton at import time (tests/docs/test_public_api.py): the learner may run without either.
from . import export, parity, sync

# MXFP4_RL_LOG_LEVEL, when set, gives our loggers that level and a stderr handler in a learner process (common/log.py)
_log.apply_env()

__all__ = [
    "LoRASpec",
    "MXFP4Experts",
    "convert",
    "experts_modules",
    "export",
    "grouped_mlp",
    "load_adapters",
    "load_mxfp4_model",
    "parity",
    "register_backend",
    "save_adapters",
    "save_mxfp4_checkpoint",
    "sync",
]

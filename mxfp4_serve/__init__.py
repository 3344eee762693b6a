"""mxfp4_serve: the vLLM plugin that serves MXFP4 MoE experts with the shared codec (`--quantization mxfp4_rl`).

Importing this package does not import vLLM; `mxfp4_serve.plugin.register` (the entry point) does.
"""

from .settings import QUANT_METHOD, ServeSettings

__all__ = ["QUANT_METHOD", "ServeSettings"]

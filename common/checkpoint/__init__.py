"""Safetensors checkpoints: tiny test models, one-tensor-at-a-time reading, sharded writing, MXFP4 conversion."""

from .archs import ARCHS, FORMATS
from .convert import CODEC_VERSION, QUANT_METHOD, quantize_checkpoint
from .packed import iter_packed_experts, load_packed_experts, read_quantization_config
from .safetensors_io import CheckpointReader, save_tensors
from .tiny import ARCHS as TINY_ARCHS
from .tiny import write_tiny_checkpoint

__all__ = [
    "ARCHS",
    "CODEC_VERSION",
    "CheckpointReader",
    "FORMATS",
    "QUANT_METHOD",
    "TINY_ARCHS",
    "iter_packed_experts",
    "load_packed_experts",
    "read_quantization_config",
    "quantize_checkpoint",
    "save_tensors",
    "write_tiny_checkpoint",
]

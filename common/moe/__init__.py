"""The learner-engine contract of an MXFP4 MoE layer, defined once and imported by both sides.

- activations.py: the gated expert activations (silu, gpt-oss clamp-SwiGLU and its constants, DeepSeek-V4's
  clamped silu) and the gate/up row order of w13 (GateUpOrder);
- params.py: vLLM's parameter names and shapes of an MXFP4 MoE layer, and the checkpoints' projection names;
- layouts.py: the byte layouts backends serve (canonical, kb_major, flashinfer_trtllm) as objects recorded on the
  layer, and the canonical read/write/introspection through them;
- wire.py: the weight-sync wire format (protocol id, shard descriptors, encodings, errors).
Pure torch: importing it imports neither triton, vLLM nor transformers.
"""

from . import layouts, params, wire
from .activations import (SWIGLU_ALPHA, SWIGLU_LIMIT, ActivationKind, ActivationSpec, GateUpOrder, clamp_silu,
                          clamp_swiglu)
from .layouts import (
    CANONICAL,
    FLASHINFER_TRTLLM,
    KB_MAJOR,
    ExpertLayout,
    ExpertsRecord,
    convert_layer,
    layout_of,
    read_canonical,
    register_layer,
    served_expert_params,
    write_canonical,
)
from .params import ALL_PARAMS, BIAS_PARAMS, PACKED_PARAMS, PACKED_WEIGHTS, param_shapes, scale_name

__all__ = [
    "ALL_PARAMS", "BIAS_PARAMS", "CANONICAL", "FLASHINFER_TRTLLM", "KB_MAJOR", "PACKED_PARAMS", "PACKED_WEIGHTS",
    "SWIGLU_ALPHA", "SWIGLU_LIMIT", "ActivationKind", "ActivationSpec", "ExpertLayout", "ExpertsRecord",
    "GateUpOrder", "clamp_silu", "clamp_swiglu", "convert_layer", "layout_of", "param_shapes", "read_canonical",
    "register_layer", "scale_name", "served_expert_params", "write_canonical", "layouts", "params", "wire",
]

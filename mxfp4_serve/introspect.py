"""Read the packed expert parameters a running engine serves (for byte-equality checks and audits).

Use with vLLM's public API: `llm.apply_model(packed_expert_params)` returns one dict per worker. The function is
the contract's `common.moe.served_expert_params` (the learner's byte check calls the same one), module-level so that
vLLM can pickle it to worker processes (multiprocessing engines also need VLLM_ALLOW_INSECURE_SERIALIZATION=1 to
ship the tensors back). Every backend's parameters are read through the layout recorded on the layer, so the
result is canonical on every backend (hopper_triton's kb-major codes, sm100's TRT-LLM tiles included).
"""

from __future__ import annotations

from common.moe import served_expert_params as packed_expert_params

__all__ = ["packed_expert_params"]

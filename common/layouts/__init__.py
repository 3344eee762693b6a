"""Byte layouts of packed MXFP4 experts. Every conversion is a pure byte permutation or view with a round-trip test.

canonical: codes uint8 [..., N, K/2] (low nibble = even element), scales uint8 [..., N, K/32] (E8M0).
- gpt_oss:      `*_blocks` [E, N, K/32, 16] + `*_scales` [E, N, K/32], gate/up rows interleaved
- deepseek_v4:  per-expert int8 [out, in/2] + float8_e8m0fnu [out, in/32]
- vllm_moe:     w13_weight [E, 2I, H/2] = [w1; w3], w13_weight_scale, w2_weight, w2_weight_scale
- torch_views:  float4_e2m1fn_x2 codes, float8_e8m0fnu scales
- swizzle:      the 128x4 swizzled scale layout of cuBLAS / FlashInfer
- flashinfer_trtllm: FlashInfer TRT-LLM-gen MoE (up/gate row interleave, 32-row epilogue shuffle, 128x4 scales)
"""

from . import deepseek_v4, flashinfer_trtllm, gpt_oss, swizzle, torch_views, vllm_moe

__all__ = ["deepseek_v4", "flashinfer_trtllm", "gpt_oss", "swizzle", "torch_views", "vllm_moe"]

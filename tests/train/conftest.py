"""Tiny checkpoints shared by the learner tests (written once per session, a few hundred kB each)."""

from __future__ import annotations

import pytest
import torch

from common.checkpoint import quantize_checkpoint, write_tiny_checkpoint

ARCHS = ("qwen3_moe", "gpt_oss", "deepseek_v3")


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: write_tiny_checkpoint(root / arch, arch=arch, seed=0) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_mxfp4_ckpts(tiny_ckpts, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_mx")
    return {arch: quantize_checkpoint(p, root / arch, profile="flashinfer", progress=False)
            for arch, p in tiny_ckpts.items()}


def load_bf16(path, eager: bool = True):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    if eager:
        # transformers 5 defaults the experts to grouped_mm; the eager loop is the one our reference backend mirrors
        # op for op, so comparisons against it can be bitwise.
        model.set_experts_implementation("eager")
    return model.eval()


def token_batch(seed: int = 1, batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))

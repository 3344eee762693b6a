"""The parity tests' input filter (tests/serve/reference.draw_decisive_prompts): it must keep fresh random prompts
and drop exactly the near-ties at which a correct fp16 engine and the fp32 reference may route differently."""

from __future__ import annotations

import pytest
import torch

import mxfp4_train
from common.checkpoint import quantize_checkpoint, write_tiny_checkpoint
from tests.serve.reference import ROUTER_MARGIN, TOKEN_MARGIN, draw_decisive_prompts, router_kind, router_margins


@pytest.fixture(scope="module", params=["glm4_moe", "qwen3_moe"])
def learner(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    src = write_tiny_checkpoint(root / "bf16", arch=request.param, seed=int(torch.randint(0, 2**31 - 1, (1,))))
    q = quantize_checkpoint(src, root / "q", profile="flashinfer", progress=False)
    return mxfp4_train.load_mxfp4_model(q, "lora", lora=None, dtype=torch.float32).eval()


def test_router_kind_follows_the_architecture(learner):
    expected = "sigmoid" if learner.config.model_type == "glm4_moe" else "softmax"
    assert router_kind(learner) == expected


def test_drawn_prompts_are_decisive_along_the_greedy_trajectory(learner):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
    prompts = draw_decisive_prompts(learner, (5, 12), max_tokens=4, generator=g)
    assert [len(p) for p in prompts] == [5, 12]
    need = ROUTER_MARGIN[router_kind(learner)]
    for ids in prompts:
        seq = list(ids)
        with torch.no_grad():
            for _ in range(4):
                lp = torch.log_softmax(learner(input_ids=torch.tensor([seq])).logits[0, -1], dim=-1)
                top = lp.topk(2).values
                assert float(top[0] - top[1]) >= TOKEN_MARGIN
                seq.append(int(lp.argmax()))
        margins = router_margins(learner, seq)
        assert margins.shape == (len(seq),)
        assert float(margins.min()) >= need


def test_a_router_with_every_expert_tied_is_refused(learner):
    """Identical router rows give every token an exact k-th / (k+1)-th tie: nothing is decisive, and the draw says so
    instead of testing parity on inputs where two correct engines may disagree."""
    gates = [m for n, m in learner.named_modules() if n.endswith(".mlp.gate")]
    saved = [g.weight.detach().clone() for g in gates]
    try:
        with torch.no_grad():
            for gate in gates:
                gate.weight.copy_(gate.weight[:1].expand_as(gate.weight))
        assert float(router_margins(learner, list(range(2, 10))).max()) == 0.0
        with pytest.raises(AssertionError, match="no decisive prompt of length 5"):
            draw_decisive_prompts(learner, (5,), max_tokens=2, generator=torch.Generator().manual_seed(0), tries=3)
    finally:
        with torch.no_grad():
            for gate, w in zip(gates, saved, strict=True):
                gate.weight.copy_(w)

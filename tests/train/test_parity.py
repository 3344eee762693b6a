"""Parity metrics: known values on hand-made inputs, estimator properties on sampled data, errors."""

from __future__ import annotations

import math

import pytest
import torch

from mxfp4_train.parity import format_table, parity, per_expert


def test_identical_logprobs_give_zero_mismatch():
    lp = -torch.rand(100, generator=torch.Generator().manual_seed(0)) * 5
    p = parity(lp, lp.clone())
    assert p.mismatch_kl == 0 and p.k3_kl == 0 and p.max_abs_dlogp == 0 and p.pearson == pytest.approx(1.0)


def test_hand_computed_values():
    mu = torch.tensor([-1.0, -2.0, -0.5])
    pi = torch.tensor([-1.5, -1.0, -0.5])
    r = [-0.5, 1.0, 0.0]
    p = parity(mu, pi)
    assert p.mismatch_kl == pytest.approx(-sum(r) / 3)
    assert p.k3_kl == pytest.approx(sum(math.exp(x) - 1 - x for x in r) / 3)
    assert p.mean_abs_dlogp == pytest.approx(0.5) and p.max_abs_dlogp == pytest.approx(1.0)


def test_estimators_agree_with_exact_kl_on_samples():
    # Two categorical distributions; tokens sampled from mu. Both estimators are unbiased for KL(mu || pi): with
    # 200k samples their standard error is ~1e-3 of the KL here, so 3% relative tolerance is > 10 sigma.
    gen = torch.Generator().manual_seed(1)
    mu_l = torch.log_softmax(torch.randn(50, generator=gen) * 2, 0)
    pi_l = torch.log_softmax(mu_l + torch.randn(50, generator=gen) * 0.3, 0)
    exact = float((mu_l.exp() * (mu_l - pi_l)).sum())
    y = torch.multinomial(mu_l.exp(), 200_000, replacement=True, generator=gen)
    p = parity(mu_l[y], pi_l[y])
    assert p.mismatch_kl == pytest.approx(exact, rel=3e-2)
    assert p.k3_kl == pytest.approx(exact, rel=3e-2)


def test_per_expert_breakdown_attributes_tokens_to_their_experts():
    mu = torch.tensor([-1.0, -1.0, -1.0, -1.0])
    pi = torch.tensor([-1.0, -2.0, -1.0, -1.5])
    ids = torch.tensor([[0, 1], [1, 2], [0, 3], [2, 3]])  # [T, top_k]
    pe = per_expert(mu, pi, ids, num_experts=5)
    assert sorted(pe) == [0, 1, 2, 3]  # expert 4 saw no token
    assert pe[0].max_abs_dlogp == 0 and pe[0].tokens == 2
    assert pe[1].max_abs_dlogp == pytest.approx(1.0) and pe[2].mean_abs_dlogp == pytest.approx(0.75)


def test_errors_are_explicit():
    with pytest.raises(ValueError, match="same shape"):
        parity(torch.zeros(3) - 1, torch.zeros(4) - 1)
    with pytest.raises(ValueError, match="non-finite log-prob at token 1"):
        parity(torch.tensor([-1.0, float("-inf")]), torch.tensor([-1.0, -1.0]))
    with pytest.raises(ValueError, match="must be <= 0"):
        parity(torch.tensor([0.3]), torch.tensor([-1.0]))


def test_table_has_one_line_per_row():
    p = parity(torch.tensor([-1.0, -2.0]), torch.tensor([-1.1, -2.0]))
    text = format_table({"a": p, "b": p})
    assert len(text.splitlines()) == 4 and "mismatch KL" in text

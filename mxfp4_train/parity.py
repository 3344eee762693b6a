"""Train/serve parity metrics from the log-probs that the rollout engine and the learner give the same tokens.

Tokens y were sampled by the engine (policy mu); the learner (policy pi) scores the same tokens. With
r = log pi(y) - log mu(y) per token, the sampled-token estimators of KL(mu || pi) are (Schulman, "Approximating KL
divergence", 2020):
- mismatch KL (k1) = mean(-r): unbiased, can be negative on a finite sample;
- k3 KL = mean(exp(r) - 1 - r): unbiased and never negative, lower variance when mu and pi are close.
Plus mean/max |r| (= |dlogp|) and the Pearson correlation of the two log-prob vectors. The per-expert breakdown
attributes every token to each expert it was routed to (in every MoE layer) and reports the same metrics per expert.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class Parity:
    tokens: int
    mismatch_kl: float
    k3_kl: float
    mean_abs_dlogp: float
    max_abs_dlogp: float
    pearson: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check(rollout: torch.Tensor, learner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if rollout.shape != learner.shape:
        raise ValueError(f"parity: rollout log-probs {tuple(rollout.shape)} and learner log-probs "
                         f"{tuple(learner.shape)} must have the same shape (one entry per sampled token)")
    mu, pi = rollout.double().flatten(), learner.double().flatten()
    bad = ~(torch.isfinite(mu) & torch.isfinite(pi))
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"parity: non-finite log-prob at token {i} (rollout {mu[i].item()}, learner {pi[i].item()})")
    if (mu > 1e-6).any() or (pi > 1e-6).any():
        raise ValueError("parity: log-probs must be <= 0 (got a positive value: probabilities or logits passed?)")
    return mu, pi


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = (a.norm() * b.norm()).item()
    return float((a @ b).item() / den) if den > 0 else float("nan")


def parity(rollout_logprobs: torch.Tensor, learner_logprobs: torch.Tensor) -> Parity:
    """Metrics over all tokens; inputs are the sampled tokens' log-probs, any shape, same for both."""
    mu, pi = _check(rollout_logprobs, learner_logprobs)
    if mu.numel() == 0:
        raise ValueError("parity: no tokens")
    r = pi - mu
    return Parity(tokens=mu.numel(), mismatch_kl=float((-r).mean()), k3_kl=float((torch.expm1(r) - r).mean()),
                  mean_abs_dlogp=float(r.abs().mean()), max_abs_dlogp=float(r.abs().max()), pearson=_pearson(mu, pi))


def per_expert(rollout_logprobs: torch.Tensor, learner_logprobs: torch.Tensor, expert_ids: torch.Tensor,
               num_experts: int) -> dict[int, Parity]:
    """expert_ids: [T, ...] routed expert ids of each token (e.g. [T, layers, top_k]); a token counts once for
    every expert it visits (repeats across layers included). Experts that saw no token are left out."""
    mu, pi = _check(rollout_logprobs, learner_logprobs)
    ids = expert_ids.reshape(mu.numel(), -1)
    if ids.shape[0] != mu.numel():
        raise ValueError(f"parity: expert_ids has {expert_ids.shape[0]} tokens, log-probs have {mu.numel()}")
    out = {}
    for e in range(num_experts):
        hits = (ids == e).sum(-1)
        if hits.sum() == 0:
            continue
        rep = torch.repeat_interleave(torch.arange(mu.numel()), hits)
        out[e] = parity(mu[rep], pi[rep])
    return out


@contextlib.contextmanager
def record_routing(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the top-k expert ids each MXFP4Experts block receives, in call order (one [T, k] per layer call)."""
    from .conversion import experts_modules

    seen: list[torch.Tensor] = []
    handles = [m.register_forward_pre_hook(lambda mod, args: seen.append(args[1].detach().clone()))
               for _, m in experts_modules(model)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def format_table(rows: dict[str, Parity]) -> str:
    """A fixed-width text table, one row per comparison."""
    head = f"{'comparison':<48} {'tokens':>6} {'mismatch KL':>12} {'k3 KL':>10} {'mean|dlogp|':>12} " \
           f"{'max|dlogp|':>11} {'pearson':>9}"
    lines = [head, "-" * len(head)]
    for name, p in rows.items():
        lines.append(f"{name:<48} {p.tokens:>6} {p.mismatch_kl:>12.3e} {p.k3_kl:>10.3e} {p.mean_abs_dlogp:>12.3e} "
                     f"{p.max_abs_dlogp:>11.3e} {p.pearson:>9.5f}")
    return "\n".join(lines)

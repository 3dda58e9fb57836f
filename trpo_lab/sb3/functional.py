"""Stable-Baselines3 policies as functions of a flat actor vector, for the trust-region step.

The line search judges candidate actor parameters θ_k without writing them into the policy:
:func:`actor_objective` evaluates SB3's own ``get_distribution`` through
``torch.func.functional_call`` at a flat vector, and :func:`candidate_evaluator` maps it over
``(K, P)`` candidates, one call at a time or under ``torch.func.vmap``. :func:`mean_kl` is
sb3-contrib's mean KL in a form vmap can batch (torch's categorical and Bernoulli KLs use
masked assignment, which vmap cannot).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from stable_baselines3.common.distributions import Distribution, MultiCategoricalDistribution
from stable_baselines3.common.policies import ActorCriticPolicy
from torch import Tensor, nn

from trpo_lab.optim._flat import unflatten
from trpo_lab.optim.trust_region import Evaluate

__all__ = ["ActorBatch", "actor_objective", "candidate_evaluator", "mean_kl", "surrogate"]


class ActorBatch(NamedTuple):
    """The (sub-sampled) rollout the actor step is computed on, and π_old on it."""

    observations: Any
    actions: Tensor
    old_log_prob: Tensor
    advantages: Tensor
    old_distribution: Distribution


def _categorical_kl(p: torch.distributions.Categorical, q: torch.distributions.Categorical) -> Tensor:
    # torch's KL(p ‖ q) of categoricals, its masked assignments written as torch.where (same values).
    t = p.probs * (p.logits - q.logits)
    t = torch.where(q.probs == 0, torch.inf, t)
    return torch.where(p.probs == 0, 0.0, t).sum(-1)


def _bernoulli_kl(p: torch.distributions.Bernoulli, q: torch.distributions.Bernoulli) -> Tensor:
    # torch's KL(p ‖ q) of Bernoullis, its masked assignments written as torch.where (same values).
    t1 = p.probs * (nn.functional.softplus(-q.logits) - nn.functional.softplus(-p.logits))
    t1 = torch.where(p.probs == 0, 0.0, torch.where(q.probs == 0, torch.inf, t1))
    t2 = (1 - p.probs) * (nn.functional.softplus(q.logits) - nn.functional.softplus(p.logits))
    t2 = torch.where(p.probs == 1, 0.0, torch.where(q.probs == 1, torch.inf, t2))
    return t1 + t2


def _kl(p: torch.distributions.Distribution, q: torch.distributions.Distribution) -> Tensor:
    if isinstance(p, torch.distributions.Categorical) and isinstance(q, torch.distributions.Categorical):
        return _categorical_kl(p, q)
    if isinstance(p, torch.distributions.Bernoulli) and isinstance(q, torch.distributions.Bernoulli):
        return _bernoulli_kl(p, q)
    return torch.distributions.kl_divergence(p, q)


def mean_kl(old: Distribution, new: Distribution) -> Tensor:
    """mean KL(π_old ‖ π_new) of two SB3 distributions, as sb3-contrib's TRPO computes it
    (``kl_divergence(old, new).mean()``), in a form ``torch.func.vmap`` can batch."""
    if isinstance(old, MultiCategoricalDistribution) and isinstance(new, MultiCategoricalDistribution):
        return torch.stack([_kl(p, q) for p, q in zip(old.distribution, new.distribution)], dim=1).sum(dim=1).mean()
    return _kl(old.distribution, new.distribution).mean()  # type: ignore[arg-type]


def surrogate(distribution: Distribution, batch: ActorBatch) -> Tensor:
    """L = mean(Â · exp(log π(a|s) − log π_old(a|s))), the objective the step maximises."""
    log_prob = distribution.log_prob(batch.actions)
    return (batch.advantages * torch.exp(log_prob - batch.old_log_prob)).mean()


class _Objective(nn.Module):
    """−L and mean KL of an SB3 policy on one batch, as a module forward (for ``functional_call``)."""

    def __init__(self, policy: ActorCriticPolicy, batch: ActorBatch) -> None:
        super().__init__()
        self.policy = policy
        self.batch = batch

    def forward(self) -> tuple[Tensor, Tensor]:
        distribution = self.policy.get_distribution(self.batch.observations)
        return -surrogate(distribution, self.batch), mean_kl(self.batch.old_distribution, distribution)


def actor_objective(
    policy: ActorCriticPolicy, batch: ActorBatch, actor_params: Sequence[nn.Parameter]
) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """``θ ↦ (−L(θ), mean KL(π_old ‖ π_θ))`` at a flat actor vector laid out like ``actor_params``;
    the policy's other parameters keep their values and nothing is written."""
    objective = _Objective(policy, batch)
    names = {id(param): f"policy.{name}" for name, param in policy.named_parameters()}
    keys = [names[id(param)] for param in actor_params]
    params = list(actor_params)

    def at(flat: Tensor) -> tuple[Tensor, Tensor]:
        result: tuple[Tensor, Tensor] = torch.func.functional_call(objective, dict(zip(keys, unflatten(flat, params))), ())
        return result

    return at


def candidate_evaluator(policy: ActorCriticPolicy, batch: ActorBatch, actor_params: Sequence[nn.Parameter]) -> Evaluate:
    """``(K, P)`` flat actor vectors ↦ (−L (K,), mean KLs (K,)): one :func:`actor_objective`
    call for one candidate, the same function under ``torch.func.vmap`` for several."""
    one = actor_objective(policy, batch, actor_params)
    batched = torch.func.vmap(one)

    def evaluate(candidates: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            if candidates.shape[0] == 1:
                loss, kl = one(candidates[0])
                return loss.unsqueeze(0), kl.unsqueeze(0)
            losses, kls = batched(candidates)
            return losses, kls

    return evaluate

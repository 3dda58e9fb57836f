"""Deprecated location: the policy lives in :mod:`trpo_lab.nn` (re-exported here until imports move)."""

from __future__ import annotations

from trpo_lab.nn.distributions import ActionDistribution, Categorical, DiagGaussian, MultiCategorical, make_distribution
from trpo_lab.nn.policy import ACTIVATIONS, POLICY_KWARGS, ActorCritic, resolve_activation, validate_policy_kwargs

__all__ = [
    "ACTIVATIONS",
    "POLICY_KWARGS",
    "ActionDistribution",
    "ActorCritic",
    "Categorical",
    "DiagGaussian",
    "MultiCategorical",
    "make_distribution",
    "resolve_activation",
    "validate_policy_kwargs",
]

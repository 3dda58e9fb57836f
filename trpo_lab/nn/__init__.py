"""What a policy is: action distributions, feature extractors, the actor-critic and its acting paths."""

from __future__ import annotations

from trpo_lab.nn.acting import NoiseStream, NumpyActor, RolloutActor, TorchActor, make_actor, numpy_support
from trpo_lab.nn.distributions import ActionDistribution, Categorical, DiagGaussian, MultiCategorical, make_distribution
from trpo_lab.nn.extractors import FlattenExtractor, make_extractor
from trpo_lab.nn.policy import (
    ACTIVATIONS,
    POLICY_KWARGS,
    ActorCritic,
    mlp_forward,
    resolve_activation,
    validate_policy_kwargs,
)

__all__ = [
    "ACTIVATIONS",
    "POLICY_KWARGS",
    "ActionDistribution",
    "ActorCritic",
    "Categorical",
    "DiagGaussian",
    "FlattenExtractor",
    "MultiCategorical",
    "NoiseStream",
    "NumpyActor",
    "RolloutActor",
    "TorchActor",
    "make_actor",
    "make_distribution",
    "make_extractor",
    "mlp_forward",
    "numpy_support",
    "resolve_activation",
    "validate_policy_kwargs",
]

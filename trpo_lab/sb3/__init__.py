"""Stable-Baselines3 integration: trpo_lab's algorithms and optimizers inside SB3 projects.

- :class:`TRPO`, :class:`NPG`, :class:`ACKTR`: SB3 ``OnPolicyAlgorithm`` s whose update runs
  on :mod:`trpo_lab.optim` (TRPO / NPG: the same natural step as trpo_lab's own agents,
  :func:`trpo_lab.optim.trust_region.natural_step`, with ``curvature="cg"|"kfac"|"shampoo"|"exact"``
  and a sequential or batched line search; hyperparameters validated by trpo_lab's configs).
  They take SB3 policies, VecEnvs, callbacks, loggers and zip files like any SB3 algorithm.
- :class:`KFACActorCriticPolicy` (and the Cnn / MultiInput versions): K-FAC for SB3's own
  A2C and PPO, ``A2C(KFACActorCriticPolicy, env, learning_rate=0.25)``.
- Any trpo_lab torch optimizer (e.g. :class:`trpo_lab.optim.Shampoo`) works in SB3 through
  ``policy_kwargs=dict(optimizer_class=Shampoo, optimizer_kwargs={...})``.
- :class:`SB3ToGymnasiumVectorEnv` / :class:`GymnasiumToSB3VecEnv`: the VecEnv bridge, so
  trpo_lab's agents train on SB3 VecEnvs (``VecNormalize`` included) and SB3's algorithms on
  ``gymnasium.vector`` envs (:func:`make_sb3_vec_env`).

See ``docs/sb3.md`` for runnable examples.
"""

from __future__ import annotations

from trpo_lab.optim.fisher import sampled_fisher_loss
from trpo_lab.sb3.acktr import ACKTR
from trpo_lab.sb3.kfac import (
    KFACActorCriticCnnPolicy,
    KFACActorCriticPolicy,
    KFACMultiInputActorCriticPolicy,
    KFACPolicyMixin,
)
from trpo_lab.sb3.trpo import NPG, TRPO, NaturalGradientAlgorithm, NaturalGradientStep
from trpo_lab.sb3.vec_env import GymnasiumToSB3VecEnv, SB3ToGymnasiumVectorEnv, make_sb3_vec_env

__all__ = [
    "ACKTR",
    "GymnasiumToSB3VecEnv",
    "KFACActorCriticCnnPolicy",
    "KFACActorCriticPolicy",
    "KFACMultiInputActorCriticPolicy",
    "KFACPolicyMixin",
    "NPG",
    "NaturalGradientAlgorithm",
    "NaturalGradientStep",
    "SB3ToGymnasiumVectorEnv",
    "TRPO",
    "make_sb3_vec_env",
    "sampled_fisher_loss",
]

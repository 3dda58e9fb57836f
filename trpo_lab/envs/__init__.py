"""Vectorized Gymnasium environments with a pinned autoreset mode.

Every agent steps a :class:`gymnasium.vector.VectorEnv` whose autoreset mode is
``NEXT_STEP`` (Gymnasium's default, and the only mode its vector normalization
wrappers accept).  In that mode the observation returned by the step that ends
an episode *is* the final observation, and the following ``step`` call ignores
the action of that sub-environment and returns the reset observation with a zero
reward.  The rollout loop (``agents/base.py``) stores that reset step as an
*invalid* slot: the value it computes there is exactly ``V(final_obs)``, which
:func:`trpo_lab.rollout.buffer.compute_gae` uses to bootstrap a time-limit truncation,
and the slot itself is masked out of every batch.

Two more things live here because they concern the environment, not the learner:

* :class:`NonFiniteGuard` checks every step's observations and rewards for NaN or inf
  *below* the normalization wrappers (so their running statistics are never poisoned) and
  either raises :class:`NonFiniteEnvError` or drops the transition (``nan_policy="skip"``).
* :func:`vector_env_state` / :func:`load_vector_env_state` capture and restore everything a
  vector env needs to continue bit-for-bit after a checkpoint: each sub-environment's RNG
  and physical state, the wrappers' counters, the autoreset flags and the normalization
  statistics, as plain data (tensors, numbers, strings, lists and dicts) that
  ``torch.load(weights_only=True)`` accepts.
"""

from trpo_lab.envs.guard import NanPolicy, NonFiniteEnvError, NonFiniteError, NonFiniteGuard, find_wrapper, with_guard
from trpo_lab.envs.make import (
    EnvSpec,
    Vectorization,
    check_env_id,
    make_vec_env,
    set_normalization_training,
)
from trpo_lab.envs.state import (
    EnvStateError,
    load_normalization_state,
    load_vector_env_state,
    normalization_state,
    normalize_observations,
    running_statistics,
    to_numpy,
    to_tensors,
    vector_env_state,
)

__all__ = [
    "make_vec_env",
    "check_env_id",
    "NonFiniteError",
    "NonFiniteEnvError",
    "NonFiniteGuard",
    "with_guard",
    "EnvStateError",
    "vector_env_state",
    "load_vector_env_state",
    "find_wrapper",
    "normalization_state",
    "load_normalization_state",
    "set_normalization_training",
    "normalize_observations",
    "running_statistics",
    "to_numpy",
    "to_tensors",
    "EnvSpec",
    "NanPolicy",
    "Vectorization",
]

"""Vectorized Gymnasium environments with a pinned autoreset mode.

Every agent steps a :class:`gymnasium.vector.VectorEnv` whose autoreset mode is
``NEXT_STEP`` (Gymnasium's default, and the only mode its vector normalization
wrappers accept).  In that mode the observation returned by the step that ends
an episode *is* the final observation, and the following ``step`` call ignores
the action of that sub-environment and returns the reset observation with a zero
reward.  The rollout loop (``agents/base.py``) stores that reset step as an
*invalid* slot: the value it computes there is exactly ``V(final_obs)``, which
:func:`trpo_lab.buffer.compute_gae` uses to bootstrap a time-limit truncation,
and the slot itself is masked out of every batch.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, Literal

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.wrappers.vector import (
    NormalizeObservation,
    NormalizeReward,
    RecordEpisodeStatistics,
)

Vectorization = Literal["sync", "async", "vector_entry_point"]
EnvSpec = str | Callable[[], gym.Env]

__all__ = [
    "make_vec_env",
    "check_env_id",
    "find_wrapper",
    "normalization_state",
    "load_normalization_state",
    "set_normalization_training",
]


def check_env_id(env_id: str) -> None:
    """Raise ``ValueError`` naming ``env_id`` and close registered ids if it is unknown."""
    if env_id in gym.registry:
        return
    close = difflib.get_close_matches(env_id, list(gym.registry.keys()), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see gymnasium.registry for the registered ids"
    raise ValueError(f"Unknown environment id {env_id!r}{hint}")


def _env_factory(env: EnvSpec, env_kwargs: dict[str, Any]) -> Callable[[], gym.Env]:
    if callable(env):
        return env
    if not isinstance(env, str):
        raise ValueError(f"env must be a Gymnasium id or a callable returning a gymnasium.Env, got {env!r}")
    check_env_id(env)

    def factory() -> gym.Env:
        return gym.make(env, **env_kwargs)

    return factory


def make_vec_env(
    env: EnvSpec,
    n_envs: int = 1,
    seed: int | None = 0,
    vectorization: Vectorization = "sync",
    normalize_obs: bool = False,
    normalize_reward: bool = False,
    gamma: float = 0.99,
    env_kwargs: dict[str, Any] | None = None,
) -> VectorEnv:
    """Build a seeded Gymnasium vector environment for on-policy training.

    Args:
        env: A registered Gymnasium id (``"CartPole-v1"``) or a callable returning an env.
        n_envs: Number of sub-environments (>= 1).
        seed: Sub-environment ``i`` is reset with ``seed + i`` (and its action space seeded
            the same way); ``None`` leaves them unseeded.
        vectorization: ``"sync"`` (one process, default), ``"async"`` (one process per env,
            worth it for heavy physics) or ``"vector_entry_point"`` (the env's own batched
            implementation, e.g. Gymnasium's numpy CartPole; only for ids that have one).
        normalize_obs: Wrap with Gymnasium's ``NormalizeObservation`` (running mean/std).
        normalize_reward: Wrap with Gymnasium's ``NormalizeReward`` (scales by the std of
            the discounted return, using ``gamma``).
        gamma: Discount used by reward normalization.
        env_kwargs: Keyword arguments for ``gym.make``.

    Returns:
        A ``VectorEnv`` in ``AutoresetMode.NEXT_STEP`` with ``RecordEpisodeStatistics``
        innermost, so ``info["episode"]`` always reports raw, unnormalized returns.
        The env has been reset with ``seed``; call ``reset`` again before stepping.

    Raises:
        ValueError: unknown env id, ``n_envs < 1``, unknown vectorization mode, or a
            missing optional dependency (MuJoCo).
    """
    if not isinstance(n_envs, int) or isinstance(n_envs, bool) or n_envs < 1:
        raise ValueError(f"Invalid n_envs: {n_envs!r}; expected an integer >= 1")
    if vectorization not in ("sync", "async", "vector_entry_point"):
        raise ValueError(
            f"Invalid vectorization: {vectorization!r}; expected 'sync', 'async' or 'vector_entry_point'"
        )
    env_kwargs = dict(env_kwargs or {})
    try:
        if vectorization == "vector_entry_point":
            if not isinstance(env, str):
                raise ValueError("vectorization='vector_entry_point' needs a registered env id, not a callable")
            check_env_id(env)
            if gym.spec(env).vector_entry_point is None:
                raise ValueError(
                    f"Invalid vectorization: 'vector_entry_point' for {env!r}, which has no batched "
                    "implementation; use 'sync' or 'async'"
                )
            vec_env = gym.make_vec(env, num_envs=n_envs, vectorization_mode="vector_entry_point", **env_kwargs)
        else:
            factory = _env_factory(env, env_kwargs)
            vector_cls = gym.vector.SyncVectorEnv if vectorization == "sync" else gym.vector.AsyncVectorEnv
            vec_env = vector_cls([factory] * n_envs, autoreset_mode=AutoresetMode.NEXT_STEP)
    except gym.error.DependencyNotInstalled as exc:
        raise ValueError(
            f"Environment {env!r} needs an optional dependency ({exc}); install it with: pip install 'trpo-lab[mujoco]'"
        ) from exc
    mode = vec_env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
    if mode != AutoresetMode.NEXT_STEP:
        vec_env.close()
        raise ValueError(f"Environment {env!r} uses autoreset mode {mode}; trpo_lab needs AutoresetMode.NEXT_STEP")
    vec_env.metadata["autoreset_mode"] = AutoresetMode.NEXT_STEP
    vec_env = RecordEpisodeStatistics(vec_env)
    if normalize_obs:
        vec_env = NormalizeObservation(vec_env)
    if normalize_reward:
        vec_env = NormalizeReward(vec_env, gamma=gamma)
    if seed is not None:
        vec_env.reset(seed=seed)
        vec_env.action_space.seed(seed)
    return vec_env


def find_wrapper(env: VectorEnv, wrapper_type: type) -> Any | None:
    """Return the first wrapper of ``wrapper_type`` in ``env``'s wrapper chain, or None."""
    current: Any = env
    while current is not None:
        if isinstance(current, wrapper_type):
            return current
        current = getattr(current, "env", None)
    return None


def normalization_state(env: VectorEnv) -> dict[str, Any]:
    """Running statistics of the normalization wrappers, as plain numpy data (for checkpoints)."""
    state: dict[str, Any] = {}
    obs_norm = find_wrapper(env, NormalizeObservation)
    if obs_norm is not None:
        rms = obs_norm.obs_rms
        state["obs_rms"] = {"mean": np.array(rms.mean), "var": np.array(rms.var), "count": float(rms.count)}
    rew_norm = find_wrapper(env, NormalizeReward)
    if rew_norm is not None:
        rms = rew_norm.return_rms
        state["return_rms"] = {"mean": np.array(rms.mean), "var": np.array(rms.var), "count": float(rms.count)}
        state["accumulated_reward"] = np.array(rew_norm.accumulated_reward)
        state["prev_dones"] = np.array(rew_norm._prev_dones)
    return state


def load_normalization_state(env: VectorEnv, state: dict[str, Any]) -> None:
    """Restore statistics saved by :func:`normalization_state` into ``env``'s wrappers."""
    for key, wrapper_type, attr in (
        ("obs_rms", NormalizeObservation, "obs_rms"),
        ("return_rms", NormalizeReward, "return_rms"),
    ):
        wrapper = find_wrapper(env, wrapper_type)
        if key in state and wrapper is not None:
            rms = getattr(wrapper, attr)
            rms.mean = np.array(state[key]["mean"], dtype=rms.mean.dtype)
            rms.var = np.array(state[key]["var"], dtype=rms.var.dtype)
            rms.count = float(state[key]["count"])
    rew_norm = find_wrapper(env, NormalizeReward)
    if rew_norm is not None and "accumulated_reward" in state:
        rew_norm.accumulated_reward = np.array(state["accumulated_reward"], dtype=np.float32)
        if "prev_dones" in state:
            rew_norm._prev_dones = np.array(state["prev_dones"], dtype=np.float32)


def set_normalization_training(env: VectorEnv, training: bool) -> None:
    """Freeze (``False``) or resume (``True``) updates of the normalization statistics."""
    obs_norm = find_wrapper(env, NormalizeObservation)
    if obs_norm is not None:
        obs_norm.update_running_mean = training
    rew_norm = find_wrapper(env, NormalizeReward)
    if rew_norm is not None:
        rew_norm.update_running_mean = training

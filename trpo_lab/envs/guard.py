"""NaN / inf guard: checks every step's observations and rewards below the normalization wrappers."""

from __future__ import annotations

import math
from typing import Any, Literal

import gymnasium as gym
import numpy as np
from gymnasium.vector import AsyncVectorEnv, SyncVectorEnv, VectorEnv, VectorWrapper
from gymnasium.wrappers.vector import (
    RecordEpisodeStatistics,
)

from trpo_lab.validation import require

NanPolicy = Literal["raise", "skip"]


def find_wrapper(env: VectorEnv, wrapper_type: type) -> Any | None:
    """Return the first wrapper of ``wrapper_type`` in ``env``'s wrapper chain, or None."""
    current: Any = env
    while current is not None:
        if isinstance(current, wrapper_type):
            return current
        current = getattr(current, "env", None)
    return None


# ---------------------------------------------------------------------------------- NaN / inf guard
class NonFiniteError(RuntimeError):
    """Training stopped on NaN or inf (from the environment or from an update)."""


class NonFiniteEnvError(NonFiniteError):
    """An environment returned NaN or inf in an observation or reward.

    Attributes:
        env_index: The sub-environment that did, when known.
    """

    def __init__(self, message: str, env_index: int | None = None) -> None:
        super().__init__(message)
        self.env_index = env_index


_sum = np.add.reduce  # the cheapest full reduction (no keyword parsing, no temporary)


class NonFiniteGuard(VectorWrapper):
    """Stops, or drops, steps whose observation or reward is NaN or inf.

    Sits above ``RecordEpisodeStatistics`` and below the normalization wrappers, so a bad
    value never reaches the running statistics.  The check costs two sums per step.

    * ``"raise"``: :class:`NonFiniteEnvError` naming the sub-environment and the value.
    * ``"skip"``: the offending sub-environments are reset at once (a partial reset of the
      vector env; their RNGs continue, so runs stay reproducible) and the step returns, for
      each of them, the reset observation, reward 0 and ``terminated = truncated = False``,
      with ``info["_nonfinite"]`` marking them.  The episode that went bad is dropped from
      the episode statistics.  The rollout loop then drops that transition and cuts the
      advantage chain just before it (see ``OnPolicyAgent.collect_rollout``).  A
      sub-environment whose reset observation is itself non-finite raises.

    Args:
        env: The vector env (``"skip"`` needs partial resets: Sync or Async vector envs).
        nan_policy: ``"raise"`` or ``"skip"``.
    """

    _EPISODE_FIELDS = ("episode_returns", "episode_lengths", "episode_start_times", "prev_dones")

    def __init__(self, env: VectorEnv, nan_policy: NanPolicy = "raise") -> None:
        super().__init__(env)
        require(nan_policy in ("raise", "skip"), "nan_policy", nan_policy, "'raise' or 'skip'")
        if nan_policy == "skip" and not isinstance(env.unwrapped, (SyncVectorEnv, AsyncVectorEnv)):
            raise ValueError(
                f"Invalid nan_policy: 'skip' needs a vector env that can reset single sub-environments "
                f"(sync or async vectorization), not {type(env.unwrapped).__name__}"
            )
        self.nan_policy = nan_policy
        self._episode_stats = find_wrapper(env, RecordEpisodeStatistics)
        # A Dict of arrays is checked key by key (its floating-point keys: integers are always
        # finite); other structured observations (Tuple, Text) are not arrays: only their
        # rewards are checked.
        array_spaces = (gym.spaces.Box, gym.spaces.Discrete, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary)
        space = env.single_observation_space
        self._dict_keys: list[str] | None = None
        if isinstance(space, gym.spaces.Dict) and all(isinstance(sub, array_spaces) for sub in space.spaces.values()):
            self._dict_keys = [
                str(key) for key, sub in space.spaces.items()
                if sub.dtype is not None and np.issubdtype(sub.dtype, np.floating)
            ]
        self._check_obs = bool(self._dict_keys) or isinstance(space, array_spaces)

    def _obs_finite_sum(self, obs: Any) -> bool:
        """Whether the sum of every observation is finite (the fast check of :meth:`step`)."""
        if self._dict_keys is not None:
            return all(math.isfinite(_sum(obs[key], None)) for key in self._dict_keys)
        return math.isfinite(_sum(obs, None))

    def _bad_per_key(self, obs: Any) -> dict[str | None, np.ndarray]:
        """Per sub-environment, whether its observation (at each Dict key; key None for an array) is non-finite."""
        arrays = {key: obs[key] for key in self._dict_keys} if self._dict_keys is not None else {None: obs}
        return {
            key: ~np.isfinite(np.asarray(value).reshape(len(value), -1)).all(axis=1) for key, value in arrays.items()
        }

    def _bad_observations(self, obs: Any) -> np.ndarray:
        bad = np.zeros(self.num_envs, dtype=np.bool_)
        if self._check_obs:
            for per_key in self._bad_per_key(obs).values():
                bad |= per_key
        return bad

    def reset(self, *, seed: Any = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        obs, infos = self.env.reset(seed=seed, options=options)
        bad = self._bad_observations(obs)
        if bad.any():
            index = int(np.flatnonzero(bad)[0])
            raise NonFiniteEnvError(f"Environment {index} returned a non-finite observation on reset", index)
        return obs, infos

    def step(self, actions: Any) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
        obs, rewards, terminated, truncated, infos = self.env.step(actions)
        # A sum is NaN or inf iff an element is, or it overflowed (then the exact check below decides).
        if math.isfinite(_sum(rewards, None)) and (not self._check_obs or self._obs_finite_sum(obs)):
            return obs, rewards, terminated, truncated, infos
        return self._non_finite_step(obs, rewards, terminated, truncated, infos)

    def _non_finite_step(
        self, obs: Any, rewards: np.ndarray, terminated: np.ndarray, truncated: np.ndarray, infos: dict[str, Any]
    ) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
        bad_obs = self._bad_observations(obs)
        bad_reward = ~np.isfinite(rewards)
        bad = bad_obs | bad_reward
        if not bad.any():  # the sum overflowed; every value is finite
            return obs, rewards, terminated, truncated, infos
        if self.nan_policy == "raise":
            index = int(np.flatnonzero(bad)[0])
            if bad_obs[index]:
                key = next(key for key, per_key in self._bad_per_key(obs).items() if per_key[index])
                value = np.asarray(obs[key][index] if key is not None else obs[index])
                count = int((~np.isfinite(value)).sum())
                at = f" at key {key!r}" if key is not None else ""
                what = f"observation{at} ({count} of {value.size} elements NaN or inf)"
            else:
                what = f"reward ({float(rewards[index])!r})"
            raise NonFiniteEnvError(f"Environment {index} returned a non-finite {what}", index)
        rewards = np.array(rewards)
        terminated, truncated = np.array(terminated), np.array(truncated)
        reset_obs = self._reset_sub_envs(bad)
        if self._dict_keys is not None:
            obs = {key: np.array(value) for key, value in obs.items()}
            for key in obs:  # every key (the integer ones too) from the reset
                obs[key][bad] = reset_obs[key][bad]
        else:
            obs = np.array(obs)
            obs[bad] = reset_obs[bad]
        if self._bad_observations(obs)[bad].any():
            index = int(np.flatnonzero(bad)[0])
            raise NonFiniteEnvError(
                f"Environment {index} returned a non-finite observation again right after a reset; "
                "nan_policy='skip' cannot recover it",
                index,
            )
        rewards[bad] = 0.0
        terminated[bad] = False
        truncated[bad] = False
        infos = dict(infos)
        infos["nonfinite"] = bad
        infos["_nonfinite"] = bad.copy()
        if "_episode" in infos:
            infos["_episode"] = infos["_episode"] & ~bad
        return obs, rewards, terminated, truncated, infos

    def _reset_sub_envs(self, mask: np.ndarray) -> Any:
        """Reset the masked sub-environments; leave every other one, and its episode counters, alone."""
        stats = self._episode_stats
        saved = [np.array(getattr(stats, name)) for name in self._EPISODE_FIELDS] if stats is not None else []
        obs, _ = self.env.reset(options={"reset_mask": np.array(mask, dtype=np.bool_)})
        if stats is not None:
            # Gymnasium's vector env pops "reset_mask" from the shared options dict, so
            # RecordEpisodeStatistics may have reset every counter: put the others back.
            for name, values in zip(self._EPISODE_FIELDS, saved):
                values[mask] = 0
                setattr(stats, name, values)
        return obs if isinstance(obs, dict) else np.asarray(obs)


def with_guard(env: VectorEnv, nan_policy: str) -> VectorEnv:
    """``env`` with a :class:`NonFiniteGuard` on top unless it already has one (of the same policy)."""
    guard = find_wrapper(env, NonFiniteGuard)
    if guard is None:
        return NonFiniteGuard(env, nan_policy)  # type: ignore[arg-type]
    if guard.nan_policy != nan_policy:
        raise ValueError(
            f"Invalid nan_policy: {nan_policy!r}, but the given VectorEnv has a NonFiniteGuard with "
            f"nan_policy={guard.nan_policy!r}; build it with make_vec_env(..., nan_policy={nan_policy!r})"
        )
    return env

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

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv, VectorEnv, VectorWrapper
from gymnasium.wrappers.vector import (
    NormalizeObservation,
    NormalizeReward,
    RecordEpisodeStatistics,
)

from trpo_lab.validation import check_int, require

Vectorization = Literal["sync", "async", "vector_entry_point"]
NanPolicy = Literal["raise", "skip"]
EnvSpec = str | Callable[[], gym.Env]

__all__ = [
    "make_vec_env",
    "check_env_id",
    "NonFiniteError",
    "NonFiniteEnvError",
    "NonFiniteGuard",
    "EnvStateError",
    "vector_env_state",
    "load_vector_env_state",
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
    if not callable(env) and not isinstance(env, str):
        raise ValueError(f"Invalid env: {env!r}; expected a Gymnasium id or a callable returning a gymnasium.Env")
    if isinstance(env, str):
        check_env_id(env)
    make: Callable[[], Any] = env if callable(env) else (lambda: gym.make(env, **env_kwargs))

    def factory() -> gym.Env:
        made = make()
        if not isinstance(made, gym.Env):
            raise ValueError(
                f"Invalid env: the factory {env!r} returned {made!r} ({type(made).__name__}); expected a gymnasium.Env"
            )
        return made

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
    nan_policy: NanPolicy | None = "raise",
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
        nan_policy: What the :class:`NonFiniteGuard` (placed above ``RecordEpisodeStatistics``
            and below the normalization wrappers) does with NaN or inf in an observation or
            reward: ``"raise"`` :class:`NonFiniteEnvError`, ``"skip"`` the transition, or
            ``None`` for no guard.

    Returns:
        A ``VectorEnv`` in ``AutoresetMode.NEXT_STEP``: the base vector env, then
        ``RecordEpisodeStatistics`` (so ``info["episode"]`` always reports raw, unnormalized
        returns), the :class:`NonFiniteGuard`, then the normalization wrappers.
        The env has been reset with ``seed``; call ``reset`` again before stepping.

    Raises:
        ValueError: unknown env id, ``n_envs < 1``, unknown vectorization mode or
            ``nan_policy``, ``env_kwargs`` the environment does not accept, a factory that
            returns no ``gymnasium.Env``, or a missing optional dependency (MuJoCo).
    """
    n_envs = check_int("n_envs", n_envs, minimum=1)
    require(
        vectorization in ("sync", "async", "vector_entry_point"),
        "vectorization", vectorization, "'sync', 'async' or 'vector_entry_point'",
    )
    require(nan_policy in ("raise", "skip", None), "nan_policy", nan_policy, "'raise' or 'skip'")
    if env_kwargs is not None and not (
        isinstance(env_kwargs, Mapping) and all(isinstance(key, str) for key in env_kwargs)
    ):
        raise ValueError(f"Invalid env_kwargs: {env_kwargs!r}; expected a dict of keyword arguments for gym.make")
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
    except TypeError as exc:
        if not env_kwargs:
            raise
        raise ValueError(f"Invalid env_kwargs {env_kwargs!r} for {env!r}: {_first_line(exc)}") from exc
    mode = vec_env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
    if mode != AutoresetMode.NEXT_STEP:
        vec_env.close()
        raise ValueError(f"Environment {env!r} uses autoreset mode {mode}; trpo_lab needs AutoresetMode.NEXT_STEP")
    vec_env.metadata["autoreset_mode"] = AutoresetMode.NEXT_STEP
    vec_env = RecordEpisodeStatistics(vec_env)
    if nan_policy is not None:
        vec_env = NonFiniteGuard(vec_env, nan_policy)
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
        # Structured observations (Dict, Tuple, Text) are not arrays: only their rewards are checked.
        array_spaces = (gym.spaces.Box, gym.spaces.Discrete, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary)
        self._check_obs = isinstance(env.single_observation_space, array_spaces)

    def _bad_observations(self, obs: Any) -> np.ndarray:
        if not self._check_obs:
            return np.zeros(self.num_envs, dtype=np.bool_)
        bad: np.ndarray = ~np.isfinite(obs.reshape(obs.shape[0], -1)).all(axis=1)
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
        if math.isfinite(_sum(rewards, None)) and (not self._check_obs or math.isfinite(_sum(obs, None))):
            return obs, rewards, terminated, truncated, infos
        return self._non_finite_step(obs, rewards, terminated, truncated, infos)

    def _non_finite_step(
        self, obs: np.ndarray, rewards: np.ndarray, terminated: np.ndarray, truncated: np.ndarray, infos: dict[str, Any]
    ) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
        bad_obs = self._bad_observations(obs)
        bad_reward = ~np.isfinite(rewards)
        bad = bad_obs | bad_reward
        if not bad.any():  # the sum overflowed; every value is finite
            return obs, rewards, terminated, truncated, infos
        if self.nan_policy == "raise":
            index = int(np.flatnonzero(bad)[0])
            if bad_obs[index]:
                count = int((~np.isfinite(obs[index])).sum())
                what = f"observation ({count} of {obs[index].size} elements NaN or inf)"
            else:
                what = f"reward ({float(rewards[index])!r})"
            raise NonFiniteEnvError(f"Environment {index} returned a non-finite {what}", index)
        obs, rewards = np.array(obs), np.array(rewards)
        terminated, truncated = np.array(terminated), np.array(truncated)
        reset_obs = self._reset_sub_envs(bad)
        obs[bad] = reset_obs[bad]
        if not np.isfinite(obs[bad]).all():
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

    def _reset_sub_envs(self, mask: np.ndarray) -> np.ndarray:
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
        return np.asarray(obs)


# ---------------------------------------------------------------------------------- env state
ENV_STATE_FORMAT = "trpo_lab.vector_env_state/1"

# Attributes that describe an env rather than hold its state (or are rendering resources).
_SKIPPED_ATTRIBUTES = frozenset(
    {
        "env", "spec", "metadata", "render_mode", "action_space", "observation_space",
        "_action_space", "_observation_space", "_single_action_space", "_single_observation_space",
        "_metadata", "_cached_spec", "_saved_kwargs", "_previous_data", "_ezpickle_args", "_ezpickle_kwargs",
        "screen", "clock", "surf", "isopen", "viewer", "mujoco_renderer", "model",
    }
)


class EnvStateError(ValueError):
    """An environment whose state cannot be captured or restored (see :func:`vector_env_state`)."""


def _skipped_value(value: Any) -> bool:
    return (
        isinstance(value, (gym.Space, gym.envs.registration.EnvSpec, type))
        or callable(value) and not isinstance(value, np.ndarray)
        or type(value).__name__ in ("MjModel", "MjData", "MujocoRenderer")  # MjData: see _mujoco_state
    )


def _tensor_of(array: np.ndarray, where: str) -> torch.Tensor:
    try:
        return torch.from_numpy(np.array(array, copy=True))
    except TypeError as exc:
        raise EnvStateError(f"Cannot capture {where}: numpy dtype {array.dtype} has no tensor equivalent") from exc


def _encode(value: Any, where: str) -> Any:
    """Plain data for one attribute value (tensors, numbers, strings, lists, dicts)."""
    if isinstance(value, (np.str_, np.bytes_)):
        return {"__text_scalar__": {"dtype": np.asarray(value).dtype.str, "value": str(value.astype(str))}}
    if isinstance(value, np.generic):  # before float: np.float64 is a float subclass
        return {"__numpy_scalar__": _tensor_of(np.asarray(value), where)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "SU":  # e.g. FrozenLake's map
        return {"__text_ndarray__": {"dtype": value.dtype.str, "values": value.astype(str).tolist()}}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": _tensor_of(value, where)}
    if isinstance(value, np.random.Generator):
        return {"__rng__": value.bit_generator.state}
    if isinstance(value, (tuple, list)):
        key = "__tuple__" if isinstance(value, tuple) else "__list__"
        return {key: [_encode(item, f"{where}[{i}]") for i, item in enumerate(value)]}
    if isinstance(value, dict) and all(isinstance(k, (str, int)) for k in value):
        return {"__dict__": {k: _encode(v, f"{where}[{k!r}]") for k, v in value.items()}}
    raise EnvStateError(f"Cannot capture {where}: a {type(value).__module__}.{type(value).__name__} is not plain data")


def _decode(saved: Any, current: Any) -> Any:
    if not isinstance(saved, dict):
        return saved
    ((key, payload),) = saved.items()
    if key == "__ndarray__":
        return payload.numpy().copy()
    if key == "__numpy_scalar__":
        return payload.numpy()[()]
    if key == "__text_scalar__":
        return np.array(payload["value"], dtype=payload["dtype"])[()]
    if key == "__text_ndarray__":
        return np.array(payload["values"], dtype=payload["dtype"])
    if key == "__rng__":
        rng = current if isinstance(current, np.random.Generator) else np.random.default_rng()
        rng.bit_generator.state = payload
        return rng
    if key == "__tuple__":
        return tuple(_decode(item, None) for item in payload)
    if key == "__list__":
        return [_decode(item, None) for item in payload]
    return {k: _decode(v, None) for k, v in payload.items()}


def _attributes(obj: Any, where: str) -> dict[str, Any]:
    return {
        name: _encode(value, f"{where}.{name}")
        for name, value in vars(obj).items()
        if name not in _SKIPPED_ATTRIBUTES and not _skipped_value(value)
    }


def _restore_attributes(obj: Any, saved: Mapping[str, Any]) -> None:
    for name, value in saved.items():
        setattr(obj, name, _decode(value, getattr(obj, name, None)))


def _layers(env: gym.Env) -> list[Any]:
    layers = [env]
    while isinstance(layers[-1], gym.Wrapper):
        layers.append(layers[-1].env)
    return layers


def _mujoco_state(env: gym.Env) -> dict[str, Any] | None:
    """MuJoCo's integration state plus every fixed-size derived array (contact forces, body
    poses) that a step may read before it recomputes them."""
    data, model = getattr(env, "data", None), getattr(env, "model", None)
    if type(data).__name__ != "MjData":
        return None
    import mujoco

    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    integration = np.empty(mujoco.mj_stateSize(model, spec), dtype=np.float64)
    mujoco.mj_getState(model, data, integration, spec)
    arrays = {}
    for name in dir(data):
        if not name.startswith("_"):
            value = getattr(data, name, None)
            if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
                arrays[name] = torch.from_numpy(np.array(value, copy=True))
    return {"integration": torch.from_numpy(integration), "arrays": arrays}


def _load_mujoco_state(env: gym.Env, state: Mapping[str, Any]) -> None:
    import mujoco

    data, model = env.data, env.model  # type: ignore[attr-defined]
    mujoco.mj_setState(model, data, state["integration"].numpy(), mujoco.mjtState.mjSTATE_INTEGRATION)
    mujoco.mj_forward(model, data)
    for name, saved in state["arrays"].items():
        target = getattr(data, name, None)
        if isinstance(target, np.ndarray) and target.shape == tuple(saved.shape):
            target[...] = saved.numpy()


def _sub_env_state(env: gym.Env, where: str) -> dict[str, Any]:
    layers = _layers(env)
    return {
        "chain": [type(layer).__name__ for layer in layers],
        "attributes": [_attributes(layer, f"{where} {type(layer).__name__}") for layer in layers],
        "mujoco": _mujoco_state(layers[-1]),
    }


def _vector_wrappers(env: VectorEnv) -> list[VectorWrapper]:
    wrappers = []
    current: Any = env
    while isinstance(current, VectorWrapper):
        wrappers.append(current)
        current = current.env
    return wrappers


_STATELESS_VECTOR_WRAPPERS = (NonFiniteGuard, NormalizeObservation, NormalizeReward)  # normalization: see below


def _sync_base(env: VectorEnv, action: str) -> SyncVectorEnv:
    base = env.unwrapped
    if not isinstance(base, SyncVectorEnv):
        raise EnvStateError(
            f"Cannot {action} the state of a {type(base).__name__}: only a gymnasium SyncVectorEnv "
            "(vectorization='sync') exposes its sub-environments"
        )
    if not hasattr(base, "_autoreset_envs"):
        raise EnvStateError(f"Cannot {action} the state of this SyncVectorEnv: it has no autoreset flags")
    return base


def vector_env_state(env: VectorEnv) -> dict[str, Any]:
    """Everything ``env`` needs to continue exactly where it is, as plain data.

    Captured: each sub-environment's RNG state and every plain-data attribute of it and of
    its wrappers (classic control's ``state`` and ``steps_beyond_terminated``,
    ``TimeLimit._elapsed_steps``, ...), MuJoCo's simulation state, the vector env's
    autoreset flags, ``RecordEpisodeStatistics``' running counters and the normalization
    statistics.  Restore it with :func:`load_vector_env_state` into an env built the same way.

    Raises:
        EnvStateError: the env cannot be captured: not a ``SyncVectorEnv`` (async workers
            live in other processes), or a sub-environment or vector wrapper holds something
            that is not plain data (a physics engine object, a deque, ...).
    """
    base = _sync_base(env, "capture")
    state: dict[str, Any] = {
        "format": ENV_STATE_FORMAT,
        "num_envs": int(base.num_envs),
        "vector_wrappers": [type(w).__name__ for w in _vector_wrappers(env)],
        "autoreset": torch.from_numpy(np.array(base._autoreset_envs, dtype=np.bool_)),
        "envs": [_sub_env_state(sub_env, f"sub-environment {i}") for i, sub_env in enumerate(base.envs)],
        "normalization": _to_tensors(normalization_state(env)),
        "wrapper_attributes": {},
    }
    for i, wrapper in enumerate(_vector_wrappers(env)):
        if isinstance(wrapper, RecordEpisodeStatistics):
            state["wrapper_attributes"][str(i)] = {
                "episode_returns": _tensor_of(wrapper.episode_returns, "episode_returns"),
                "episode_lengths": _tensor_of(wrapper.episode_lengths, "episode_lengths"),
                "prev_dones": _tensor_of(wrapper.prev_dones, "prev_dones"),
                "episode_count": int(wrapper.episode_count),
            }
        elif not isinstance(wrapper, _STATELESS_VECTOR_WRAPPERS):
            state["wrapper_attributes"][str(i)] = _attributes(wrapper, type(wrapper).__name__)
    return state


def load_vector_env_state(env: VectorEnv, state: Mapping[str, Any]) -> None:
    """Restore :func:`vector_env_state` into ``env`` (built the same way: same ids, wrappers, count).

    Everything is checked before anything is changed.

    Raises:
        EnvStateError: the state does not fit ``env`` (other env, wrappers or ``num_envs``)
            or ``env`` cannot be restored (see :func:`vector_env_state`).
    """
    base = _sync_base(env, "restore")
    if not isinstance(state, Mapping) or state.get("format") != ENV_STATE_FORMAT:
        raise EnvStateError(f"Not a vector env state (expected format {ENV_STATE_FORMAT})")
    if state["num_envs"] != base.num_envs:
        raise EnvStateError(f"The saved env state has {state['num_envs']} sub-environments, this env {base.num_envs}")
    wrappers = _vector_wrappers(env)
    names = [type(w).__name__ for w in wrappers]
    if list(state["vector_wrappers"]) != names:
        raise EnvStateError(f"The saved env state has vector wrappers {state['vector_wrappers']}, this env {names}")
    for i, (sub_env, saved) in enumerate(zip(base.envs, state["envs"])):
        chain = [type(layer).__name__ for layer in _layers(sub_env)]
        if list(saved["chain"]) != chain:
            raise EnvStateError(
                f"Sub-environment {i} is {' > '.join(chain)}; the saved state is of {' > '.join(saved['chain'])}"
            )
    for sub_env, saved in zip(base.envs, state["envs"]):
        layers = _layers(sub_env)
        for layer, attributes in zip(layers, saved["attributes"]):
            _restore_attributes(layer, attributes)
        if saved.get("mujoco") is not None:
            _load_mujoco_state(layers[-1], saved["mujoco"])
    base._autoreset_envs = state["autoreset"].numpy().astype(np.bool_)
    load_normalization_state(env, _to_numpy(state["normalization"]))
    for key, attributes in state["wrapper_attributes"].items():
        wrapper = wrappers[int(key)]
        if isinstance(wrapper, RecordEpisodeStatistics):
            wrapper.episode_returns = attributes["episode_returns"].numpy().copy()
            wrapper.episode_lengths = attributes["episode_lengths"].numpy().copy()
            wrapper.prev_dones = attributes["prev_dones"].numpy().copy()
            wrapper.episode_count = int(attributes["episode_count"])
        else:
            _restore_attributes(wrapper, attributes)


def _to_tensors(value: Any) -> Any:
    """Replace numpy arrays by tensors, recursively (checkpoints hold only tensors and plain data)."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value))
    if isinstance(value, dict):
        return {k: _to_tensors(v) for k, v in value.items()}
    return value


def _to_numpy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, Mapping):
        return {k: _to_numpy(v) for k, v in value.items()}
    return value

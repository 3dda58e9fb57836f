"""Vectorized Gymnasium environments (NEXT_STEP autoreset) and their normalization wrappers."""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal

import gymnasium as gym
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.wrappers.vector import (
    ClipReward,
    NormalizeObservation,
    NormalizeReward,
    RecordEpisodeStatistics,
)

from trpo_lab.envs.atari import AtariOptions, atari_env_factory, is_atari_id, register_atari
from trpo_lab.envs.guard import NanPolicy, NonFiniteGuard, find_wrapper
from trpo_lab.envs.running_stats import install_fast_statistics
from trpo_lab.nn.extractors import is_image_space
from trpo_lab.validation import check_int, first_line, require

Vectorization = Literal["sync", "async", "vector_entry_point"]
EnvSpec = str | Callable[[], gym.Env]


def check_env_id(env_id: str) -> None:
    """Raise ``ValueError`` naming ``env_id`` and close registered ids if it is unknown."""
    if env_id in gym.registry:
        return
    if (env_id.startswith("ALE/") or "NoFrameskip" in env_id) and register_atari() and env_id in gym.registry:
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
            Atari ids (``"ALE/Pong-v5"``, ``"PongNoFrameskip-v4"``) get the standard
            preprocessing of :mod:`trpo_lab.envs.atari` (its options are ``env_kwargs`` keys).
        n_envs: Number of sub-environments (>= 1).
        seed: Sub-environment ``i`` is reset with ``seed + i`` (and its action space seeded
            the same way); ``None`` leaves them unseeded.
        vectorization: ``"sync"`` (one process, default), ``"async"`` (one process per env,
            worth it for heavy physics) or ``"vector_entry_point"`` (the env's own batched
            implementation, e.g. Gymnasium's numpy CartPole; only for ids that have one).
        normalize_obs: Wrap with Gymnasium's ``NormalizeObservation`` (running mean/std, its
            statistics object swapped for :mod:`trpo_lab.envs.running_stats`' bit-identical one);
            ignored, with a warning, for uint8 image observations, which the network scales;
            refused for ``Dict`` observations (the wrapper takes arrays only).
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
            ``nan_policy``, ``env_kwargs`` the environment does not accept, ``normalize_obs``
            with ``Dict`` observations, a factory that
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
    atari: AtariOptions | None = None
    try:
        if isinstance(env, str) and is_atari_id(env):
            factory, atari = atari_env_factory(env, env_kwargs)
            check_env_id(env)
            if vectorization == "vector_entry_point":
                raise ValueError(f"Invalid vectorization: 'vector_entry_point' for {env!r}; use 'sync' or 'async'")
            vector_cls = gym.vector.SyncVectorEnv if vectorization == "sync" else gym.vector.AsyncVectorEnv
            vec_env: VectorEnv = vector_cls([factory] * n_envs, autoreset_mode=AutoresetMode.NEXT_STEP)
        elif vectorization == "vector_entry_point":
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
            f"Environment {env!r} needs an optional dependency ({exc}); install it with: "
            f"pip install 'trpo-lab[{'atari' if atari is not None else 'mujoco'}]'"
        ) from exc
    except TypeError as exc:
        if not env_kwargs:
            raise
        raise ValueError(f"Invalid env_kwargs {env_kwargs!r} for {env!r}: {first_line(exc)}") from exc
    mode = vec_env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
    if mode != AutoresetMode.NEXT_STEP:
        vec_env.close()
        raise ValueError(f"Environment {env!r} uses autoreset mode {mode}; trpo_lab needs AutoresetMode.NEXT_STEP")
    vec_env.metadata["autoreset_mode"] = AutoresetMode.NEXT_STEP
    vec_env = RecordEpisodeStatistics(vec_env)
    if atari is not None and atari.clip_reward:
        vec_env = ClipReward(vec_env, min_reward=-1.0, max_reward=1.0)  # training only: episodes record raw scores
    if nan_policy is not None:
        vec_env = NonFiniteGuard(vec_env, nan_policy)
    if normalize_obs and is_image_space(vec_env.single_observation_space, normalize_images=False):
        warnings.warn(
            f"normalize_obs ignored for {env!r}: its observations are uint8 images, which the network scales by 1/255",
            stacklevel=2,
        )
        normalize_obs = False
    if normalize_obs and isinstance(vec_env.single_observation_space, gym.spaces.Dict):
        vec_env.close()
        raise ValueError(
            f"Invalid normalize_obs: True for {env!r}, whose observations are a Dict "
            f"(keys {sorted(vec_env.single_observation_space.spaces)}); Gymnasium's NormalizeObservation takes "
            "array observations only: set normalize_obs=False (scale the observations in the environment)"
        )
    if normalize_obs:
        vec_env = NormalizeObservation(vec_env)
        install_fast_statistics(vec_env)  # bit-identical statistics, fewer numpy calls per step
    if normalize_reward:
        vec_env = NormalizeReward(vec_env, gamma=gamma)
        install_fast_statistics(vec_env)
    if seed is not None:
        vec_env.reset(seed=seed)
        vec_env.action_space.seed(seed)
    return vec_env


def set_normalization_training(env: VectorEnv, training: bool) -> None:
    """Freeze (``False``) or resume (``True``) updates of the normalization statistics."""
    obs_norm = find_wrapper(env, NormalizeObservation)
    if obs_norm is not None:
        obs_norm.update_running_mean = training
    rew_norm = find_wrapper(env, NormalizeReward)
    if rew_norm is not None:
        rew_norm.update_running_mean = training

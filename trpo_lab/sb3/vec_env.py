"""A bridge in both directions between Stable-Baselines3 VecEnvs and ``gymnasium.vector`` envs.

The two APIs differ in when a finished sub-environment is reset:

- SB3 resets it inside the step that ends the episode: that step returns the *reset*
  observation, with the final one in ``infos[i]["terminal_observation"]`` and
  ``infos[i]["TimeLimit.truncated"]`` telling a time limit from a termination.
- Gymnasium's ``AutoresetMode.NEXT_STEP`` (what trpo_lab's rollout loop expects, see
  :mod:`trpo_lab.envs`) returns the *final* observation at that step and resets on the next
  ``step`` call, which returns the reset observation with reward 0.
- Gymnasium's ``AutoresetMode.SAME_STEP`` is SB3's convention with the final observation in
  ``infos["final_obs"]``.

:class:`SB3ToGymnasiumVectorEnv` makes an SB3 ``VecEnv`` (``DummyVecEnv``, ``SubprocVecEnv``,
``VecNormalize``, ...) a NEXT_STEP ``gymnasium.vector.VectorEnv`` for trpo_lab's agents, and
:class:`GymnasiumToSB3VecEnv` makes a SAME_STEP ``VectorEnv`` an SB3 ``VecEnv`` for SB3's
algorithms (:func:`make_sb3_vec_env` builds one from an env id).

An SB3 ``VecEnv`` steps all its sub-environments together and cannot leave one out, so the
NEXT_STEP "reset step" cannot skip the sub-environment as Gymnasium's own vector envs do; see
:class:`SB3ToGymnasiumVectorEnv` for what happens instead and why the rollout loop still
sees only real transitions.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space
from gymnasium.wrappers.vector import RecordEpisodeStatistics
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn

from trpo_lab.envs import check_env_id

__all__ = ["GymnasiumToSB3VecEnv", "SB3ToGymnasiumVectorEnv", "make_sb3_vec_env", "split_vector_infos"]


def split_vector_infos(infos: dict[str, Any], num_envs: int) -> list[dict[str, Any]]:
    """Gymnasium's batched ``infos`` (arrays with ``_key`` masks) as one dict per sub-environment.

    Args:
        infos: The ``info`` of a ``VectorEnv.step``/``reset``: every key ``k`` holds an array
            over sub-environments (or a nested dict of them) and ``infos["_k"]`` a boolean mask
            of the sub-environments that reported it (all when absent).
        num_envs: The number of sub-environments.

    Returns:
        ``num_envs`` dicts; sub-environment ``i`` gets ``k: infos[k][i]`` where its mask is set.
    """
    per_env: list[dict[str, Any]] = [{} for _ in range(num_envs)]
    for key, value in infos.items():
        if key.startswith("_"):
            continue
        mask = np.asarray(infos.get(f"_{key}", np.ones(num_envs, dtype=bool)), dtype=bool)
        if isinstance(value, dict):
            nested = split_vector_infos(value, num_envs)
            for index in np.flatnonzero(mask):
                per_env[index][key] = nested[index]
            continue
        for index in np.flatnonzero(mask):
            per_env[index][key] = value[index]
    return per_env


def _as_space_dtype(obs: Any, space: gym.Space[Any]) -> Any:
    """``obs`` in the dtype of a Box space (VecNormalize may hand back float64), else unchanged."""
    if isinstance(space, gym.spaces.Box) and isinstance(obs, np.ndarray) and obs.dtype != space.dtype:
        return obs.astype(space.dtype)
    return obs


class SB3ToGymnasiumVectorEnv(VectorEnv):
    """An SB3 ``VecEnv`` as a ``gymnasium.vector.VectorEnv`` in ``AutoresetMode.NEXT_STEP``.

    trpo_lab's agents take it wherever they take a ``VectorEnv``, so SB3 environment stacks
    (``make_vec_env``, ``VecNormalize``, ``SubprocVecEnv``, custom ``VecEnvWrapper`` s) train
    trpo_lab's TRPO, NPG, ACKTR and PPO::

        venv = VecNormalize(make_vec_env("CartPole-v1", n_envs=8, seed=0))
        agent = trpo_lab.TRPO(SB3ToGymnasiumVectorEnv(venv), seed=0)

    Each ``step`` returns, per sub-environment:

    - while an episode runs: the SB3 observation, reward, and ``terminated = truncated = False``;
    - at the step that ends an episode: the **final** observation
      (``infos[i]["terminal_observation"]``), the reward, ``truncated`` from
      ``infos[i]["TimeLimit.truncated"]`` and ``terminated`` otherwise;
    - at the step after that (the NEXT_STEP "reset step"): reward 0 and no termination or
      truncation, as Gymnasium's own vector envs. SB3 cannot leave a sub-environment out of a
      step, so the action given for it is still applied, to the reset state, and the returned
      observation is the one that action led to (a new reset observation if that one-step
      episode ended too). The rollout loop stores the reset step as an invalid slot (it holds
      V(final observation) for bootstrapping) and resumes from the returned observation, so
      every transition it trains on is a real one of the environment; only the first
      transition of each episode after the first is executed without being recorded.

    ``infos["episode"]`` / ``infos["_episode"]`` report finished episodes like Gymnasium's
    ``RecordEpisodeStatistics`` (``r``, ``l``, ``t``): from SB3's ``Monitor``/``VecMonitor``
    (unnormalized, also under ``VecNormalize``) when the stack has one, else from the rewards
    this adapter receives, reset step included. Other SB3 info keys are batched with masks.

    ``reset(seed=s)`` seeds sub-environment ``i`` with ``s + i`` (``VecEnv.seed``), as
    Gymnasium does. ``VecNormalize`` statistics live in the SB3 stack: save them with
    ``venv.save(path)``, and normalize raw observations with ``venv.normalize_obs`` before
    ``agent.predict``; an agent built on this adapter has no env id, so ``agent.evaluate()``
    raises and ``Agent.load`` needs ``env=``.

    Args:
        venv: The SB3 vectorized environment; closed by :meth:`close`.
    """

    def __init__(self, venv: VecEnv) -> None:
        if not isinstance(venv, VecEnv):
            raise ValueError(
                f"Invalid venv: got {type(venv).__name__}; expected a stable_baselines3 VecEnv "
                "(e.g. from stable_baselines3.common.env_util.make_vec_env)"
            )
        self.venv = venv
        self.num_envs = venv.num_envs
        self.single_observation_space = venv.observation_space
        self.single_action_space = venv.action_space
        self.observation_space = batch_space(venv.observation_space, venv.num_envs)
        self.action_space = batch_space(venv.action_space, venv.num_envs)
        self.render_mode = venv.render_mode
        self.metadata = {
            "autoreset_mode": AutoresetMode.NEXT_STEP,
            "render_modes": list(venv.metadata.get("render_modes", [])),
        }
        self._in_reset_step = np.zeros(self.num_envs, dtype=bool)
        self._episode_returns = np.zeros(self.num_envs, dtype=np.float64)
        self._episode_lengths = np.zeros(self.num_envs, dtype=np.int64)
        self._episode_starts = np.full(self.num_envs, time.perf_counter())

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """Reset every sub-environment; ``seed`` seeds sub-environment ``i`` with ``seed + i``."""
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
                raise ValueError(
                    f"Invalid seed: {seed!r}; expected None or an int (sub-environment i gets seed + i)"
                )
            self.venv.seed(int(seed))
        if options:
            self.venv.set_options(options)
        obs = _as_space_dtype(self.venv.reset(), self.single_observation_space)
        self._in_reset_step[:] = False
        self._episode_returns[:] = 0.0
        self._episode_lengths[:] = 0
        self._episode_starts[:] = time.perf_counter()
        infos: dict[str, Any] = {}
        reset_infos = getattr(self.venv.unwrapped, "reset_infos", None) or []
        for index, info in enumerate(reset_infos):
            if info:
                infos = self._add_info(infos, dict(info), index)
        return obs, infos

    def step(self, actions: Any) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """One step of every sub-environment, with NEXT_STEP autoreset (see the class docstring)."""
        obs, sb3_rewards, dones, sb3_infos = self.venv.step(np.asarray(actions))
        obs = np.array(_as_space_dtype(obs, self.single_observation_space), copy=True)
        rewards = np.asarray(sb3_rewards, dtype=np.float64).copy()
        terminated = np.zeros(self.num_envs, dtype=bool)
        truncated = np.zeros(self.num_envs, dtype=bool)
        now = time.perf_counter()
        infos: dict[str, Any] = {}
        for index in range(self.num_envs):
            info = dict(sb3_infos[index])
            final_obs = info.pop("terminal_observation", None)
            time_limit = bool(info.pop("TimeLimit.truncated", False))
            monitor_episode = info.pop("episode", None)
            reward = float(rewards[index])
            if self._in_reset_step[index]:
                self._in_reset_step[index] = False
                rewards[index] = 0.0
            elif dones[index]:
                if final_obs is None:
                    raise ValueError(
                        f"Sub-environment {index} ended an episode without infos[{index}]"
                        "['terminal_observation']; every SB3 VecEnv must provide it"
                    )
                obs[index] = _as_space_dtype(np.asarray(final_obs), self.single_observation_space)
                truncated[index] = time_limit
                terminated[index] = not time_limit
                self._in_reset_step[index] = True
            self._episode_returns[index] += reward
            self._episode_lengths[index] += 1
            if dones[index]:
                info["episode"] = self._episode_record(index, monitor_episode, now)
                self._episode_returns[index] = 0.0
                self._episode_lengths[index] = 0
                self._episode_starts[index] = now
            if info:
                infos = self._add_info(infos, info, index)
        return obs, rewards, terminated, truncated, infos

    def _episode_record(self, index: int, monitor_episode: Any, now: float) -> dict[str, Any]:
        if isinstance(monitor_episode, dict) and "r" in monitor_episode:
            return {
                "r": float(monitor_episode["r"]),
                "l": int(monitor_episode["l"]),
                "t": float(monitor_episode.get("t", now - self._episode_starts[index])),
            }
        return {
            "r": float(self._episode_returns[index]),
            "l": int(self._episode_lengths[index]),
            "t": round(now - float(self._episode_starts[index]), 6),
        }

    def render(self) -> tuple[Any, ...] | None:
        """The sub-environments' frames (``VecEnv.get_images``), or None without ``rgb_array``."""
        if self.render_mode != "rgb_array":
            return None
        return tuple(self.venv.get_images())

    def call(self, name: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        """Call a method of every sub-environment (``VecEnv.env_method``)."""
        return tuple(self.venv.env_method(name, *args, **kwargs))

    def get_attr(self, name: str) -> tuple[Any, ...]:
        """An attribute of every sub-environment (``VecEnv.get_attr``)."""
        return tuple(self.venv.get_attr(name))

    def set_attr(self, name: str, values: Any) -> None:
        """Set an attribute on every sub-environment: one value for all, or one per sub-environment."""
        if isinstance(values, (list, tuple)):
            if len(values) != self.num_envs:
                raise ValueError(f"Invalid values: got {len(values)} for {self.num_envs} sub-environments")
            for index, value in enumerate(values):
                self.venv.set_attr(name, value, indices=[index])
        else:
            self.venv.set_attr(name, values)

    def close_extras(self, **kwargs: Any) -> None:
        self.venv.close()


class GymnasiumToSB3VecEnv(VecEnv):
    """A ``gymnasium.vector.VectorEnv`` in ``AutoresetMode.SAME_STEP`` as an SB3 ``VecEnv``.

    SAME_STEP is SB3's own convention, so the mapping is exact: observations and rewards pass
    through (rewards as float32, like ``DummyVecEnv``), ``dones = terminated | truncated``,
    ``infos[i]`` holds sub-environment ``i``'s info with ``"terminal_observation"`` (from
    Gymnasium's ``infos["final_obs"]``) and ``"TimeLimit.truncated"`` when its episode ends,
    and ``"episode"`` (``r``, ``l``, ``t``) where the env reports Gymnasium's
    ``RecordEpisodeStatistics`` (so SB3 logs ``rollout/ep_rew_mean``). SB3 wrappers
    (``VecNormalize``, ``VecFrameStack``, ``VecMonitor``, ...) go on top as usual.

    A NEXT_STEP env (Gymnasium's default, and what :func:`trpo_lab.make_vec_env` builds)
    is refused: it only resets a sub-environment on the following step, which steps all the
    others too, so SB3's reset-in-the-same-step cannot be reproduced. Build the env with
    ``autoreset_mode=AutoresetMode.SAME_STEP`` (or use :func:`make_sb3_vec_env`).

    Args:
        env: The Gymnasium vector env; closed by :meth:`close`.

    Raises:
        ValueError: If ``env`` is not a ``VectorEnv`` or its autoreset mode is not SAME_STEP.
    """

    def __init__(self, env: VectorEnv) -> None:
        if not isinstance(env, VectorEnv):
            raise ValueError(f"Invalid env: got {type(env).__name__}; expected a gymnasium.vector.VectorEnv")
        mode = env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
        if mode != AutoresetMode.SAME_STEP:
            raise ValueError(
                f"Invalid env: autoreset mode {mode}; GymnasiumToSB3VecEnv needs AutoresetMode.SAME_STEP "
                "(SB3 resets a sub-environment in the step that ends its episode). Build it with "
                "gym.vector.SyncVectorEnv(fns, autoreset_mode=AutoresetMode.SAME_STEP) or "
                "trpo_lab.sb3.make_sb3_vec_env(env_id, n_envs)"
            )
        self.env = env
        self._actions: np.ndarray | None = None
        super().__init__(env.num_envs, env.single_observation_space, env.single_action_space)

    @property
    def _base(self) -> Any:
        return self.env.unwrapped

    def reset(self) -> VecEnvObs:
        seeds = list(self._seeds)
        options = self._options[0]
        if any(option != options for option in self._options):
            raise ValueError(
                "GymnasiumToSB3VecEnv: a gymnasium VectorEnv takes one options dict for all "
                f"sub-environments; got different ones: {self._options}"
            )
        seed_arg = seeds if any(seed is not None for seed in seeds) else None
        # gymnasium's VectorEnv.reset takes a list of per-env seeds too, though its stub says int.
        obs, infos = self.env.reset(seed=seed_arg, options=dict(options) if options else None)  # type: ignore[arg-type]
        self.reset_infos = split_vector_infos(infos, self.num_envs)
        self._reset_seeds()
        self._reset_options()
        observations: VecEnvObs = obs
        return observations

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self) -> VecEnvStepReturn:
        if self._actions is None:
            raise RuntimeError("GymnasiumToSB3VecEnv.step_wait() called without step_async(actions)")
        obs, rewards, terminated, truncated, infos = self.env.step(self._actions)
        self._actions = None
        dones = np.logical_or(terminated, truncated)
        final_obs = infos.pop("final_obs", None)
        infos.pop("_final_obs", None)
        final_info = infos.pop("final_info", None)
        final_mask = infos.pop("_final_info", None)
        per_env = split_vector_infos(infos, self.num_envs)
        if final_info is not None:
            finals = split_vector_infos(final_info, self.num_envs)
            for index in np.flatnonzero(final_mask if final_mask is not None else dones):
                # The info of the step that ended the episode; the reset's info is the reset info.
                self.reset_infos[index] = {k: v for k, v in per_env[index].items() if k != "episode"}
                episode = per_env[index].get("episode")
                per_env[index] = dict(finals[index])
                if episode is not None:
                    per_env[index]["episode"] = episode
        for env_index in range(self.num_envs):
            info = per_env[env_index]
            if "episode" in info:
                episode = info["episode"]
                info["episode"] = {"r": float(episode["r"]), "l": int(episode["l"]), "t": float(episode["t"])}
            if dones[env_index]:
                if final_obs is None:
                    raise ValueError(
                        f"Sub-environment {env_index} ended an episode but the env gave no infos['final_obs']; "
                        "is it really in AutoresetMode.SAME_STEP?"
                    )
                info["terminal_observation"] = final_obs[env_index]
            info["TimeLimit.truncated"] = bool(truncated[env_index] and not terminated[env_index])
        return obs, np.asarray(rewards, dtype=np.float32), dones, per_env

    def close(self) -> None:
        self.env.close()

    def get_images(self) -> Sequence[np.ndarray | None]:
        frames = self.env.render()
        return [np.asarray(frame) for frame in frames] if frames is not None else [None] * self.num_envs

    def _sub_envs(self, indices: VecEnvIndices) -> list[gym.Env] | None:
        """The sub-environments themselves for an in-process vector env, else None."""
        envs = getattr(self._base, "envs", None)
        if envs is None:
            return None
        return [envs[index] for index in self._get_indices(indices)]

    def _require_all(self, indices: VecEnvIndices, what: str) -> None:
        if list(self._get_indices(indices)) != list(range(self.num_envs)):
            raise ValueError(
                f"GymnasiumToSB3VecEnv: {what} on a subset of sub-environments needs an in-process "
                f"vector env (SyncVectorEnv); {type(self._base).__name__} only addresses all of them"
            )

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        envs = self._sub_envs(indices)
        if envs is not None:
            return [env.get_wrapper_attr(attr_name) for env in envs]
        self._require_all(indices, "get_attr")
        return list(self._base.get_attr(attr_name))

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        envs = self._sub_envs(indices)
        if envs is not None:
            for env in envs:
                env.set_wrapper_attr(attr_name, value)
            return
        self._require_all(indices, "set_attr")
        self._base.set_attr(attr_name, value)

    def env_method(self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **method_kwargs: Any) -> list[Any]:
        envs = self._sub_envs(indices)
        if envs is not None:
            return [env.get_wrapper_attr(method_name)(*method_args, **method_kwargs) for env in envs]
        self._require_all(indices, "env_method")
        return list(self._base.call(method_name, *method_args, **method_kwargs))

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        from stable_baselines3.common.env_util import is_wrapped

        envs = self._sub_envs(indices)
        if envs is None:
            return [False for _ in self._get_indices(indices)]
        return [is_wrapped(env, wrapper_class) for env in envs]


def make_sb3_vec_env(
    env: str | Callable[[], gym.Env],
    n_envs: int = 1,
    seed: int | None = None,
    vectorization: str = "sync",
    env_kwargs: dict[str, Any] | None = None,
) -> GymnasiumToSB3VecEnv:
    """An SB3 ``VecEnv`` backed by ``gymnasium.vector`` (SAME_STEP, with ``RecordEpisodeStatistics``).

    The Gymnasium counterpart of SB3's ``make_vec_env``: ``vectorization="async"`` runs one
    process per sub-environment with Gymnasium's ``AsyncVectorEnv``.

    Args:
        env: A registered Gymnasium id or a callable returning a ``gymnasium.Env``.
        n_envs: The number of sub-environments (>= 1).
        seed: Sub-environment ``i`` is seeded with ``seed + i`` at the first ``reset``
            (and its action space too); None leaves them unseeded.
        vectorization: ``"sync"`` (one process) or ``"async"``.
        env_kwargs: Keyword arguments for ``gym.make``.

    Raises:
        ValueError: An unknown env id, ``n_envs < 1`` or an unknown vectorization.
    """
    if isinstance(n_envs, bool) or not isinstance(n_envs, int) or n_envs < 1:
        raise ValueError(f"Invalid n_envs: {n_envs!r}; expected an integer >= 1")
    if vectorization not in ("sync", "async"):
        raise ValueError(f"Invalid vectorization: {vectorization!r}; expected 'sync' or 'async'")
    kwargs = dict(env_kwargs or {})
    if isinstance(env, str):
        check_env_id(env)
        env_id = env

        def factory() -> gym.Env:
            return gym.make(env_id, **kwargs)

    elif callable(env):
        factory = env
    else:
        raise ValueError(f"Invalid env: {env!r}; expected a Gymnasium id or a callable returning a gymnasium.Env")
    vector_cls = gym.vector.SyncVectorEnv if vectorization == "sync" else gym.vector.AsyncVectorEnv
    vector_env = RecordEpisodeStatistics(vector_cls([factory] * n_envs, autoreset_mode=AutoresetMode.SAME_STEP))
    venv = GymnasiumToSB3VecEnv(vector_env)
    if seed is not None:
        venv.seed(seed)
        vector_env.action_space.seed(seed)
        for index, space in enumerate(_single_action_spaces(venv)):
            space.seed(seed + index)
    return venv


def _single_action_spaces(venv: GymnasiumToSB3VecEnv) -> Iterable[gym.Space[Any]]:
    """The sub-environments' own action spaces where they are reachable (in-process envs)."""
    envs = getattr(venv.env.unwrapped, "envs", None)
    return [env.action_space for env in envs] if envs is not None else []

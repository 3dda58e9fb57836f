"""The on-policy loop every agent shares: collect -> update, predict, save/load, logging.

Agents differ only in :meth:`OnPolicyAgent._setup` (their optimizers) and
:meth:`OnPolicyAgent.update` (one update from a flat batch).  Collection, GAE,
normalization, logging, checkpointing and evaluation are written once, here.
"""

from __future__ import annotations

import io
import math
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import VectorEnv
from gymnasium.wrappers.vector import NormalizeObservation

from trpo_lab.buffer import RolloutBatch, RolloutBuffer
from trpo_lab.config import AgentConfig
from trpo_lab.envs import (
    find_wrapper,
    load_normalization_state,
    make_vec_env,
    normalization_state,
)
from trpo_lab.logging import RunLogger, atomic_write_bytes, atomic_write_text
from trpo_lab.policies import ActorCritic

__all__ = ["OnPolicyAgent", "NonFiniteEnvError", "CHECKPOINT_FORMAT", "space_signature", "read_checkpoint"]

CHECKPOINT_FORMAT = "trpo_lab.agent/1"
A = TypeVar("A", bound="OnPolicyAgent")


class NonFiniteEnvError(RuntimeError):
    """An environment returned NaN or inf in an observation or reward."""


def space_signature(space: gym.Space) -> dict[str, Any]:
    """Plain-data description of a space, stored in checkpoints to detect mismatched envs."""
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n)}
    if isinstance(space, gym.spaces.MultiDiscrete):
        return {"type": "MultiDiscrete", "nvec": [int(n) for n in np.asarray(space.nvec).reshape(-1)]}
    if isinstance(space, gym.spaces.Box):
        return {"type": "Box", "shape": [int(s) for s in space.shape]}
    return {"type": type(space).__name__}


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
    if isinstance(value, dict):
        return {k: _to_numpy(v) for k, v in value.items()}
    return value


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``: tensors and plain data only).

    Raises:
        ValueError: missing, truncated, corrupt or foreign file, or one that tries to load code.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or unsafe files
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"Cannot load checkpoint {path}: not a valid trpo_lab checkpoint ({first_line})") from exc
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"Cannot load checkpoint {path}: not a trpo_lab checkpoint (format {CHECKPOINT_FORMAT})")
    return data


class OnPolicyAgent(ABC):
    """Base class of TRPO, NPG, ACKTR and PPO.

    Args:
        env: A Gymnasium id, a callable returning a ``gymnasium.Env``, or a ready
            ``gymnasium.vector.VectorEnv`` in ``NEXT_STEP`` autoreset mode.
        n_envs: Number of parallel environments (ignored when ``env`` is a VectorEnv).
        seed: Seeds the environments, the network initialisation and all sampling.
        device: Torch device for the networks, the buffer and the update.
        vectorization: ``"sync"``, ``"async"`` or ``"vector_entry_point"`` (see ``make_vec_env``).
        env_kwargs: Keyword arguments for ``gym.make``.
        **hyperparameters: Fields of the agent's config dataclass (SB3 names).
    """

    algo: ClassVar[str] = ""
    config_class: ClassVar[type[AgentConfig]] = AgentConfig

    def __init__(
        self,
        env: str | Callable[[], gym.Env] | VectorEnv,
        n_envs: int = 8,
        seed: int = 0,
        device: str | torch.device = "cpu",
        vectorization: str = "sync",
        env_kwargs: dict[str, Any] | None = None,
        **hyperparameters: Any,
    ) -> None:
        self.config = self.config_class.from_dict(hyperparameters)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Invalid seed: {seed!r}; expected an integer")
        self.seed = seed
        self.device = _resolve_device(device)
        self.vectorization = vectorization
        self.env_kwargs = dict(env_kwargs or {})
        if isinstance(env, VectorEnv):
            self.env_id: str | None = env.spec.id if env.spec is not None else None
            self.env = env
            env.reset(seed=seed)
        else:
            self.env_id = env if isinstance(env, str) else None
            self.env = make_vec_env(
                env,
                n_envs=n_envs,
                seed=seed,
                vectorization=vectorization,  # type: ignore[arg-type]
                normalize_obs=self.config.normalize_obs,
                normalize_reward=self.config.normalize_reward,
                gamma=self.config.gamma,
                env_kwargs=self.env_kwargs,
            )
        self._env_spec = env if not isinstance(env, VectorEnv) else None
        self.n_envs = self.env.num_envs
        self.observation_space = self.env.single_observation_space
        self.action_space = self.env.single_action_space
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.policy = ActorCritic(self.observation_space, self.action_space, **self.config.policy_kwargs)
        self.policy.to(self.device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.shuffle_generator = torch.Generator().manual_seed(seed + 1)
        action_shape = tuple(self.action_space.shape or ())
        action_dtype = torch.float32 if isinstance(self.action_space, gym.spaces.Box) else torch.long
        obs_shape = (
            tuple(self.observation_space.shape)
            if isinstance(self.observation_space, gym.spaces.Box)
            else ()
        )
        self.buffer = RolloutBuffer(
            self.config.n_steps, self.n_envs, obs_shape, action_shape, action_dtype, self.device,
            obs_dtype=torch.float32 if isinstance(self.observation_space, gym.spaces.Box) else torch.long,
        )
        self._clip_actions = isinstance(self.action_space, gym.spaces.Box)
        self.num_timesteps = 0
        self.num_updates = 0
        self.num_episodes = 0
        self.wall_time = 0.0
        self.episode_returns: deque[float] = deque(maxlen=100)
        self.episode_lengths: deque[float] = deque(maxlen=100)
        self._last_obs: np.ndarray | None = None
        self._autoreset = np.zeros(self.n_envs, dtype=bool)
        self._setup()

    # ------------------------------------------------------------------ algorithm hooks
    @abstractmethod
    def _setup(self) -> None:
        """Create the algorithm's optimizers (called at the end of ``__init__``)."""

    @abstractmethod
    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """One update from a flat batch of valid transitions; returns ``train/...`` metrics."""

    def _optimizer_states(self) -> dict[str, Any]:
        """Algorithm state to checkpoint (optimizer state_dicts); override in subclasses."""
        return {}

    def _load_optimizer_states(self, states: Mapping[str, Any]) -> None:
        """Restore what :meth:`_optimizer_states` saved."""

    # ------------------------------------------------------------------ rollout
    def collect_rollout(self) -> int:
        """Fill the buffer with ``n_steps`` vectorized steps and compute GAE; returns env steps taken.

        The hot loop: one fused actor+critic forward per step (:meth:`ActorCritic.fused`),
        observations written once into the buffer and read back as a zero-copy view, env
        outputs stored through numpy views, and no per-step Python objects beyond Gymnasium's.
        """
        env, buffer = self.env, self.buffer
        if self._last_obs is None:
            self._last_obs, _ = env.reset(seed=self.seed)
            self._autoreset[:] = False
        obs = self._last_obs
        buffer.reset()
        acting = self.policy.fused()
        steps = 0
        low = high = None
        if self._clip_actions:
            low, high = self.action_space.low, self.action_space.high  # type: ignore[attr-defined]
        autoreset = self._autoreset
        with torch.inference_mode():
            for step in range(self.config.n_steps):
                obs_t = buffer.put_observation(obs)
                actions, log_probs, values = acting.act(obs_t, self.generator)
                actions_np = actions.numpy() if actions.device.type == "cpu" else actions.cpu().numpy()
                env_actions = np.clip(actions_np, low, high) if low is not None else actions_np
                next_obs, rewards, terminated, truncated, infos = env.step(env_actions)
                if not (np.isfinite(rewards).all() and np.isfinite(next_obs).all()):
                    self._raise_non_finite(next_obs, rewards, step)
                valid = ~autoreset
                buffer.add(obs_t, actions, log_probs, values, rewards, terminated, truncated, valid)
                steps += int(valid.sum())
                autoreset = terminated | truncated
                if "_episode" in infos:
                    self._record_episodes(infos)
                obs = next_obs
            last_values = self.policy.value(self.policy.preprocess(torch.as_tensor(obs, device=self.device)))
        self._autoreset = autoreset
        self._last_obs = obs
        buffer.finish(last_values.clone(), self.config.gamma, self.config.gae_lambda)
        return steps

    def _record_episodes(self, infos: dict[str, Any]) -> None:
        done_mask = infos["_episode"]
        for ret, length in zip(infos["episode"]["r"][done_mask], infos["episode"]["l"][done_mask]):
            self.episode_returns.append(float(ret))
            self.episode_lengths.append(float(length))
            self.num_episodes += 1

    def _raise_non_finite(self, obs: np.ndarray, rewards: np.ndarray, step: int) -> None:
        bad_obs = ~np.isfinite(obs.reshape(obs.shape[0], -1)).all(axis=1)
        bad_rew = ~np.isfinite(rewards)
        env_index = int(np.flatnonzero(bad_obs | bad_rew)[0])
        what = "observation" if bad_obs[env_index] else "reward"
        raise NonFiniteEnvError(
            f"Environment {env_index} returned a non-finite {what} at rollout step {step} "
            f"(update {self.num_updates}, timestep {self.num_timesteps}); "
            "check the environment or wrap it to sanitise its output"
        )

    # ------------------------------------------------------------------ training loop
    def learn(
        self: A,
        total_timesteps: int,
        run_dir: str | Path | None = None,
        progress_bar: bool = False,
        callback: Callable[[A, dict[str, float]], bool | None] | None = None,
        tensorboard: bool = True,
    ) -> A:
        """Train until ``num_timesteps >= total_timesteps`` (counted over all agents' lifetime).

        Args:
            total_timesteps: Total environment steps (valid transitions) to train for.
            run_dir: If given, write ``config.toml``, ``progress.csv``, TensorBoard events,
                ``checkpoint.pt`` (every ``checkpoint_every`` updates, atomically) and ``final.pt``.
            progress_bar: Show a live console progress bar.
            callback: Called after each update with ``(agent, metrics)``; returning ``False`` stops.
            tensorboard: Write TensorBoard events into ``run_dir``.
        """
        if isinstance(total_timesteps, bool) or not isinstance(total_timesteps, int) or total_timesteps < 1:
            raise ValueError(f"Invalid total_timesteps: {total_timesteps!r}; expected an integer >= 1")
        run_path = Path(run_dir) if run_dir is not None else None
        resume = run_path is not None and self.num_updates > 0 and (run_path / "progress.csv").exists()
        if run_path is not None:
            run_path.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_path / "config.toml", self.config_toml(total_timesteps))
        logger = RunLogger(
            run_path,
            total_timesteps,
            progress_bar=progress_bar,
            tensorboard=tensorboard,
            resume=resume,
            start_timesteps=self.num_timesteps,
        )
        try:
            while self.num_timesteps < total_timesteps:
                metrics = self._train_one_update()
                logger.log(metrics)
                if run_path is not None and self.config.checkpoint_every and (
                    self.num_updates % self.config.checkpoint_every == 0
                ):
                    self.save(run_path / "checkpoint.pt")
                if callback is not None and callback(self, metrics) is False:
                    break
        finally:
            logger.close()
        if run_path is not None:
            self.save(run_path / "checkpoint.pt")
            self.save(run_path / "final.pt")
        return self

    def _train_one_update(self) -> dict[str, float]:
        start = time.perf_counter()
        steps = self.collect_rollout()
        rollout_done = time.perf_counter()
        metrics = self.update(self.buffer.batch())
        end = time.perf_counter()
        self.num_timesteps += steps
        self.num_updates += 1
        self.wall_time += end - start
        returns = np.asarray(self.episode_returns, dtype=np.float64)
        lengths = np.asarray(self.episode_lengths, dtype=np.float64)
        metrics.update(
            {
                "time/timesteps": float(self.num_timesteps),
                "time/updates": float(self.num_updates),
                "rollout/episodes": float(self.num_episodes),
                "rollout/return_mean": float(returns.mean()) if returns.size else math.nan,
                "rollout/return_std": float(returns.std()) if returns.size else math.nan,
                "rollout/length_mean": float(lengths.mean()) if lengths.size else math.nan,
                "time/fps": steps / max(end - start, 1e-9),
                "time/wall_s": self.wall_time,
                "time/rollout_s": rollout_done - start,
                "time/update_s": end - rollout_done,
            }
        )
        return metrics

    # ------------------------------------------------------------------ inference
    def _normalize_obs(self, obs: np.ndarray) -> np.ndarray:
        wrapper = find_wrapper(self.env, NormalizeObservation)
        if wrapper is None:
            return obs
        rms = wrapper.obs_rms
        return ((obs - rms.mean) / np.sqrt(rms.var + wrapper.epsilon)).astype(np.float32)

    def predict(self, obs: Any, deterministic: bool = True) -> np.ndarray:
        """Actions for raw (unnormalized) observations: numpy in, numpy out.

        A single observation gives a single action; a batch ``(n, *obs_shape)`` gives ``n``.
        """
        obs_np = np.asarray(obs)
        single_shape = tuple(self.observation_space.shape or ())
        single = obs_np.shape == single_shape
        if single:
            obs_np = obs_np[None]
        elif obs_np.shape[1:] != single_shape:
            raise ValueError(
                f"Invalid observation shape {obs_np.shape}; expected {single_shape} or (batch, *{single_shape})"
            )
        if isinstance(self.observation_space, gym.spaces.Box):
            obs_np = self._normalize_obs(obs_np.astype(np.float32))
        with torch.inference_mode():
            actions, _, _ = self.policy.act(
                torch.as_tensor(obs_np, device=self.device), self.generator, deterministic=deterministic
            )
        actions_np = actions.cpu().numpy()
        if self._clip_actions:
            actions_np = np.clip(actions_np, self.action_space.low, self.action_space.high)  # type: ignore[attr-defined]
        return actions_np[0] if single else actions_np

    def evaluate(self, n_episodes: int = 10, deterministic: bool = True, seed: int | None = None) -> np.ndarray:
        """Returns of ``n_episodes`` evaluation episodes on fresh, unnormalized copies of the env."""
        if self._env_spec is None:
            raise ValueError("evaluate() needs an agent built from an env id or env factory, not a VectorEnv")
        if n_episodes < 1:
            raise ValueError(f"Invalid n_episodes: {n_episodes}; expected >= 1")
        n_eval = min(n_episodes, 4)
        env = make_vec_env(self._env_spec, n_envs=n_eval, seed=None, env_kwargs=self.env_kwargs)
        targets = np.array([(n_episodes + i) // n_eval for i in range(n_eval)])
        counts = np.zeros(n_eval, dtype=int)
        returns: list[float] = []
        eval_seed = self.seed + 10_000 if seed is None else seed
        obs, _ = env.reset(seed=eval_seed)
        try:
            while (counts < targets).any():
                obs, _, _, _, infos = env.step(self.predict(obs, deterministic=deterministic))
                if "_episode" in infos:
                    for i in np.flatnonzero(infos["_episode"]):
                        if counts[i] < targets[i]:
                            returns.append(float(infos["episode"]["r"][i]))
                            counts[i] += 1
        finally:
            env.close()
        return np.asarray(returns)

    # ------------------------------------------------------------------ persistence
    def config_toml(self, total_timesteps: int | None = None) -> str:
        import tomli_w

        data: dict[str, Any] = {
            "algo": self.algo,
            "env": self.env_id or "",
            "n_envs": self.n_envs,
            "seed": self.seed,
            "device": str(self.device),
            "vectorization": self.vectorization,
        }
        if total_timesteps is not None:
            data["total_timesteps"] = total_timesteps
        data["hyperparameters"] = _drop_none(self.config.to_dict())
        return tomli_w.dumps(data)

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "algo": self.algo,
            "env_id": self.env_id,
            "n_envs": self.n_envs,
            "seed": self.seed,
            "vectorization": self.vectorization,
            "env_kwargs": self.env_kwargs,
            "config": self.config.to_dict(),
            "observation_space": space_signature(self.observation_space),
            "action_space": space_signature(self.action_space),
            "policy": self.policy.state_dict(),
            "optimizers": self._optimizer_states(),
            "normalization": _to_tensors(normalization_state(self.env)),
            "counters": {
                "num_timesteps": self.num_timesteps,
                "num_updates": self.num_updates,
                "num_episodes": self.num_episodes,
                "wall_time": self.wall_time,
            },
            "episodes": {"returns": list(self.episode_returns), "lengths": list(self.episode_lengths)},
            "rng": {"generator": self.generator.get_state(), "shuffle": self.shuffle_generator.get_state()},
        }

    def save(self, path: str | Path) -> None:
        """Write a checkpoint atomically (temporary file, fsync, rename)."""
        buffer = io.BytesIO()
        torch.save(self.state_dict(), buffer)
        atomic_write_bytes(path, buffer.getvalue())

    def load_state_dict(self, data: Mapping[str, Any]) -> None:
        for key, space in (("observation_space", self.observation_space), ("action_space", self.action_space)):
            if data[key] != space_signature(space):
                raise ValueError(
                    f"Checkpoint {key} {data[key]} does not match the environment's {space_signature(space)}"
                )
        self.policy.load_state_dict(data["policy"])
        self._load_optimizer_states(data["optimizers"])
        load_normalization_state(self.env, _to_numpy(data["normalization"]))
        counters = data["counters"]
        self.num_timesteps = int(counters["num_timesteps"])
        self.num_updates = int(counters["num_updates"])
        self.num_episodes = int(counters["num_episodes"])
        self.wall_time = float(counters["wall_time"])
        self.episode_returns.extend(data["episodes"]["returns"])
        self.episode_lengths.extend(data["episodes"]["lengths"])
        self.generator.set_state(data["rng"]["generator"])
        self.shuffle_generator.set_state(data["rng"]["shuffle"])

    @classmethod
    def load(
        cls: type[A],
        path: str | Path,
        env: str | Callable[[], gym.Env] | VectorEnv | None = None,
        device: str | torch.device | None = None,
        **overrides: Any,
    ) -> A:
        """Rebuild an agent from a checkpoint written by :meth:`save`.

        Args:
            path: The checkpoint file.
            env: Environment to attach; defaults to the checkpoint's env id.
            device: Defaults to ``"cpu"``.
            **overrides: Constructor arguments to change (``n_envs``, ``vectorization``).
        """
        data = read_checkpoint(path)
        if cls.algo and data["algo"] != cls.algo:
            raise ValueError(
                f"Checkpoint {path} holds a {data['algo']!r} agent; load it with {data['algo'].upper()}.load"
            )
        agent_cls: type[A] = cls
        if not cls.algo:
            from trpo_lab.agents import agent_class

            agent_cls = agent_class(data["algo"])  # type: ignore[assignment]
        env = env if env is not None else data["env_id"]
        if env is None:
            raise ValueError(f"Checkpoint {path} was trained on a custom env factory; pass env= to load it")
        kwargs: dict[str, Any] = {
            "n_envs": data["n_envs"],
            "seed": data["seed"],
            "vectorization": data.get("vectorization", "sync"),
            "env_kwargs": data.get("env_kwargs") or None,
            "device": device or "cpu",
        }
        kwargs.update(overrides)
        agent = agent_cls(env, **kwargs, **data["config"])
        agent.load_state_dict(data)
        return agent

    def close(self) -> None:
        self.env.close()


def _drop_none(data: dict[str, Any]) -> dict[str, Any]:
    """TOML has no null: leave out unset optional values."""
    return {k: (_drop_none(v) if isinstance(v, dict) else v) for k, v in data.items() if v is not None}


def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"Invalid device: {device!r}; expected 'cpu', 'cuda', 'cuda:N' or 'auto'") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Invalid device: {device!r}; CUDA is not available on this machine (use 'cpu')")
    return resolved

"""The on-policy loop every agent shares: collect -> update, predict, save/load, logging.

Agents differ only in :meth:`OnPolicyAgent._setup` (their optimizers) and
:meth:`OnPolicyAgent.update` (one update from a flat batch).  Collection, GAE,
normalization, logging, checkpointing and evaluation are written once, here, and so is
what keeps a long run safe (issue #9):

* **Non-finite environment output** is caught below the normalization wrappers
  (:class:`~trpo_lab.envs.NonFiniteGuard`): ``nan_policy = "raise"`` stops with
  :class:`NonFiniteEnvError` naming the env index and rollout step; ``"skip"`` drops the
  transition, cuts the advantage chain before it and counts it (``rollout/nonfinite_skipped``).
* **Non-finite updates** are rejected: the parameters and optimizer state are snapshotted
  before :meth:`OnPolicyAgent.update` and restored if anything came out NaN or inf
  (``train/rejected_updates``); :attr:`OnPolicyAgent.max_consecutive_rejections` rejections
  in a row stop the run with :class:`NonFiniteUpdateError`.
* **Interruptions**: SIGINT/SIGTERM during :meth:`OnPolicyAgent.learn` finish the current
  update, write ``checkpoint.pt`` and raise :class:`TrainingInterrupted`.  A checkpoint holds
  the vector env's state at the rollout boundary, so resuming from it reproduces the
  uninterrupted run's ``progress.csv`` exactly (sync envs on the CPU).
* **Untrusted files**: checkpoints load with ``torch.load(weights_only=True)`` and are
  checked field by field; anything else is refused with a ``ValueError``.

Data-parallel training (issue #8, ``dist=`` a :class:`~trpo_lab.distributed.DistributedContext`)
lives here too, at the depth each reduction belongs: every rank steps its own environments
with :func:`~trpo_lab.distributed.rank_seed`; rank 0's parameters and normalization
statistics are broadcast once; after each rollout the normalization statistics are merged
and the batch sizes shared; the agents reduce through the helpers below (gradients, means,
advantage statistics, lock-step minibatches); logged metrics are sample-weighted means over
ranks, timesteps count every rank's steps; parameters are checked for drift every
``check_every`` updates; only rank 0 writes the run directory, and checkpoints hold every
rank's environments and samplers so that all ranks resume exactly.  With ``dist=None`` every
helper is the identity and nothing is reduced.

Minibatches (PPO, the TRPO critic) are ``batch_size`` samples with a smaller last one: the
number of valid transitions per rollout changes from update to update (auto-reset slots and
skipped non-finite steps are dropped), so no ``batch_size`` divides every batch, and a
``batch_size`` larger than the rollout simply means one full-batch step.
"""

from __future__ import annotations

import io
import math
import pickle
import signal
import sys
import threading
import time
import warnings
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import VectorEnv
from gymnasium.wrappers.vector import NormalizeObservation, NormalizeReward
from torch import Tensor, nn

from trpo_lab.buffer import RolloutBatch, RolloutBuffer, minibatches
from trpo_lab.config import AgentConfig
from trpo_lab.distributed import DistributedContext, Reducer, rank_seed
from trpo_lab.envs import (
    EnvStateError,
    NonFiniteEnvError,
    NonFiniteError,
    NonFiniteGuard,
    _first_line,
    _to_numpy,
    _to_tensors,
    find_wrapper,
    load_normalization_state,
    load_vector_env_state,
    make_vec_env,
    normalization_state,
    vector_env_state,
)
from trpo_lab.logging import RunLogger, atomic_write_bytes, atomic_write_text
from trpo_lab.optim._flat import all_finite
from trpo_lab.policies import ActorCritic

__all__ = [
    "OnPolicyAgent",
    "NonFiniteError",
    "NonFiniteEnvError",
    "NonFiniteUpdateError",
    "TrainingInterrupted",
    "CHECKPOINT_FORMAT",
    "space_signature",
    "read_checkpoint",
]

CHECKPOINT_FORMAT = "trpo_lab.agent/1"
A = TypeVar("A", bound="OnPolicyAgent")


class NonFiniteUpdateError(NonFiniteError):
    """Several updates in a row produced NaN or inf parameters (each was rejected and undone)."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped :meth:`OnPolicyAgent.learn` after writing a checkpoint.

    A ``KeyboardInterrupt``, so code that treats Ctrl-C as "stop" keeps doing so.

    Attributes:
        signum: The signal received.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def space_signature(space: gym.Space) -> dict[str, Any]:
    """Plain-data description of a space, stored in checkpoints to detect mismatched envs."""
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n)}
    if isinstance(space, gym.spaces.MultiDiscrete):
        return {"type": "MultiDiscrete", "nvec": [int(n) for n in np.asarray(space.nvec).reshape(-1)]}
    if isinstance(space, gym.spaces.Box):
        return {"type": "Box", "shape": [int(s) for s in space.shape]}
    return {"type": type(space).__name__}


# Top-level checkpoint fields and their types, checked before anything is used.
_CHECKPOINT_FIELDS: dict[str, tuple[type, ...]] = {
    "algo": (str,),
    "env_id": (str, type(None)),
    "n_envs": (int,),
    "seed": (int,),
    "config": (dict,),
    "observation_space": (dict,),
    "action_space": (dict,),
    "policy": (dict,),
    "optimizers": (dict,),
    "normalization": (dict,),
    "counters": (dict,),
    "episodes": (dict,),
    "rng": (dict,),
}


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``: tensors and plain data only).

    A file that holds anything else, such as a pickle whose ``__reduce__`` would run code,
    is refused before any of it is executed.

    Raises:
        ValueError: missing, truncated, corrupt or foreign file, a file with Python objects
            other than tensors and plain data, or one whose fields are missing or mistyped.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"Cannot load checkpoint {path}: the file is empty")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says enough
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = _unpickling_detail(str(exc))
        if "GLOBAL" in detail:
            raise ValueError(
                f"Cannot load checkpoint {path}: refused, it refers to Python code or classes ({detail}); "
                "checkpoints may hold only tensors and plain data, and nothing in the file was run"
            ) from None
        raise ValueError(
            f"Cannot load checkpoint {path}: not a weights-only PyTorch checkpoint ({detail}); "
            "nothing in the file was run"
        ) from None
    except Exception as exc:  # torch raises many types for truncated or corrupt files
        raise ValueError(
            f"Cannot load checkpoint {path}: the file is truncated or corrupt ({_first_line(exc).split('. ')[0]})"
        ) from None
    if not isinstance(data, dict) or not str(data.get("format", "")).startswith("trpo_lab.agent/"):
        raise ValueError(f"Cannot load checkpoint {path}: not a trpo_lab checkpoint (format {CHECKPOINT_FORMAT})")
    if data["format"] != CHECKPOINT_FORMAT:
        raise ValueError(
            f"Cannot load checkpoint {path}: format {data['format']!r}; "
            f"this version of trpo_lab reads {CHECKPOINT_FORMAT!r}"
        )
    for key, types in _CHECKPOINT_FIELDS.items():
        if key not in data:
            raise ValueError(f"Cannot load checkpoint {path}: field {key!r} is missing (damaged file?)")
        if isinstance(data[key], bool) or not isinstance(data[key], types):
            expected = " or ".join("None" if t is type(None) else t.__name__ for t in types)
            raise ValueError(
                f"Cannot load checkpoint {path}: field {key!r} is a {type(data[key]).__name__}; expected {expected}"
            )
    return data


def _unpickling_detail(message: str) -> str:
    """The informative line of torch's weights-only refusal (which GLOBAL or opcode it stopped at)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line:
            return line
    for line in lines:
        if line.startswith("Unsupported"):
            return line
    return lines[-1] if lines else "unpickling refused"


class OnPolicyAgent(ABC):
    """Base class of TRPO, NPG, ACKTR and PPO.

    Args:
        env: A Gymnasium id, a callable returning a ``gymnasium.Env``, or a ready
            ``gymnasium.vector.VectorEnv`` in ``NEXT_STEP`` autoreset mode (which gets a
            :class:`~trpo_lab.envs.NonFiniteGuard` on top unless it has one: build it with
            ``make_vec_env`` to have the guard below its normalization wrappers).
        n_envs: Number of parallel environments (ignored when ``env`` is a VectorEnv).
        seed: Seeds the environments, the network initialisation and all sampling.
        device: Torch device for the networks, the buffer and the update.
        vectorization: ``"sync"``, ``"async"`` or ``"vector_entry_point"`` (see ``make_vec_env``).
        env_kwargs: Keyword arguments for ``gym.make``.
        dist: Train data-parallel as one rank of this process group (see
            :func:`~trpo_lab.distributed.init_distributed`); every rank builds its agent with
            the same arguments, and its environments and samplers use
            ``rank_seed(seed, rank)``. ``None`` (default): a single process.
        **hyperparameters: Fields of the agent's config dataclass (SB3 names).
    """

    algo: ClassVar[str] = ""
    config_class: ClassVar[type[AgentConfig]] = AgentConfig
    max_consecutive_rejections: ClassVar[int] = 10
    """Rejected (non-finite) updates in a row after which :meth:`learn` stops."""

    def __init__(
        self,
        env: str | Callable[[], gym.Env] | VectorEnv,
        n_envs: int = 8,
        seed: int = 0,
        device: str | torch.device = "cpu",
        vectorization: str = "sync",
        env_kwargs: dict[str, Any] | None = None,
        dist: DistributedContext | None = None,
        **hyperparameters: Any,
    ) -> None:
        self.config = self.config_class.from_dict(hyperparameters)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Invalid seed: {seed!r}; expected an integer")
        if dist is not None and not isinstance(dist, DistributedContext):
            raise ValueError(f"Invalid dist: {dist!r}; expected a DistributedContext (trpo_lab.distributed.init_distributed)")
        self.dist = dist
        self.reducer = Reducer(dist)
        """Every cross-process reduction of an update (the identity in one process)."""
        self.local_seed = seed if dist is None else rank_seed(seed, dist.rank)
        """Seed of this process's environments and samplers (``seed`` itself outside data-parallel runs)."""
        if env_kwargs is not None and not isinstance(env_kwargs, Mapping):
            raise ValueError(f"Invalid env_kwargs: {env_kwargs!r}; expected a dict of keyword arguments for gym.make")
        self.seed = seed
        self.device = _resolve_device(device)
        self.vectorization = vectorization
        self.env_kwargs = dict(env_kwargs or {})
        if isinstance(env, VectorEnv):
            self.env_id: str | None = env.spec.id if env.spec is not None else None
            self.env = _guarded(env, self.config.nan_policy)
            self.env.reset(seed=self.local_seed)
        else:
            self.env_id = env if isinstance(env, str) else None
            self.env = make_vec_env(
                env,
                n_envs=n_envs,
                seed=self.local_seed,
                vectorization=vectorization,  # type: ignore[arg-type]
                normalize_obs=self.config.normalize_obs,
                normalize_reward=self.config.normalize_reward,
                gamma=self.config.gamma,
                env_kwargs=self.env_kwargs,
                nan_policy=self.config.nan_policy,  # type: ignore[arg-type]
            )
        try:
            self._build(env)
        except BaseException:
            if not isinstance(env, VectorEnv):  # ours to close (async workers would outlive us)
                self.env.close()
            raise

    def _build(self, env: Any) -> None:
        """Everything of ``__init__`` after the environment exists."""
        seed, local_seed = self.seed, self.local_seed
        self._env_spec = env if not isinstance(env, VectorEnv) else None
        self.n_envs = self.env.num_envs
        self.observation_space = self.env.single_observation_space
        self.action_space = self.env.single_action_space
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.policy = ActorCritic(self.observation_space, self.action_space, **self.config.policy_kwargs)
        self.policy.to(self.device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(local_seed)
        self.shuffle_generator = torch.Generator().manual_seed(local_seed + 1)
        action_shape = tuple(self.action_space.shape or ())
        action_dtype = torch.float32 if isinstance(self.action_space, gym.spaces.Box) else torch.long
        obs_shape = (
            tuple(self.observation_space.shape)
            if isinstance(self.observation_space, gym.spaces.Box)
            else ()
        )
        try:
            self.buffer = RolloutBuffer(
                self.config.n_steps, self.n_envs, obs_shape, action_shape, action_dtype, self.device,
                obs_dtype=torch.float32 if isinstance(self.observation_space, gym.spaces.Box) else torch.long,
            )
        except RuntimeError:  # out of memory
            raise ValueError(
                f"Invalid n_steps: {self.config.n_steps}; a rollout buffer of n_steps x n_envs = "
                f"{self.config.n_steps} x {self.n_envs} does not fit in memory; lower n_steps or n_envs"
            ) from None
        self._clip_actions = isinstance(self.action_space, gym.spaces.Box)
        self.num_timesteps = 0
        self.num_updates = 0
        self.num_episodes = 0
        self.num_nonfinite_skipped = 0
        self.num_rejected_updates = 0
        self._consecutive_rejections = 0
        self.wall_time = 0.0
        self.episode_returns: deque[float] = deque(maxlen=100)
        self.episode_lengths: deque[float] = deque(maxlen=100)
        self._last_obs: np.ndarray | None = None
        self._autoreset = np.zeros(self.n_envs, dtype=bool)
        self._reset_seed = local_seed  # seed of the first env.reset of a rollout (see load_state_dict)
        self._rank_sizes = [0]  # valid transitions of the current batch on every rank
        self._normalization_bases: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
        self._bytes_logged = 0
        self._setup()
        if self.dist is not None:
            self._join_process_group()

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

    # ------------------------------------------------------------------ data-parallel reductions
    # What the agents' updates call; with ``dist=None`` each is the identity (or the local
    # computation), so single-process updates run exactly the code they always ran.
    def _share_batch_sizes(self, local_size: int) -> None:
        """Learn every rank's number of valid transitions in this update's batch (one collective).

        Called by the loop before :meth:`update`; call it yourself before feeding ``update`` a
        batch of your own on every rank.

        Raises:
            ValueError: a rank has no valid transition (``n_steps * n_envs`` too small).
        """
        self._rank_sizes = self.reducer.share_batch_sizes(local_size)
        empty = [rank for rank, size in enumerate(self._rank_sizes) if size == 0]
        if empty:
            raise ValueError(
                f"Invalid n_steps: {self.config.n_steps}; rank(s) {empty} collected no valid transition "
                f"in update {self.num_updates + 1}; raise n_steps or n_envs"
            )

    def _global_mean(self, local_mean: Tensor, local_count: float | None = None, total_count: float | None = None) -> Tensor:
        """The mean over all ranks' samples from this rank's mean over ``local_count`` samples.

        The counts default to the update batch's (:meth:`_share_batch_sizes`).
        """
        return self.reducer.mean(local_mean, local_count, total_count)

    def _all_reduce_grads(self, params: list[nn.Parameter], local_count: float | None = None,
                          total_count: float | None = None, with_means: Tensor | None = None) -> Tensor | None:
        """Turn each ``p.grad`` of a local mean loss into the gradient of the mean over all ranks
        (one bucket, which also carries ``with_means`` and returns their global means).
        One process: nothing to do, ``with_means`` is returned as it is."""
        return self.reducer.grads(params, local_count, total_count, with_means)

    def _normalize_advantages(self, advantages: Tensor) -> Tensor:
        """``(Â − mean) / (std + 1e-8)``, with the mean and (unbiased) std over all ranks' samples.

        Left unchanged when there is at most one sample in all.
        """
        return self.reducer.normalize_advantages(advantages)

    def _minibatch_plan(self, local_size: int, batch_size: int) -> list[tuple[int, int, int]]:
        """``(start, stop, global_size)`` of each minibatch of a shuffled local batch.

        One process: consecutive slices of ``batch_size`` (the last one smaller). Data-parallel:
        :func:`~trpo_lab.distributed.minibatch_plan`, the same number of minibatches on every
        rank, whatever its sample count, each about ``batch_size`` samples over all ranks.
        """
        return self.reducer.minibatch_plan(local_size, batch_size)

    def _shuffled_minibatches(self, batch: RolloutBatch, batch_size: int) -> Iterator[tuple[RolloutBatch, int]]:
        """Shuffled minibatches of ``batch`` (:func:`~trpo_lab.buffer.minibatches` in one process,
        :meth:`_minibatch_plan` data-parallel) and each one's size over all ranks."""
        if self.dist is None:
            for minibatch in minibatches(batch, batch_size, self.shuffle_generator):
                yield minibatch, minibatch.size
            return
        perm = torch.randperm(batch.size, generator=self.shuffle_generator, device="cpu").to(batch.observations.device)
        for start, stop, total_count in self._minibatch_plan(batch.size, batch_size):
            yield batch.index(perm[start:stop]), total_count

    # ------------------------------------------------------------------ data-parallel bookkeeping
    def _running_statistics(self) -> dict[str, Any]:
        """The normalization wrappers' ``RunningMeanStd`` objects, by checkpoint name."""
        stats: dict[str, Any] = {}
        obs_norm, rew_norm = find_wrapper(self.env, NormalizeObservation), find_wrapper(self.env, NormalizeReward)
        if obs_norm is not None:
            stats["obs_rms"] = obs_norm.obs_rms
        if rew_norm is not None:
            stats["return_rms"] = rew_norm.return_rms
        return stats

    def _mark_normalization_synced(self) -> None:
        """Record the (identical on every rank) statistics as the base of the next merge."""
        self._normalization_bases = {
            name: (np.array(rms.mean, np.float64), np.array(rms.var, np.float64), float(rms.count))
            for name, rms in self._running_statistics().items()
        }

    def _join_process_group(self) -> None:
        """Start every rank from rank 0's parameters and normalization statistics."""
        assert self.dist is not None
        if self.device.type != self.dist.device.type:
            raise ValueError(
                f"Invalid device: {self.device}; this data-parallel process group reduces "
                f"{self.dist.device.type} tensors (gloo: cpu, nccl: cuda)"
            )
        self.dist.broadcast_module_(self.policy)
        stats = {name: (np.array(rms.mean), np.array(rms.var), float(rms.count))
                 for name, rms in self._running_statistics().items()}
        for name, (mean, var, count) in self.dist.broadcast_object(stats).items():
            rms = self._running_statistics()[name]
            rms.mean, rms.var, rms.count = mean.astype(rms.mean.dtype), var.astype(rms.var.dtype), count
        self._mark_normalization_synced()
        self._bytes_logged = self.dist.bytes_reduced

    def _merge_normalization(self) -> None:
        """Merge the observation and return statistics of all ranks' rollouts (exact, see
        :meth:`~trpo_lab.distributed.DistributedContext.merge_running_mean_std_`)."""
        assert self.dist is not None
        for name, rms in self._running_statistics().items():
            self._normalization_bases[name] = self.dist.merge_running_mean_std_(rms, self._normalization_bases.get(name))

    def _reduce_logged(
        self, metrics: dict[str, float], new_episodes: int, new_skipped: int
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Sample-weighted means over ranks of the update's metrics, and the rollout statistics
        over every rank's recent episodes, in one bucket. Adds the counts of new episodes and
        skipped transitions of all ranks to this agent's counters."""
        assert self.dist is not None
        keys = sorted(metrics)
        total = sum(self._rank_sizes)
        weight = self._rank_sizes[self.dist.rank] / total
        returns = np.asarray(self.episode_returns, dtype=np.float64)
        lengths = np.asarray(self.episode_lengths, dtype=np.float64)
        local = [metrics[k] * weight for k in keys] + [
            float(returns.sum()), float(np.square(returns).sum()), float(returns.size), float(lengths.sum()),
            float(new_episodes), float(new_skipped),
        ]
        summed = self.dist.all_reduce_sum(torch.tensor(local, dtype=torch.float64, device=self.dist.device)).cpu().tolist()
        reduced = dict(zip(keys, summed[: len(keys)]))
        ret_sum, ret_square, count, len_sum, episodes, skipped = summed[len(keys):]
        self.num_episodes += int(episodes) - new_episodes
        self.num_nonfinite_skipped += int(skipped) - new_skipped
        mean = ret_sum / count if count else math.nan
        rollout = {
            "rollout/return_mean": mean,
            "rollout/return_std": math.sqrt(max(ret_square / count - mean * mean, 0.0)) if count else math.nan,
            "rollout/length_mean": len_sum / count if count else math.nan,
        }
        return reduced, rollout

    def _agree_to_stop(self, stop: _StopRequest, agreed: _StopRequest, halt: bool) -> bool:
        """Whether any rank was signalled (recorded in ``agreed``) or its callback asked to stop."""
        assert self.dist is not None
        flags = torch.tensor([float(stop.signum or 0), float(halt)], dtype=torch.float64, device=self.dist.device)
        signum, halt_any = self.dist.all_reduce_max(flags).cpu().tolist()
        if signum:
            agreed.signum = int(signum)
        return bool(halt_any)

    def _local_state(self) -> dict[str, Any]:
        """What only this process knows: its environments at the rollout boundary, its
        samplers, its recent episodes and the per-env reward-normalization accumulators."""
        try:
            env_state, env_state_error = vector_env_state(self.env), None
        except EnvStateError as exc:
            env_state, env_state_error = None, str(exc)
        return {
            "env_state": env_state,
            "env_state_error": env_state_error,
            "last_obs": None if self._last_obs is None else torch.from_numpy(np.array(self._last_obs)),
            "autoreset": torch.from_numpy(np.array(self._autoreset, dtype=bool)),
            "reset_seed": self._reset_seed,
            "rng": {"generator": self.generator.get_state(), "shuffle": self.shuffle_generator.get_state()},
            "episodes": {"returns": list(self.episode_returns), "lengths": list(self.episode_lengths)},
            "normalization": _to_tensors(normalization_state(self.env)),
        }

    def _load_local_state(self, data: Mapping[str, Any]) -> None:
        """Restore this rank's part of a data-parallel checkpoint (``data["ranks"][rank]``), or
        start this rank's environments afresh when the checkpoint has none for it."""
        assert self.dist is not None
        ranks = data.get("ranks")
        rank = self.dist.rank
        if isinstance(ranks, list) and len(ranks) == self.dist.world_size and isinstance(ranks[rank], dict):
            own = ranks[rank]
            try:
                self.generator.set_state(own["rng"]["generator"])
                self.shuffle_generator.set_state(own["rng"]["shuffle"])
                self.episode_returns.clear()
                self.episode_lengths.clear()
                self.episode_returns.extend(float(r) for r in own["episodes"]["returns"])
                self.episode_lengths.extend(float(n) for n in own["episodes"]["lengths"])
                load_normalization_state(self.env, _to_numpy(own["normalization"]))
            except (KeyError, TypeError, RuntimeError, ValueError) as exc:
                raise ValueError(f"Checkpoint rank {rank} state does not fit this {self.algo or 'agent'}: "
                                 f"{_first_line(exc)}") from None
            self._load_env_state({**own, "n_envs": data["n_envs"], "counters": {"reset_seed": own["reset_seed"]}})
        elif rank != 0:  # a checkpoint of fewer ranks: this rank starts new environments and samplers
            self.generator.manual_seed(self.local_seed + self.num_updates)
            self.shuffle_generator.manual_seed(self.local_seed + 1 + self.num_updates)
            self.episode_returns.clear()
            self.episode_lengths.clear()
            self._last_obs, self._reset_seed = None, self.local_seed + self.num_updates
            self._autoreset = np.zeros(self.n_envs, dtype=bool)
        self._mark_normalization_synced()

    def _write_checkpoints(self, *paths: Path) -> None:
        """Write the checkpoint to ``paths``; data-parallel: every rank's local state, written by rank 0."""
        if self.dist is None:
            for path in paths:
                self.save(path)
            return
        local_states = self.dist.gather_object(self._local_state())
        if self.dist.is_main:
            data = self.state_dict()
            data["ranks"] = local_states
            buffer = io.BytesIO()
            torch.save(data, buffer)
            for path in paths:
                atomic_write_bytes(path, buffer.getvalue())

    # ------------------------------------------------------------------ rollout
    def collect_rollout(self) -> int:
        """Fill the buffer with ``n_steps`` vectorized steps and compute GAE; returns env steps taken.

        The hot loop: one fused actor+critic forward per step (:meth:`ActorCritic.fused`),
        run in numpy on the CPU (:class:`~trpo_lab.policies.NumpyRolloutPolicy`; torch
        elsewhere), observations written once into the buffer and read back as a zero-copy
        view, everything stored through numpy views, and no per-step Python objects beyond
        Gymnasium's.

        With ``nan_policy = "skip"``, a step at which sub-environment ``i`` returned NaN or
        inf (the :class:`~trpo_lab.envs.NonFiniteGuard` has already reset it and zeroed the
        reward) is stored as an invalid slot, like an auto-reset slot, and the slot before it
        is marked truncated: its advantage bootstraps from ``V`` of the last finite
        observation instead of running through the dropped step.  The next slot starts the
        new episode from the reset observation.

        Raises:
            NonFiniteEnvError: ``nan_policy = "raise"`` and an environment returned NaN or inf,
                or more than half of this rollout's transitions had to be dropped.
        """
        env, buffer = self.env, self.buffer
        if self._last_obs is None:
            self._last_obs, _ = env.reset(seed=self._reset_seed)
            self._autoreset[:] = False
        obs = self._last_obs
        buffer.reset()
        numpy_acting = None
        if buffer.device.type == "cpu":
            numpy_acting = self.policy.numpy_policy(self.generator, self.n_envs, self.config.n_steps)
        acting = self.policy.fused() if numpy_acting is None else None
        steps = skipped = step = 0
        low = high = None
        if self._clip_actions:
            low, high = self.action_space.low, self.action_space.high  # type: ignore[attr-defined]
        autoreset = self._autoreset
        try:
            with torch.inference_mode():
                for step in range(self.config.n_steps):
                    if numpy_acting is not None:  # CPU: numpy in, numpy out
                        actions_np, log_probs, values = numpy_acting.act(buffer.put_observation_array(obs))
                        obs_t = actions = None
                    else:
                        assert acting is not None
                        obs_t = buffer.put_observation(obs)
                        actions, log_probs, values = acting.act(obs_t, self.generator)
                        actions_np = actions.numpy() if actions.device.type == "cpu" else actions.cpu().numpy()
                    env_actions = np.clip(actions_np, low, high) if low is not None else actions_np
                    next_obs, rewards, terminated, truncated, infos = env.step(env_actions)
                    valid = ~autoreset
                    if "_nonfinite" in infos:
                        skipped += self._drop_non_finite(step, infos["_nonfinite"], valid)
                    buffer.add(
                        obs_t, actions_np if actions is None else actions, log_probs, values,
                        rewards, terminated, truncated, valid,
                    )
                    steps += int(valid.sum())
                    autoreset = terminated | truncated
                    if "_episode" in infos:
                        self._record_episodes(infos)
                    obs = next_obs
                if numpy_acting is not None:
                    last_values = torch.from_numpy(numpy_acting.values(obs))
                else:
                    last_values = self.policy.value(self.policy.preprocess(torch.as_tensor(obs, device=self.device)))
        except NonFiniteEnvError as exc:
            raise NonFiniteEnvError(
                f"{exc} at rollout step {step} (update {self.num_updates + 1}, timestep {self.num_timesteps + steps}); "
                "check the environment, wrap it to sanitise its output, or set nan_policy='skip' to drop such steps",
                exc.env_index,
            ) from None
        self._autoreset = autoreset
        self._last_obs = obs
        if 2 * skipped > self.config.n_steps * self.n_envs:
            raise NonFiniteEnvError(
                f"{skipped} of the {self.config.n_steps * self.n_envs} transitions of update {self.num_updates + 1} "
                "were NaN or inf and had to be dropped (nan_policy='skip'); the environment is broken"
            )
        buffer.finish(last_values.clone(), self.config.gamma, self.config.gae_lambda)
        return steps

    def _drop_non_finite(self, step: int, bad: np.ndarray, valid: np.ndarray) -> int:
        """Invalidate the slots of sub-environments whose output was non-finite (see :meth:`collect_rollout`)."""
        valid &= ~bad
        if step > 0:
            self.buffer.truncated[step - 1, torch.as_tensor(bad, device=self.buffer.device)] = True
        count = int(bad.sum())
        self.num_nonfinite_skipped += count
        return count

    def _record_episodes(self, infos: dict[str, Any]) -> None:
        done_mask = infos["_episode"]
        for ret, length in zip(infos["episode"]["r"][done_mask], infos["episode"]["l"][done_mask]):
            self.episode_returns.append(float(ret))
            self.episode_lengths.append(float(length))
            self.num_episodes += 1

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

        Continuing a loaded agent into its old ``run_dir`` resumes the run: ``progress.csv``
        is cut back to the checkpoint's update and appended to.

        SIGINT and SIGTERM (in the main thread) let the current update finish, then write
        ``checkpoint.pt`` and raise :class:`TrainingInterrupted`; a second signal stops at
        once.  The previous handlers are restored when ``learn`` returns.

        Args:
            total_timesteps: Total environment steps (valid transitions) to train for.
            run_dir: If given, write ``config.toml``, ``progress.csv``, TensorBoard events,
                ``checkpoint.pt`` (every ``checkpoint_every`` updates, atomically) and ``final.pt``.
                Data-parallel: give every rank the same ``run_dir`` (or ``None`` on all); rank 0
                writes it, checkpoints included, with every rank's environment state.
            progress_bar: Show a live console progress bar (rank 0 only).
            callback: Called after each update with ``(agent, metrics)``; returning ``False`` stops
                (data-parallel: on any rank, and every rank stops after the same update).
            tensorboard: Write TensorBoard events into ``run_dir``.

        Raises:
            NonFiniteEnvError: an environment returned NaN or inf (``nan_policy = "raise"``).
            NonFiniteUpdateError: :attr:`max_consecutive_rejections` updates in a row came out
                non-finite; the last good parameters are checkpointed first.
            TrainingInterrupted: SIGINT or SIGTERM; the checkpoint has been written.
            ValueError: invalid ``total_timesteps`` or a ``run_dir`` that cannot be written.
        """
        if isinstance(total_timesteps, bool) or not isinstance(total_timesteps, int) or total_timesteps < 1:
            raise ValueError(f"Invalid total_timesteps: {total_timesteps!r}; expected an integer >= 1")
        run_path = Path(run_dir) if run_dir is not None else None
        main = self.dist is None or self.dist.is_main  # data-parallel: only rank 0 writes
        log_path = run_path if main else None
        resume = log_path is not None and self.num_updates > 0 and (log_path / "progress.csv").exists()
        try:
            if log_path is not None:
                log_path.mkdir(parents=True, exist_ok=True)
                atomic_write_text(log_path / "config.toml", self.config_toml(total_timesteps))
            logger = RunLogger(
                log_path,
                total_timesteps,
                progress_bar=progress_bar and main,
                tensorboard=tensorboard,
                resume=resume,
                start_timesteps=self.num_timesteps,
                start_updates=self.num_updates,
            )
        except OSError as exc:
            raise ValueError(f"Invalid run_dir: {run_dir}; cannot write there ({exc.strerror or exc})") from None
        stop = _StopRequest()
        agreed = stop if self.dist is None else _StopRequest()  # data-parallel: every rank stops together
        with _stop_on_signals(stop):
            try:
                while self.num_timesteps < total_timesteps and agreed.signum is None:
                    metrics = self._train_one_update()
                    logger.log(metrics)
                    if run_path is not None and self.config.checkpoint_every and (
                        self.num_updates % self.config.checkpoint_every == 0
                    ):
                        self._checkpoint(run_path, logger)
                    if self._consecutive_rejections >= self.max_consecutive_rejections:
                        if run_path is not None:
                            self._checkpoint(run_path, logger)
                        raise NonFiniteUpdateError(
                            f"{self._consecutive_rejections} updates in a row (the last at update {self.num_updates}) "
                            "produced NaN or inf parameters or optimizer state and were undone; the policy is still "
                            f"the one from update {self.num_updates - self._consecutive_rejections}. Lower the step "
                            "size (learning_rate, target_kl, kl_clip), scale or normalise the rewards "
                            "(normalize_reward = true), or check the environment"
                        )
                    halt = callback is not None and callback(self, metrics) is False
                    if self.dist is not None:
                        halt = self._agree_to_stop(stop, agreed, halt)
                    if halt:
                        break
                interrupted = agreed.signum is not None and self.num_timesteps < total_timesteps
                if interrupted and run_path is not None:
                    self._checkpoint(run_path, logger)
            finally:
                logger.close()
        if interrupted and agreed.signum is not None:  # a signal during the last update lets the run finish
            name = signal.Signals(agreed.signum).name
            where = f"; checkpoint written to {run_path / 'checkpoint.pt'}" if run_path is not None else ""
            raise TrainingInterrupted(
                f"{name} received: stopped after update {self.num_updates} (timestep {self.num_timesteps}){where}",
                agreed.signum,
            )
        if run_path is not None:
            self._write_checkpoints(run_path / "checkpoint.pt", run_path / "final.pt")
        return self

    def _checkpoint(self, run_path: Path, logger: RunLogger) -> None:
        logger.sync()  # progress.csv on disk at least up to the checkpoint's update
        self._write_checkpoints(run_path / "checkpoint.pt")

    def _train_one_update(self) -> dict[str, float]:
        start = time.perf_counter()
        episodes_before, skipped_before = self.num_episodes, self.num_nonfinite_skipped
        steps = self.collect_rollout()
        rollout_done = time.perf_counter()
        if self.dist is not None:
            self._merge_normalization()
        batch = self.buffer.batch()
        self._share_batch_sizes(batch.size)
        snapshot = self._snapshot()
        try:
            metrics = self.update(batch)
            rejected = not self._finite_after_update()
        except torch.linalg.LinAlgError as exc:  # a factorisation of NaN or singular curvature
            metrics, rejected = {"train/linalg_error": 1.0}, True
            warnings.warn(f"Update {self.num_updates + 1} failed ({_first_line(exc)}); it is undone", stacklevel=2)
        if rejected:
            self._restore(snapshot)
            self.num_rejected_updates += 1
            self._consecutive_rejections += 1
        else:
            self._consecutive_rejections = 0
        if self.dist is None:
            returns = np.asarray(self.episode_returns, dtype=np.float64)
            lengths = np.asarray(self.episode_lengths, dtype=np.float64)
            rollout = {
                "rollout/return_mean": float(returns.mean()) if returns.size else math.nan,
                "rollout/return_std": float(returns.std()) if returns.size else math.nan,
                "rollout/length_mean": float(lengths.mean()) if lengths.size else math.nan,
            }
        else:  # every rank's steps, episodes and metrics
            steps = sum(self._rank_sizes)
            bytes_this_update = self.dist.bytes_reduced - self._bytes_logged
            self._bytes_logged = self.dist.bytes_reduced
            metrics, rollout = self._reduce_logged(
                metrics, self.num_episodes - episodes_before, self.num_nonfinite_skipped - skipped_before
            )
            metrics["dist/bytes_reduced"] = float(bytes_this_update)
            metrics["dist/world_size"] = float(self.dist.world_size)
        end = time.perf_counter()
        self.num_timesteps += steps
        self.num_updates += 1
        self.wall_time += end - start
        if self.dist is not None and self.num_updates % self.dist.check_every == 0:
            self.dist.check_in_sync(self.policy)
        metrics.update(
            {
                "time/timesteps": float(self.num_timesteps),
                "time/updates": float(self.num_updates),
                "rollout/episodes": float(self.num_episodes),
                **rollout,
                "rollout/nonfinite_skipped": float(self.num_nonfinite_skipped),
                "train/update_rejected": float(rejected),
                "train/rejected_updates": float(self.num_rejected_updates),
                "time/fps": steps / max(end - start, 1e-9),
                "time/wall_s": self.wall_time,
                "time/rollout_s": rollout_done - start,
                "time/update_s": end - rollout_done,
            }
        )
        return metrics

    # ------------------------------------------------------------------ update guard
    def _snapshot(self) -> tuple[list[torch.Tensor], Any]:
        """Copies of the parameters and the optimizer state, taken before :meth:`update`."""
        with torch.no_grad():
            params = [p.detach().clone() for p in self.policy.parameters()]
        return params, _clone_tree(self._optimizer_states())

    def _restore(self, snapshot: tuple[list[torch.Tensor], Any]) -> None:
        params, optimizer_states = snapshot
        with torch.no_grad():
            for param, saved in zip(self.policy.parameters(), params):
                param.copy_(saved)
        self._load_optimizer_states(optimizer_states)

    def _finite_after_update(self) -> bool:
        """Whether every parameter and floating optimizer-state tensor is finite (one host sync)."""
        tensors = [p.detach() for p in self.policy.parameters()]
        device = tensors[0].device
        tensors += [
            t for t in _tensor_leaves(self._optimizer_states()) if t.is_floating_point() and t.device == device
        ]  # (Adam keeps its step counts on the CPU even for CUDA parameters)
        return all_finite(tensors)

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
        """Everything needed to continue exactly: networks, optimizers, counters, RNGs, and the
        environments at the rollout boundary (``env_state``; ``None`` with ``env_state_error``
        saying why for envs :func:`~trpo_lab.envs.vector_env_state` cannot capture)."""
        local = self._local_state()
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
            "normalization": local["normalization"],
            "counters": {
                "num_timesteps": self.num_timesteps,
                "num_updates": self.num_updates,
                "num_episodes": self.num_episodes,
                "num_nonfinite_skipped": self.num_nonfinite_skipped,
                "num_rejected_updates": self.num_rejected_updates,
                "consecutive_rejections": self._consecutive_rejections,
                "reset_seed": local["reset_seed"],
                "wall_time": self.wall_time,
            },
            "episodes": local["episodes"],
            "rng": local["rng"],
            "env_state": local["env_state"],
            "env_state_error": local["env_state_error"],
            "last_obs": local["last_obs"],
            "autoreset": local["autoreset"],
        }

    def save(self, path: str | Path) -> None:
        """Write a checkpoint atomically (temporary file, fsync, rename)."""
        buffer = io.BytesIO()
        torch.save(self.state_dict(), buffer)
        atomic_write_bytes(path, buffer.getvalue())

    def load_state_dict(self, data: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (from :func:`read_checkpoint`).

        The environments continue from the saved state when the checkpoint has one for the
        same number of environments; otherwise (an env :func:`~trpo_lab.envs.vector_env_state`
        cannot capture, such as async or Box2D envs) they restart from a fresh reset with
        seed ``seed + num_updates``, with a warning: training continues, but not bit-for-bit
        as the uninterrupted run would have.

        Raises:
            ValueError: the checkpoint does not fit this agent: other spaces or network shapes
                (checked before anything is changed) or a damaged field.
        """
        for key, space in (("observation_space", self.observation_space), ("action_space", self.action_space)):
            if data[key] != space_signature(space):
                raise ValueError(
                    f"Checkpoint {key} {data[key]} does not match the environment's {space_signature(space)}"
                )
        own = self.policy.state_dict()
        saved = data["policy"]
        if set(saved) != set(own):
            extra, missing = sorted(set(saved) - set(own)), sorted(set(own) - set(saved))
            raise ValueError(
                f"Checkpoint policy does not fit this network: extra parameters {extra}, missing {missing} "
                "(another policy_kwargs.net_arch?)"
            )
        for name, tensor in own.items():
            if not isinstance(saved[name], torch.Tensor) or saved[name].shape != tensor.shape:
                shape = tuple(saved[name].shape) if isinstance(saved[name], torch.Tensor) else type(saved[name]).__name__
                raise ValueError(
                    f"Checkpoint policy parameter {name!r} has shape {shape}; this network needs {tuple(tensor.shape)}"
                )
        try:
            self.policy.load_state_dict(saved)
            self._load_optimizer_states(data["optimizers"])
            load_normalization_state(self.env, _to_numpy(data["normalization"]))
            counters = data["counters"]
            self.num_timesteps = int(counters["num_timesteps"])
            self.num_updates = int(counters["num_updates"])
            self.num_episodes = int(counters["num_episodes"])
            self.num_nonfinite_skipped = int(counters.get("num_nonfinite_skipped", 0))
            self.num_rejected_updates = int(counters.get("num_rejected_updates", 0))
            self._consecutive_rejections = int(counters.get("consecutive_rejections", 0))
            self.wall_time = float(counters["wall_time"])
            self.episode_returns.clear()
            self.episode_lengths.clear()
            self.episode_returns.extend(float(r) for r in data["episodes"]["returns"])
            self.episode_lengths.extend(float(n) for n in data["episodes"]["lengths"])
            self.generator.set_state(data["rng"]["generator"])
            self.shuffle_generator.set_state(data["rng"]["shuffle"])
        except (KeyError, TypeError, RuntimeError, ValueError) as exc:
            raise ValueError(f"Checkpoint does not fit this {self.algo or 'agent'}: {_first_line(exc)}") from None
        self._load_env_state(data)
        if self.dist is not None:
            self._load_local_state(data)

    def _load_env_state(self, data: Mapping[str, Any]) -> None:
        if data["n_envs"] != self.n_envs:  # e.g. evaluation with other env counts: not a continuation
            self._last_obs, self._reset_seed = None, self.local_seed + self.num_updates
            return
        reason = data.get("env_state_error") or "the checkpoint holds no environment state"
        if data.get("env_state") is not None:
            try:
                load_vector_env_state(self.env, data["env_state"])
            except (EnvStateError, KeyError, TypeError) as exc:
                reason = str(exc)
            else:
                last_obs = data.get("last_obs")
                self._last_obs = None if last_obs is None else last_obs.numpy().copy()
                self._autoreset = data["autoreset"].numpy().astype(bool)
                self._reset_seed = int(data["counters"].get("reset_seed", self.seed))
                return
        self._last_obs, self._reset_seed = None, self.local_seed + self.num_updates
        self._autoreset = np.zeros(self.n_envs, dtype=bool)
        warnings.warn(
            f"Resuming without the environments' state ({reason}); they restart from a fresh reset "
            f"with seed {self._reset_seed}, so the run will not repeat the uninterrupted one exactly",
            stacklevel=3,
        )

    @classmethod
    def load(
        cls: type[A],
        path: str | Path,
        env: str | Callable[[], gym.Env] | VectorEnv | None = None,
        device: str | torch.device | None = None,
        **overrides: Any,
    ) -> A:
        """Rebuild an agent from a checkpoint written by :meth:`save`.

        With the checkpoint's own environment settings, the agent continues exactly where
        the saved one stopped (``learn`` it into the same ``run_dir`` to resume a run).

        Args:
            path: The checkpoint file.
            env: Environment to attach; defaults to the checkpoint's env id.
            device: Defaults to ``"cpu"``.
            **overrides: Constructor arguments (``n_envs``, ``vectorization``, ``dist``) or
                hyperparameters (``nan_policy="skip"`` to get past an environment that stopped
                the run) to change. With ``dist``, every rank calls ``load``: rank 0 reads the
                file and sends it to the others (which need no copy of it), and each rank
                continues its own environments from it.

        Raises:
            ValueError: unreadable, unsafe or damaged checkpoint, one of another algorithm,
                or one whose spaces or networks do not fit ``env``.
        """
        dist = overrides.get("dist")
        data = read_checkpoint(path) if dist is None else dist.run_on_main(lambda: read_checkpoint(path))
        if cls.algo and data["algo"] != cls.algo:
            raise ValueError(
                f"Checkpoint {path} holds a {data['algo']!r} agent; load it with {data['algo'].upper()}.load"
            )
        agent_cls: type[A] = cls
        if not cls.algo:
            from trpo_lab.agents import agent_class

            try:
                agent_cls = agent_class(data["algo"])  # type: ignore[assignment]
            except ValueError as exc:
                raise ValueError(f"Checkpoint {path}: {exc}") from None
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
        config = dict(data["config"])
        for key, value in overrides.items():
            (config if key in config else kwargs)[key] = value
        try:
            agent = agent_cls(env, **kwargs, **config)
        except ValueError as exc:
            raise ValueError(f"Checkpoint {path}: {exc}") from None
        try:
            agent.load_state_dict(data)
        except BaseException:
            agent.close()
            raise
        return agent

    def close(self) -> None:
        self.env.close()


def _guarded(env: VectorEnv, nan_policy: str) -> VectorEnv:
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


def _tensor_leaves(tree: Any) -> list[Tensor]:
    """The tensors in nested dicts / lists / tuples (optimizer state_dicts), without recursion."""
    leaves: list[Tensor] = []
    stack = [tree]
    while stack:
        value = stack.pop()
        kind = type(value)
        if kind is dict:
            stack.extend(value.values())
        elif kind is list or kind is tuple:
            stack.extend(value)
        elif isinstance(value, Tensor):
            leaves.append(value)
        elif isinstance(value, (dict, list, tuple)):  # subclasses
            stack.extend(value.values() if isinstance(value, dict) else value)
    return leaves


def _clone_tree(value: Any) -> Any:
    """Deep copy of nested dicts / lists / tuples, cloning tensors (optimizer state_dicts)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone_tree(v) for v in value)
    return value


class _StopRequest:
    """The first SIGINT/SIGTERM received during :meth:`OnPolicyAgent.learn`."""

    signum: int | None = None


@contextmanager
def _stop_on_signals(stop: _StopRequest) -> Iterator[None]:
    """While inside: SIGINT/SIGTERM set ``stop.signum`` (a second one raises KeyboardInterrupt).

    Only in the main thread (Python delivers signals there); signals that are ignored
    (``SIG_IGN``, e.g. under ``nohup``) stay ignored; the previous handlers come back on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.signum is not None:
            raise KeyboardInterrupt
        stop.signum = signum
        print(
            f"trpo-lab: {signal.Signals(signum).name} received; finishing this update and writing a checkpoint "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    previous: dict[int, Any] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        current = signal.getsignal(signum)
        if current is signal.SIG_IGN:
            continue
        previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old if old is not None else signal.SIG_DFL)


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

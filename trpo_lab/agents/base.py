"""The on-policy loop every agent shares: construct, collect -> update, predict, evaluate.

Agents differ only in :meth:`OnPolicyAgent._setup` (their optimizers) and
:meth:`OnPolicyAgent.update` (one update from a flat batch, returning a dict of device
tensors that the loop reads once with :func:`~trpo_lab.agents.metrics.to_host`). Around the
update, each concern lives in its own module, and this class only calls it:

* the checkpoint format, its validation and safe loading: :mod:`trpo_lab.agents.checkpoint`
  (a checkpoint holds the vector env's state at the rollout boundary, so resuming from it
  reproduces the uninterrupted run's ``progress.csv`` exactly, sync envs on the CPU);
* the update guard (undo a NaN / inf update, stop after too many in a row):
  :mod:`trpo_lab.agents.guard`;
* SIGINT / SIGTERM (finish the update, checkpoint, raise :class:`TrainingInterrupted`):
  :mod:`trpo_lab.agents.signals`;
* data-parallel bookkeeping (normalization merge, logged metrics over ranks, agreeing to
  stop, the drift check): :class:`~trpo_lab.distributed.data_parallel.DataParallel`, and the
  reductions inside an update: :class:`~trpo_lab.distributed.reducer.Reducer`
  (``agent.reducer``); both are the identity in one process;
* non-finite environment output: :class:`~trpo_lab.envs.NonFiniteGuard` below the
  normalization wrappers (``nan_policy``).

Minibatches (PPO, the TRPO critic) are ``batch_size`` samples with a smaller last one: the
number of valid transitions per rollout changes from update to update (auto-reset slots and
skipped non-finite steps are dropped), so no ``batch_size`` divides every batch, and a
``batch_size`` larger than the rollout simply means one full-batch step.
"""

from __future__ import annotations

import signal
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
from torch import Tensor

from trpo_lab.agents import checkpoint
from trpo_lab.agents.checkpoint import CHECKPOINT_FORMAT, read_checkpoint, space_signature
from trpo_lab.agents.guard import NonFiniteUpdateError, UpdateGuard
from trpo_lab.agents.metrics import to_host
from trpo_lab.agents.signals import StopRequest, TrainingInterrupted, stop_on_signals
from trpo_lab.config import AgentConfig
from trpo_lab.distributed import DistributedContext, Reducer, rank_seed
from trpo_lab.distributed.data_parallel import DataParallel
from trpo_lab.envs import (
    NonFiniteEnvError,
    NonFiniteError,
    make_vec_env,
    normalize_observations,
    running_statistics,
    with_guard,
)
from trpo_lab.envs.atari import frames_per_step
from trpo_lab.envs.torch_vec import is_torch_vector_env
from trpo_lab.logging import RunLogger, WriteFailedError
from trpo_lab.nn.extractors import as_tensors, is_image_space
from trpo_lab.nn.policy import ActorCritic
from trpo_lab.resources import check_agent_memory, parse_memory
from trpo_lab.rollout.buffer import RolloutBatch, RolloutBuffer
from trpo_lab.rollout.collector import RolloutCollector
from trpo_lab.schedules import progress_remaining
from trpo_lab.validation import check_device, check_int, first_line

A = TypeVar("A", bound="OnPolicyAgent")

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
        check_int("seed", seed)
        if dist is not None and not isinstance(dist, DistributedContext):
            raise ValueError(f"Invalid dist: {dist!r}; expected a DistributedContext (trpo_lab.distributed.init_distributed)")
        self.reducer = Reducer(dist)
        """Every cross-process reduction of an update (the identity in one process)."""
        self.data_parallel = DataParallel(dist, self.reducer)
        """The loop's per-update data-parallel bookkeeping (the identity in one process)."""
        self.local_seed = seed if dist is None else rank_seed(seed, dist.rank)
        """Seed of this process's environments and samplers (``seed`` itself outside data-parallel runs)."""
        if env_kwargs is not None and not isinstance(env_kwargs, Mapping):
            raise ValueError(f"Invalid env_kwargs: {env_kwargs!r}; expected a dict of keyword arguments for gym.make")
        self.seed = seed
        self.preset_timesteps: int | None = None
        """The budget of the preset the agent was built from (:meth:`from_preset`), else None."""
        self.device = check_device(device)
        self.vectorization = vectorization
        self.env_kwargs = dict(env_kwargs or {})
        if is_torch_vector_env(env):
            self.env_id: str | None = None
            self.env = self._torch_env(env)
            self.env.reset(seed=self.local_seed)
        elif isinstance(env, VectorEnv):
            self.env_id = env.spec.id if env.spec is not None else None
            self.env = with_guard(env, self.config.nan_policy)
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

    def _torch_env(self, env: Any) -> VectorEnv:
        """A torch-native vector env (:mod:`trpo_lab.envs.torch_vec`), checked against this agent.

        Its tensors must live on the agent's device, and ``nan_policy = "skip"`` (which drops
        steps on the host) does not apply to it.
        """
        if env.device != self.device:
            raise ValueError(
                f"Invalid env: a torch vector env on {env.device}, but the agent's device is {self.device}; "
                "build both on the same device"
            )
        if self.config.nan_policy == "skip":
            raise ValueError(
                "Invalid nan_policy: 'skip' for a torch vector env; it applies to numpy environments only (use 'raise')"
            )
        vector_env: VectorEnv = env
        return vector_env

    def _build(self, env: Any) -> None:
        """Everything of ``__init__`` after the environment exists."""
        seed, local_seed = self.seed, self.local_seed
        self._env_spec = None if isinstance(env, VectorEnv) or is_torch_vector_env(env) else env
        self.n_envs = self.env.num_envs
        self.observation_space = self.env.single_observation_space
        self.action_space = self.env.single_action_space
        # Everything sized by the user, estimated before any of it is allocated (a clear error, not an OOM).
        memory_limit = None if self.config.max_memory is None else parse_memory(self.config.max_memory)
        check_agent_memory(self.config, self.observation_space, self.action_space, self.n_envs, self.device, memory_limit)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.policy = ActorCritic(self.observation_space, self.action_space, **self.config.policy_kwargs)
        self.policy.to(self.device)
        # Every action of the rollout (and of predict) draws its noise on the CPU from this
        # generator, so a seed gives the same stream on every device and acting path.
        self.generator = torch.Generator().manual_seed(local_seed)
        # The update's shuffles draw the same stream on every rank (rank 0's, the single-process
        # one), so that work every rank repeats on gathered data stays identical.
        self.shuffle_generator = torch.Generator().manual_seed(seed + 1)
        self.buffer = RolloutBuffer.for_spaces(
            self.observation_space, self.action_space, self.config.n_steps, self.n_envs, self.device,
            max_memory=memory_limit,
        )
        self.collector = RolloutCollector(self)
        """Steps the environments into the buffer (:mod:`trpo_lab.rollout.collector`)."""
        self._clip_actions = isinstance(self.action_space, gym.spaces.Box)
        self.num_timesteps = 0
        self.num_updates = 0
        self.num_episodes = 0
        self.num_nonfinite_skipped = 0
        self.wall_time = 0.0
        self.cpu_time = 0.0
        """CPU seconds this process spent in training updates (``time.process_time``; NaN when a
        run resumed from a checkpoint that did not record it). On a shared machine it is the
        fairer figure for comparing speed: it does not count the time other jobs held the core."""
        self.episode_returns: deque[float] = deque(maxlen=100)
        self.episode_lengths: deque[float] = deque(maxlen=100)
        self._last_obs: Any = None  # an array; tensors for a torch vector env; a dict of arrays for Dict spaces
        self._autoreset: np.ndarray | Tensor = np.zeros(self.n_envs, dtype=bool)
        self._reset_seed = local_seed  # seed of the first env.reset of a rollout (see load_state_dict)
        self.schedule_total_timesteps: int | None = None
        """The ``total_timesteps`` of the last :meth:`learn`: the horizon of the schedules (checkpointed)."""
        self.current_values: dict[str, float] = self.config.scheduled_values(1.0)
        """The scheduled hyperparameters' values for the current update (``learning_rate``,
        ``ent_coef``, PPO's ``clip_range``), set by the loop after each rollout."""
        self.frames_per_step = frames_per_step(self.env_id, self.env_kwargs)
        """Emulator frames per agent step (Atari's frame skip; 1 elsewhere): ``time/frames`` is logged when > 1."""
        self._setup()
        self.guard = UpdateGuard(
            self.policy, self._optimizer_states, self._load_optimizer_states, self.max_consecutive_rejections,
            self._replaced_state_tensors,
        )
        """Undoes non-finite updates and counts them."""
        self.data_parallel.join(self.policy, running_statistics(self.env), self.device)

    @property
    def sync_free(self) -> bool:
        """Whether the update runs device-resident: no host synchronisation inside ``update``.

        ``config.sync_free``, or, when that is ``None`` (the default), whether the agent's
        device is CUDA. The CPU runs the host-synchronising path by default (there a host read
        is free and stopping CG or the line search early saves work); setting ``sync_free=True``
        on the CPU runs the GPU's path, which is how CI proves it with
        :class:`~trpo_lab.testing.HostSyncCounter`. Both paths give the same update up to
        floating-point rounding, except that the sync-free L-BFGS critic fit is
        :func:`~trpo_lab.optim.lbfgs.lbfgs_fixed` (see ``critic_optimizer``).
        """
        chosen = self.config.sync_free
        return self.device.type == "cuda" if chosen is None else chosen

    @property
    def num_rejected_updates(self) -> int:
        """Updates rejected by the guard over the agent's lifetime."""
        return self.guard.num_rejected

    # ------------------------------------------------------------------ algorithm hooks
    @abstractmethod
    def _setup(self) -> None:
        """Create the algorithm's optimizers (called at the end of ``__init__``)."""

    @abstractmethod
    def update(self, batch: RolloutBatch) -> Mapping[str, Tensor | float]:
        """One update from a flat batch of valid transitions; returns ``train/...`` metrics
        (device tensors, read to the host once by the loop)."""

    def _optimizer_states(self) -> dict[str, Any]:
        """Algorithm state to checkpoint (optimizer state_dicts); override in subclasses."""
        return {}

    def _load_optimizer_states(self, states: Mapping[str, Any]) -> None:
        """Restore what :meth:`_optimizer_states` saved."""
        return None

    def _replaced_state_tensors(self) -> list[Tensor]:
        """Tensors of :meth:`_optimizer_states` that the optimizers replace and never modify in
        place (the update guard shares rather than copies them; see :class:`UpdateGuard`).
        Override in subclasses."""
        return []

    def _learning_rate_optimizers(self) -> list[Any]:
        """The optimizers whose ``lr`` is ``learning_rate``; the loop sets it in each of their
        ``param_groups`` before every update. Override in subclasses."""
        return []

    # ------------------------------------------------------------------ schedules
    def _apply_schedules(self, num_timesteps: int) -> None:
        """Evaluate the schedules at ``progress_remaining`` after a rollout that brought the
        count to ``num_timesteps`` (SB3's convention; see :mod:`trpo_lab.schedules`), and set
        the learning rate of :meth:`_learning_rate_optimizers`.

        The values depend only on ``num_timesteps`` and :attr:`schedule_total_timesteps`, both
        checkpointed, so a resumed run follows the uninterrupted one's schedule exactly.
        """
        total = self.schedule_total_timesteps
        progress = 1.0 if total is None else progress_remaining(num_timesteps, total)
        self.current_values = self.config.scheduled_values(progress)
        for optimizer in self._learning_rate_optimizers():
            for group in optimizer.param_groups:
                group["lr"] = self.current_values["learning_rate"]

    # ------------------------------------------------------------------ data-parallel reductions
    def _share_batch_sizes(self, local_size: int) -> None:
        """Learn every rank's number of valid transitions in this update's batch (one collective).

        Called by the loop before :meth:`update`; call it yourself before feeding ``update`` a
        batch of your own on every rank.

        Raises:
            ValueError: a rank has no valid transition (``n_steps * n_envs`` too small).
        """
        self.data_parallel.share_batch_sizes(local_size, self.config.n_steps, self.num_updates + 1)

    # ------------------------------------------------------------------ rollout
    def collect_rollout(self) -> int:
        """Fill the buffer with ``n_steps`` vectorized steps and compute GAE; returns env steps taken
        (:meth:`~trpo_lab.rollout.collector.RolloutCollector.collect`)."""
        return self.collector.collect()

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
            FolderLockedError: another process trains into ``run_dir`` (its pid is named).
            WriteFailedError: writing a checkpoint, ``progress.csv`` or TensorBoard events
                failed (full disk, read-only folder): the run stops there, and the last
                checkpoint written is intact (checkpoints are replaced atomically).
        """
        check_int("total_timesteps", total_timesteps, minimum=1)
        self.schedule_total_timesteps = total_timesteps
        run_path = Path(run_dir) if run_dir is not None else None
        main = self.data_parallel.is_main  # data-parallel: only rank 0 writes
        log_path = run_path if main else None
        resume = log_path is not None and self.num_updates > 0 and (log_path / "progress.csv").exists()
        try:
            if log_path is not None:
                log_path.mkdir(parents=True, exist_ok=True)
            logger = RunLogger(  # holds run_dir (FolderLock) until closed; writes config.toml first
                log_path,
                total_timesteps,
                progress_bar=progress_bar and main,
                tensorboard=tensorboard,
                resume=resume,
                start_timesteps=self.num_timesteps,
                start_updates=self.num_updates,
                config_toml=self.config_toml(total_timesteps) if log_path is not None else None,
            )
        except WriteFailedError:
            raise
        except OSError as exc:
            raise ValueError(f"Invalid run_dir: {run_dir}; cannot write there ({exc.strerror or exc})") from None
        stop = StopRequest()
        signum: int | None = None  # the signal every rank agreed on (data-parallel: any rank's)
        with stop_on_signals(stop):
            try:
                while self.num_timesteps < total_timesteps and signum is None:
                    metrics = self._train_one_update()
                    logger.log(metrics)
                    if run_path is not None and self.config.checkpoint_every and (
                        self.num_updates % self.config.checkpoint_every == 0
                    ):
                        self._checkpoint(run_path, logger)
                    error = self.guard.too_many_rejections(self.num_updates)
                    if error is not None:
                        if run_path is not None:
                            self._checkpoint(run_path, logger)
                        raise error
                    halt = callback is not None and callback(self, metrics) is False
                    signum, halt = self.data_parallel.agree_to_stop(stop.signum, halt)
                    if halt:
                        break
                interrupted = signum is not None and self.num_timesteps < total_timesteps
                if interrupted and run_path is not None:
                    self._checkpoint(run_path, logger)
                elif run_path is not None:  # while run_dir is still held
                    logger.sync()
                    self._write_checkpoints(run_path / "checkpoint.pt", run_path / "final.pt")
            finally:
                logger.close()
        if interrupted and signum is not None:  # a signal during the last update lets the run finish
            name = signal.Signals(signum).name
            where = f"; checkpoint written to {run_path / 'checkpoint.pt'}" if run_path is not None else ""
            raise TrainingInterrupted(
                f"{name} received: stopped after update {self.num_updates} (timestep {self.num_timesteps}){where}",
                signum,
            )
        return self

    def _checkpoint(self, run_path: Path, logger: RunLogger) -> None:
        logger.sync()  # progress.csv on disk at least up to the checkpoint's update
        self._write_checkpoints(run_path / "checkpoint.pt")

    def _write_checkpoints(self, *paths: Path) -> None:
        """Write the checkpoint to ``paths``; data-parallel: every rank's local state, written by rank 0."""
        local = checkpoint.local_state(self)
        ranks = self.data_parallel.gather_local_states(local)
        if self.data_parallel.is_main:
            data = checkpoint.agent_state(self, local)
            if ranks is not None:
                data["ranks"] = ranks
            checkpoint.write_checkpoint(data, *paths)

    def _train_one_update(self) -> dict[str, float]:
        """Collect a rollout, update under the guard, and return the metrics to log."""
        start, cpu_start = time.perf_counter(), time.process_time()
        episodes_before, skipped_before = self.num_episodes, self.num_nonfinite_skipped
        steps = self.collect_rollout()
        rollout_done = time.perf_counter()
        self.data_parallel.merge_normalization(running_statistics(self.env))
        batch = self.buffer.batch()
        self._share_batch_sizes(batch.size)
        self._apply_schedules(self.num_timesteps + self.reducer.total_count)  # all ranks' steps
        update_metrics, rejected = self.guard.run(lambda: self.update(batch), self.num_updates + 1)
        new_episodes, new_skipped = self.num_episodes - episodes_before, self.num_nonfinite_skipped - skipped_before
        metrics, rollout, counts = self.data_parallel.logged_metrics(
            to_host(update_metrics), steps, self.episode_returns, self.episode_lengths, new_episodes, new_skipped
        )
        self.num_episodes += counts.episodes - new_episodes  # data-parallel: the other ranks' episodes too
        self.num_nonfinite_skipped += counts.skipped - new_skipped
        end = time.perf_counter()
        self.num_timesteps += counts.steps
        self.num_updates += 1
        self.wall_time += end - start
        self.cpu_time += time.process_time() - cpu_start
        self.data_parallel.check_in_sync(self.policy, self.num_updates)
        metrics.update(
            {
                "time/timesteps": float(self.num_timesteps),
                "time/updates": float(self.num_updates),
                **({"time/frames": float(self.num_timesteps * self.frames_per_step)} if self.frames_per_step > 1 else {}),
                "rollout/episodes": float(self.num_episodes),
                **rollout,
                "rollout/nonfinite_skipped": float(self.num_nonfinite_skipped),
                "train/update_rejected": float(rejected),
                "train/rejected_updates": float(self.num_rejected_updates),
                "time/fps": counts.steps / max(end - start, 1e-9),
                "time/wall_s": self.wall_time,
                "time/cpu_s": self.cpu_time,
                "time/rollout_s": rollout_done - start,
                "time/update_s": end - rollout_done,
                **{f"train/{name}": value for name, value in self.current_values.items()},
            }
        )
        return metrics

    # ------------------------------------------------------------------ inference
    def predict(self, obs: Any, deterministic: bool = True) -> np.ndarray:
        """Actions for raw (unnormalized) observations: numpy in, numpy out.

        A single observation gives a single action; a batch ``(n, *obs_shape)`` gives ``n``.
        For a ``Dict`` observation space ``obs`` is a dict of arrays with the space's keys,
        each a single observation or a batch of the same size.
        """
        space = self.observation_space
        single, observations = self._predict_inputs(obs)
        if isinstance(space, gym.spaces.Box) and not is_image_space(space, False):
            observations = normalize_observations(self.env, observations.astype(np.float32))  # images never are
        with torch.inference_mode():
            actions, _, _ = self.policy.act(
                as_tensors(observations, self.device), self.generator, deterministic=deterministic
            )
        actions_np = actions.cpu().numpy()
        if self._clip_actions:
            actions_np = np.clip(actions_np, self.action_space.low, self.action_space.high)  # type: ignore[attr-defined]
        return actions_np[0] if single else actions_np

    def _predict_inputs(self, obs: Any) -> tuple[bool, Any]:
        """``(single, batch)``: whether ``obs`` is one observation, and it as a batch of arrays
        (a dict of them for a Dict space), its shapes checked against the observation space."""
        space = self.observation_space
        if not isinstance(space, gym.spaces.Dict):
            obs_np = np.asarray(obs)
            single_shape = tuple(space.shape or ())
            if obs_np.shape == single_shape:
                return True, obs_np[None]
            if obs_np.shape[1:] != single_shape:
                raise ValueError(
                    f"Invalid observation shape {obs_np.shape}; expected {single_shape} or (batch, *{single_shape})"
                )
            return False, obs_np
        keys = sorted(str(key) for key in space.spaces)
        if not isinstance(obs, Mapping) or sorted(str(key) for key in obs) != keys:
            got = sorted(obs) if isinstance(obs, Mapping) else type(obs).__name__
            raise ValueError(f"Invalid observation {got}; expected a dict with the keys {keys} of the Dict space")
        arrays = {key: np.asarray(obs[key]) for key in keys}
        shapes = {key: tuple(space.spaces[key].shape or ()) for key in keys}
        single = all(arrays[key].shape == shapes[key] for key in keys)
        sizes = {arrays[key].shape[0] for key in keys if arrays[key].ndim > 0}
        if not single and (
            len(sizes) != 1 or any(arrays[key].shape[1:] != shapes[key] or arrays[key].ndim == 0 for key in keys)
        ):
            got_shapes = {key: arrays[key].shape for key in keys}
            raise ValueError(
                f"Invalid observation shapes {got_shapes}; expected {shapes} for one observation, or each key's "
                "shape with the same leading batch size"
            )
        for key, sub_space in space.spaces.items():  # the dtypes the buffer stores (a uint8 image stays uint8)
            if isinstance(sub_space, gym.spaces.Box) and not is_image_space(sub_space, False):
                arrays[str(key)] = arrays[str(key)].astype(np.float32)
        return single, {key: value[None] if single else value for key, value in arrays.items()}

    def evaluate(
        self,
        n_episodes: int = 10,
        deterministic: bool = True,
        seed: int | None = None,
        video_folder: str | Path | None = None,
    ) -> np.ndarray:
        """Returns of ``n_episodes`` evaluation episodes on fresh, unnormalized copies of the env.

        Args:
            n_episodes: Episodes to run (over up to 4 environments in parallel).
            deterministic: Act with the distribution's mode (else sample).
            seed: Seed of the evaluation environments (default ``seed + 10000``).
            video_folder: Record every episode with Gymnasium's ``RecordVideo`` as
                ``<video_folder>/<algo>-<env>-episode-<i>.mp4`` (one environment, episodes in
                turn; needs MoviePy: ``pip install 'trpo-lab[video]'``).
        """
        if self._env_spec is None:
            raise ValueError("evaluate() needs an agent built from an env id or env factory, not a VectorEnv")
        check_int("n_episodes", n_episodes, minimum=1, expected=">= 1")
        if video_folder is None:
            n_eval, env_spec = min(n_episodes, 4), self._env_spec
        else:
            from trpo_lab.envs.video import recording_env_factory

            name = f"{self.algo}-{self.env_id}" if self.env_id else self.algo
            n_eval, env_spec = 1, recording_env_factory(self._env_spec, video_folder, self.env_kwargs, name_prefix=name)
        env = make_vec_env(env_spec, n_envs=n_eval, seed=None, env_kwargs=self.env_kwargs)
        targets = np.array([(n_episodes + i) // n_eval for i in range(n_eval)])
        counts = np.zeros(n_eval, dtype=int)
        returns: list[float] = []
        eval_seed = self.seed + 10_000 if seed is None else seed
        try:
            obs, _ = env.reset(seed=eval_seed)
            while (counts < targets).any():
                obs, _, _, _, infos = env.step(self.predict(obs, deterministic=deterministic))
                if "_episode" in infos:
                    for i in np.flatnonzero(infos["_episode"]):
                        if counts[i] < targets[i]:
                            returns.append(float(infos["episode"]["r"][i]))
                            counts[i] += 1
        except gym.error.DependencyNotInstalled as exc:  # e.g. pygame, to render frames for a video
            raise ValueError(f"Cannot evaluate {self.env_id or 'the environment'}: {first_line(exc)}") from None
        finally:
            env.close()
        return np.asarray(returns)

    # ------------------------------------------------------------------ persistence
    def config_toml(self, total_timesteps: int | None = None) -> str:
        """The run's resolved configuration as TOML (``config.toml`` of a run directory)."""
        return checkpoint.config_toml(self, total_timesteps)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: networks, optimizers, counters, RNGs, and the
        environments at the rollout boundary (``env_state``; ``None`` with ``env_state_error``
        saying why for envs :func:`~trpo_lab.envs.vector_env_state` cannot capture); see
        :mod:`trpo_lab.agents.checkpoint`."""
        return checkpoint.agent_state(self)

    def save(self, path: str | Path) -> None:
        """Write a checkpoint atomically (temporary file, fsync, rename)."""
        checkpoint.write_checkpoint(self.state_dict(), path)

    def load_state_dict(self, data: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (from :func:`~trpo_lab.agents.checkpoint.read_checkpoint`).

        The environments continue from the saved state when the checkpoint has one for the
        same number of environments; otherwise (an env :func:`~trpo_lab.envs.vector_env_state`
        cannot capture, such as async or Box2D envs) they restart from a fresh reset with
        seed ``seed + num_updates``, with a warning: training continues, but not bit-for-bit
        as the uninterrupted run would have. Data-parallel: each rank also restores its own
        environments and samplers (``data["ranks"][rank]``).

        Raises:
            ValueError: the checkpoint does not fit this agent: other spaces or network shapes
                (checked before anything is changed) or a damaged field.
        """
        checkpoint.load_agent_state(self, data)
        if self.data_parallel.world_size > 1:
            checkpoint.load_local_state(self, data, self.data_parallel.rank, self.data_parallel.world_size)
            self.data_parallel.mark_synced(running_statistics(self.env))

    @classmethod
    def from_preset(
        cls: type[A],
        env_id: str,
        *,
        seed: int = 0,
        n_envs: int | None = None,
        device: str | torch.device = "cpu",
        vectorization: str | None = None,
        env_kwargs: dict[str, Any] | None = None,
        dist: DistributedContext | None = None,
        **overrides: Any,
    ) -> A:
        """The agent ``trpo-lab train ALGO ENV_ID`` trains, with the same settings.

        The hyperparameters are the preset's (:func:`trpo_lab.presets.agent_settings`: the
        config defaults, the agent's ``[default]`` table, the env's suite entry, the agent's
        table for ``env_id``), with ``overrides`` on top (``--set``: a ``policy_kwargs``
        mapping is merged into the preset's). ``n_envs`` and ``vectorization`` default to the
        preset's run settings (8 and ``"sync"`` without one). An env id no preset lists gets
        the ``[default]`` table. The budget the preset was tuned for is
        :attr:`preset_timesteps` (``None`` without one)::

            agent = TRPO.from_preset("InvertedPendulum-v5", seed=0)
            agent.learn(agent.preset_timesteps)

        Raises:
            ValueError: an invalid env id, preset or override (naming it).
        """
        from trpo_lab.envs import check_env_id
        from trpo_lab.presets import agent_settings

        check_env_id(env_id)
        hyperparameters, run = agent_settings(cls.algo, env_id, overrides)
        agent = cls(
            env_id,
            n_envs=int(run.get("n_envs", 8)) if n_envs is None else n_envs,
            seed=seed,
            device=device,
            vectorization=str(run.get("vectorization", "sync")) if vectorization is None else vectorization,
            env_kwargs=env_kwargs,
            dist=dist,
            **hyperparameters,
        )
        total = run.get("total_timesteps")
        agent.preset_timesteps = None if total is None else int(total)
        return agent

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
        data = DataParallel(dist, Reducer(dist)).run_on_main(lambda: read_checkpoint(path))
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
        env, kwargs = checkpoint.constructor_arguments(data, path, env, device, overrides)
        try:
            agent = agent_cls(env, **kwargs)
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

"""The one code path that steps the environments during training.

:class:`RolloutCollector` fills the agent's :class:`~trpo_lab.rollout.buffer.RolloutBuffer`
with ``n_steps`` vectorized steps and computes GAE. It acts through the policy's
:meth:`~trpo_lab.nn.policy.ActorCritic.rollout_actor` (numpy on the CPU where the policy
allows it, torch elsewhere: the same actions for the same noise), with the noise of a
:class:`~trpo_lab.nn.acting.NoiseStream` drawn from the agent's CPU generator. Observations
are written once into the buffer and read back as a zero-copy view of the stored slot.

The position of the environments between rollouts (``_last_obs``, ``_autoreset``,
``_reset_seed``) stays on the agent, whose checkpoints hold it; the collector reads and
writes it there.

Gymnasium's ``NEXT_STEP`` autoreset: the step after an episode ends returns the reset
observation and ignores its action, so that slot is stored *invalid*; it still holds the
value of the final observation, which GAE bootstraps from at a truncation.

Two kinds of environment, one loop:

* a numpy :class:`gymnasium.vector.VectorEnv`: actions go to the host once per step (on a GPU
  that is the step's one device-to-host copy, which the environment has to wait for anyway),
  observations come back once (:meth:`RolloutBuffer.put_observation`; the noise of the torch
  acting path comes in chunks through pinned memory without a wait);
* a torch-native vector env (:mod:`trpo_lab.envs.torch_vec`, e.g.
  :class:`~trpo_lab.envs.torch_cartpole.TorchCartPole`): everything stays on the device and a
  step makes no host synchronisation; the counts a rollout needs on the host (valid steps,
  finished episodes' returns and lengths) are kept as tensors and read once, at its end.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol, cast

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import VectorEnv
from numpy.typing import NDArray
from torch import Tensor

from trpo_lab.envs import NonFiniteEnvError
from trpo_lab.envs.torch_vec import is_torch_vector_env
from trpo_lab.nn.acting import NoiseStream, RolloutActor
from trpo_lab.nn.policy import ActorCritic
from trpo_lab.rollout.buffer import RolloutBuffer

__all__ = ["CollectingAgent", "RolloutCollector"]


class _RolloutConfig(Protocol):
    @property
    def n_steps(self) -> int: ...

    @property
    def gamma(self) -> float: ...

    @property
    def gae_lambda(self) -> float: ...


class CollectingAgent(Protocol):
    """What the collector reads from and writes to the agent."""

    env: VectorEnv
    buffer: RolloutBuffer
    policy: ActorCritic
    generator: torch.Generator
    n_envs: int
    action_space: gym.Space  # type: ignore[type-arg]
    num_updates: int
    num_timesteps: int
    num_episodes: int
    num_nonfinite_skipped: int
    episode_returns: deque[float]
    episode_lengths: deque[float]
    _last_obs: Any
    """The observations of the next step: an array or tensor, a dict of arrays for Dict spaces, or None."""
    _autoreset: NDArray[np.bool_] | Tensor
    _reset_seed: int

    @property
    def config(self) -> _RolloutConfig: ...


def _to_numpy(x: Tensor | NDArray[Any]) -> NDArray[Any]:
    if isinstance(x, np.ndarray):
        return x
    return x.numpy() if x.device.type == "cpu" else x.cpu().numpy()


class RolloutCollector:
    """Steps ``agent.env`` with ``agent.policy`` into ``agent.buffer``.

    Args:
        agent: The agent whose environments, policy, buffer and counters are used.
        backend: The acting path, ``"auto"`` (numpy where it applies, else torch), ``"numpy"``
            or ``"torch"`` (see :func:`~trpo_lab.nn.acting.make_actor`).
    """

    def __init__(self, agent: CollectingAgent, backend: str = "auto") -> None:
        self.agent = agent
        self.on_device = is_torch_vector_env(agent.env)
        """Whether the environments step on tensors (the torch acting path is then always used)."""
        self.backend = "torch" if self.on_device and backend == "auto" else backend
        space = agent.action_space
        self._bounds: tuple[Any, Any] | None = (space.low, space.high) if isinstance(space, gym.spaces.Box) else None

    def actor(self) -> RolloutActor:
        """The acting path for the next rollout: the policy's current weights, and noise drawn
        lazily from the agent's generator (building one draws nothing)."""
        agent = self.agent
        noise = NoiseStream(agent.policy.distribution, agent.generator, agent.n_envs, agent.config.n_steps)
        return agent.policy.rollout_actor(noise, self.backend)

    def collect(self) -> int:
        """Fill the buffer with ``n_steps`` vectorized steps and compute GAE; returns env steps taken.

        With ``nan_policy = "skip"``, a step at which sub-environment ``i`` returned NaN or
        inf (the :class:`~trpo_lab.envs.NonFiniteGuard` has already reset it and zeroed the
        reward) is stored as an invalid slot, like an auto-reset slot, and the slot before it
        is marked truncated: its advantage bootstraps from ``V`` of the last finite
        observation instead of running through the dropped step. The next slot starts the
        new episode from the reset observation.

        Raises:
            NonFiniteEnvError: ``nan_policy = "raise"`` and an environment returned NaN or inf,
                or more than half of this rollout's transitions had to be dropped.
        """
        agent = self.agent
        env, buffer, n_steps = agent.env, agent.buffer, agent.config.n_steps
        if agent._last_obs is None:
            agent._last_obs, _ = env.reset(seed=agent._reset_seed)
            agent._autoreset = (
                torch.zeros(agent.n_envs, dtype=torch.bool, device=buffer.device) if self.on_device
                else np.zeros(agent.n_envs, dtype=bool)
            )
        obs, autoreset = agent._last_obs, agent._autoreset
        if self.on_device:  # no-ops but after a checkpoint was loaded (numpy copies of them)
            obs = torch.as_tensor(obs, device=buffer.device)
            autoreset = torch.as_tensor(autoreset, device=buffer.device)
            episodes = _DeviceEpisodes(n_steps, agent.n_envs, buffer.device)
        buffer.reset()
        actor = self.actor()
        steps = skipped = step = 0
        try:
            with torch.inference_mode():
                for step in range(n_steps):
                    actions, log_probs, values = actor.act(buffer.put_observation(obs))
                    if self.on_device:
                        env_actions = actions
                    else:
                        actions_np = _to_numpy(actions)
                        env_actions = np.clip(actions_np, *self._bounds) if self._bounds is not None else actions_np
                    next_obs, rewards, terminated, truncated, infos = env.step(env_actions)
                    valid = ~autoreset
                    if "_nonfinite" in infos:
                        skipped += self._drop_non_finite(step, infos["_nonfinite"], cast(NDArray[np.bool_], valid))
                    buffer.add(None, actions, log_probs, values, rewards, terminated, truncated, valid)
                    autoreset = terminated | truncated
                    if self.on_device:
                        episodes.add(step, cast(Tensor, valid), infos)
                    else:
                        steps += int(valid.sum())
                        if "_episode" in infos:
                            self._record_episodes(infos)
                    obs = next_obs
                last_values = torch.as_tensor(actor.values(obs), device=buffer.device)
            if self.on_device:
                steps = episodes.read(agent)
        except NonFiniteEnvError as exc:
            raise NonFiniteEnvError(
                f"{exc} at rollout step {step} (update {agent.num_updates + 1}, timestep {agent.num_timesteps + steps}); "
                "check the environment, wrap it to sanitise its output, or set nan_policy='skip' to drop such steps",
                exc.env_index,
            ) from None
        agent._autoreset = autoreset
        agent._last_obs = obs
        if 2 * skipped > n_steps * agent.n_envs:
            raise NonFiniteEnvError(
                f"{skipped} of the {n_steps * agent.n_envs} transitions of update {agent.num_updates + 1} "
                "were NaN or inf and had to be dropped (nan_policy='skip'); the environment is broken"
            )
        buffer.finish(last_values.clone(), agent.config.gamma, agent.config.gae_lambda)
        return steps

    def _drop_non_finite(self, step: int, bad: NDArray[np.bool_], valid: NDArray[np.bool_]) -> int:
        """Invalidate the slots of sub-environments whose output was non-finite (see :meth:`collect`)."""
        valid &= ~bad
        if step > 0:
            self.agent.buffer.mark_truncated(step - 1, bad)
        count = int(bad.sum())
        self.agent.num_nonfinite_skipped += count
        return count

    def _record_episodes(self, infos: dict[str, Any]) -> None:
        """Append the returns and lengths of the episodes that just ended (``RecordEpisodeStatistics``)."""
        agent = self.agent
        done_mask = infos["_episode"]
        for ret, length in zip(infos["episode"]["r"][done_mask], infos["episode"]["l"][done_mask]):
            agent.episode_returns.append(float(ret))
            agent.episode_lengths.append(float(length))
            agent.num_episodes += 1


class _DeviceEpisodes:
    """A torch env's per-step bookkeeping, kept on the device and read once per rollout.

    Holds the number of valid transitions and, per step and environment, whether an episode
    ended there with its return and length (the env's ``episode_done`` / ``episode_return`` /
    ``episode_length`` info tensors; without them no episode is recorded).
    """

    def __init__(self, n_steps: int, n_envs: int, device: torch.device) -> None:
        self.valid_count = torch.zeros((), dtype=torch.int64, device=device)
        # rows: done flag, return, length
        self.table = torch.zeros(3, n_steps, n_envs, device=device)

    def add(self, step: int, valid: Tensor, infos: dict[str, Any]) -> None:
        self.valid_count += valid.sum()
        if "episode_done" in infos:
            self.table[0, step] = infos["episode_done"]
            self.table[1, step] = infos["episode_return"]
            self.table[2, step] = infos["episode_length"]

    def read(self, agent: CollectingAgent) -> int:
        """Append the finished episodes to the agent's statistics (one device-to-host copy); returns the valid steps."""
        host = torch.cat([self.valid_count.reshape(1).to(self.table.dtype), self.table.reshape(-1)]).cpu()
        done, returns, lengths = host[1:].reshape(self.table.shape).numpy()
        mask = done.astype(bool)
        for ret, length in zip(returns[mask], lengths[mask]):
            agent.episode_returns.append(float(ret))
            agent.episode_lengths.append(float(length))
            agent.num_episodes += 1
        return int(host[0])

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
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import VectorEnv
from numpy.typing import NDArray
from torch import Tensor

from trpo_lab.envs import NonFiniteEnvError
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
    _last_obs: NDArray[Any] | None
    _autoreset: NDArray[np.bool_]
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
        self.backend = backend
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
            agent._autoreset[:] = False
        obs = agent._last_obs
        buffer.reset()
        actor = self.actor()
        steps = skipped = step = 0
        autoreset = agent._autoreset
        try:
            with torch.inference_mode():
                for step in range(n_steps):
                    actions, log_probs, values = actor.act(buffer.put_observation(obs))
                    actions_np = _to_numpy(actions)
                    env_actions = np.clip(actions_np, *self._bounds) if self._bounds is not None else actions_np
                    next_obs, rewards, terminated, truncated, infos = env.step(env_actions)
                    valid = ~autoreset
                    if "_nonfinite" in infos:
                        skipped += self._drop_non_finite(step, infos["_nonfinite"], valid)
                    buffer.add(None, actions, log_probs, values, rewards, terminated, truncated, valid)
                    steps += int(valid.sum())
                    autoreset = terminated | truncated
                    if "_episode" in infos:
                        self._record_episodes(infos)
                    obs = next_obs
                last_values = torch.as_tensor(actor.values(obs), device=buffer.device)
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

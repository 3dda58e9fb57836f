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
  that is the step's one device-to-host copy, which the environment has to wait for anyway).
  On the CPU the step's observations, rewards and flags are written straight into the buffer
  through numpy views. With the buffer on another device they come back in **one** copy per
  step: :class:`StepStaging` packs them into one pinned host buffer and queues a single
  non-blocking copy to the device (the noise of the torch acting path also comes in chunks
  through pinned memory without a wait);
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

__all__ = ["CollectingAgent", "RolloutCollector", "StepStaging"]


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

    def __init__(self, agent: CollectingAgent, backend: str = "auto", staged: bool | None = None) -> None:
        self.agent = agent
        self.on_device = is_torch_vector_env(agent.env)
        """Whether the environments step on tensors (the torch acting path is then always used)."""
        self.backend = "torch" if self.on_device and backend == "auto" else backend
        if staged and self.on_device:
            raise ValueError("staged=True applies to numpy environments; a torch vector env's steps are already on the device")
        self.staging: StepStaging | None = None
        """Set when a numpy env's steps reach the buffer through one host-to-device copy each
        (``staged``; default: when the buffer is not on the CPU). The acting path is then torch."""
        if staged if staged is not None else (not self.on_device and agent.buffer.device.type != "cpu"):
            self.staging = StepStaging(agent.buffer)
            self.backend = "torch"
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
        staging = self.staging
        # What acts: the env's observation, or (staged) its copy on the device.
        acting_obs = obs if staging is None else staging.transfer(obs)[0]
        steps = skipped = step = 0
        try:
            with torch.inference_mode():
                for step in range(n_steps):
                    actions, log_probs, values = actor.act(buffer.put_observation(acting_obs))
                    if self.on_device:
                        env_actions = actions
                    else:
                        actions_np = _to_numpy(actions)
                        env_actions = np.clip(actions_np, *self._bounds) if self._bounds is not None else actions_np
                    next_obs, rewards, terminated, truncated, infos = env.step(env_actions)
                    valid = ~autoreset
                    if "_nonfinite" in infos:
                        skipped += self._drop_non_finite(step, infos["_nonfinite"], cast(NDArray[np.bool_], valid))
                    autoreset = terminated | truncated
                    if staging is None:
                        buffer.add(None, actions, log_probs, values, rewards, terminated, truncated, valid)
                        acting_obs = next_obs
                    else:  # the step's one host-to-device copy
                        flags = (terminated, truncated, cast(NDArray[np.bool_], valid))
                        acting_obs, dev = staging.transfer(next_obs, rewards, *flags)
                        buffer.add(None, actions, log_probs, values, dev["rewards"], dev["terminated"],
                                   dev["truncated"], dev["valid"])
                    if self.on_device:
                        episodes.add(step, cast(Tensor, valid), infos)
                    else:
                        steps += int(valid.sum())
                        if "_episode" in infos:
                            self._record_episodes(infos)
                    obs = next_obs
                last_values = torch.as_tensor(actor.values(acting_obs), device=buffer.device)
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


class StepStaging:
    """One host-to-device copy per vector step for a numpy environment feeding a device buffer.

    The step's next observations (one field per key of a Dict space), rewards and the
    ``terminated`` / ``truncated`` / ``valid`` flags are written, through numpy views, into
    one byte buffer in page-locked host memory; :meth:`transfer` then queues a single
    ``non_blocking`` copy of it to a byte buffer on the device and returns device tensors that
    view it. Without pinning (no CUDA) the copy is an ordinary one.

    Two buffers alternate, so the host never writes into memory a queued copy may still be
    reading (on CUDA the step's device-to-host copy of the actions has already waited for the
    previous transfer, but the collector does not rely on that).

    Args:
        buffer: The rollout buffer the steps go to: its device, its number of environments and
            its observation storage (shapes and dtypes, by key for Dict spaces) set the layout.
    """

    _ALIGN = 64
    _FLAGS = ("terminated", "truncated", "valid")

    def __init__(self, buffer: RolloutBuffer) -> None:
        self.device = buffer.device
        n_envs, storage = buffer.n_envs, buffer.observations
        self.obs_keys: list[str] | None = list(storage) if isinstance(storage, dict) else None
        fields: list[tuple[str, tuple[int, ...], torch.dtype]] = []
        if isinstance(storage, dict):
            fields += [(f"obs/{key}", (n_envs, *t.shape[2:]), t.dtype) for key, t in storage.items()]
        else:
            fields.append(("obs", (n_envs, *storage.shape[2:]), storage.dtype))
        fields.append(("rewards", (n_envs,), buffer.rewards.dtype))
        fields += [(name, (n_envs,), torch.bool) for name in self._FLAGS]
        self._layout: list[tuple[str, int, int, tuple[int, ...], torch.dtype]] = []
        """``(name, byte offset, byte size, shape, dtype)`` of every field."""
        offset = 0
        for name, shape, dtype in fields:
            nbytes = int(np.prod(shape)) * dtype.itemsize
            self._layout.append((name, offset, nbytes, shape, dtype))
            offset += -(-nbytes // self._ALIGN) * self._ALIGN
        self.nbytes = offset
        self.pinned = self.device.type == "cuda" and torch.cuda.is_available()
        self._host = [torch.empty(offset, dtype=torch.uint8, pin_memory=self.pinned) for _ in range(2)]
        self._device = [torch.empty(offset, dtype=torch.uint8, device=self.device) for _ in range(2)]
        self._host_views = [{name: view.numpy() for name, view in self._views(buf).items()} for buf in self._host]
        self._device_views = [self._views(buf) for buf in self._device]
        self._next = 0
        self.transfers = 0
        """Copies made so far (one per :meth:`transfer`)."""

    def _views(self, buf: Tensor) -> dict[str, Tensor]:
        return {
            name: buf[offset:offset + nbytes].view(dtype).view(shape)
            for name, offset, nbytes, shape, dtype in self._layout
        }

    def transfer(
        self,
        obs: Any,
        rewards: NDArray[Any] | None = None,
        terminated: NDArray[Any] | None = None,
        truncated: NDArray[Any] | None = None,
        valid: NDArray[Any] | None = None,
    ) -> tuple[Any, dict[str, Tensor]]:
        """Copy one step's host arrays to the device at once.

        Returns:
            ``(obs, step)``: the observations on the device (a dict of tensors, by key, for
            Dict spaces) and the other fields given, by name, as device tensors. They view a
            buffer that the transfer after next overwrites: store or use them before then.
        """
        host, device = self._host_views[self._next], self._device_views[self._next]
        if self.obs_keys is None:
            host["obs"][...] = obs
        else:
            for key in self.obs_keys:
                host[f"obs/{key}"][...] = obs[key]
        given = {"rewards": rewards, "terminated": terminated, "truncated": truncated, "valid": valid}
        for name, value in given.items():
            if value is not None:
                host[name][...] = value
        self._device[self._next].copy_(self._host[self._next], non_blocking=self.pinned)
        self._next ^= 1
        self.transfers += 1
        dev_obs = device["obs"] if self.obs_keys is None else {key: device[f"obs/{key}"] for key in self.obs_keys}
        return dev_obs, {name: device[name] for name, value in given.items() if value is not None}

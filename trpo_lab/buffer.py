"""The one rollout buffer that TRPO, NPG, ACKTR and PPO share, and GAE.

Storage is preallocated as ``(n_steps, n_envs, ...)`` tensors on the agent's
device and never reshaped in place; batches are new tensors.  Slot ``(t, i)`` is
*invalid* when sub-environment ``i`` was auto-resetting at step ``t`` (Gymnasium's
``NEXT_STEP`` autoreset: see :mod:`trpo_lab.envs`); invalid slots carry the value
of the final observation of the episode that just ended, which is what GAE needs
to bootstrap a truncated episode, and are dropped from every batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["RolloutBatch", "RolloutBuffer", "compute_gae", "minibatches"]

_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def compute_gae(
    rewards: Tensor,
    values: Tensor,
    next_values: Tensor,
    terminated: Tensor,
    truncated: Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016) over ``(T, N)`` tensors.

    For each step ``t``, ``next_values[t]`` is the value of the observation that
    follows it: for a step that ends an episode by truncation that is the value of
    the final observation (bootstrapped), for a step that ends it by termination it
    is ignored.

        delta_t = r_t + gamma * V(s_{t+1}) * (1 - terminated_t) - V(s_t)
        A_t     = delta_t + gamma * lambda * (1 - done_t) * A_{t+1},   done = terminated | truncated

    Args:
        rewards, values, next_values: float tensors ``(T, N)``.
        terminated, truncated: bool or 0/1 tensors ``(T, N)``.
        gamma: Discount in (0, 1].
        gae_lambda: Bias/variance trade-off in [0, 1].

    Returns:
        ``(advantages, returns)`` with ``returns = advantages + values`` (the critic's target).
    """
    if all(
        x.device.type == "cpu" and not x.requires_grad and x.dtype in _NUMPY_FLOATS for x in (rewards, values, next_values)
    ):
        return _compute_gae_numpy(rewards, values, next_values, terminated, truncated, gamma, gae_lambda)
    not_terminated = 1.0 - terminated.to(rewards.dtype)
    not_done = 1.0 - torch.logical_or(terminated.bool(), truncated.bool()).to(rewards.dtype)
    deltas = rewards + gamma * next_values * not_terminated - values
    decay = (gamma * gae_lambda) * not_done
    advantages = torch.empty_like(rewards)
    running = torch.zeros_like(rewards[0])
    for t in range(rewards.shape[0] - 1, -1, -1):
        running = deltas[t] + decay[t] * running
        advantages[t] = running
    return advantages, advantages + values


def _compute_gae_numpy(
    rewards: Tensor,
    values: Tensor,
    next_values: Tensor,
    terminated: Tensor,
    truncated: Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[Tensor, Tensor]:
    """:func:`compute_gae` for CPU tensors, in numpy: a rollout's GAE is a few hundred tiny
    steps, where torch's per-operator dispatch costs about 3x numpy's."""
    r, v, nv = rewards.numpy(), values.numpy(), next_values.numpy()
    term = terminated.numpy().astype(bool, copy=False)
    done = term | truncated.numpy().astype(bool, copy=False)
    deltas = r + gamma * nv * ~term - v
    decay = (gamma * gae_lambda) * ~done
    deltas, decay = deltas.astype(r.dtype, copy=False), decay.astype(r.dtype, copy=False)
    advantages = np.empty_like(deltas)
    running = np.zeros_like(deltas[0])
    for t in range(deltas.shape[0] - 1, -1, -1):
        np.multiply(decay[t], running, out=running)
        running += deltas[t]
        advantages[t] = running
    adv = torch.from_numpy(advantages)
    return adv, adv + values


class RolloutBatch(NamedTuple):
    """A flat batch of valid transitions (leading dimension = number of samples)."""

    observations: Tensor
    actions: Tensor
    log_probs: Tensor
    values: Tensor
    advantages: Tensor
    returns: Tensor

    @property
    def size(self) -> int:
        """Number of samples."""
        return int(self.observations.shape[0])

    def index(self, idx: Tensor) -> RolloutBatch:
        return RolloutBatch(*(field[idx] for field in self))


class RolloutBuffer:
    """Preallocated on-policy storage with GAE.

    Args:
        n_steps: Steps per environment per rollout.
        n_envs: Number of parallel environments.
        obs_shape: Shape of one observation.
        action_shape: Shape of one action (``()`` for ``Discrete``).
        action_dtype: ``torch.long`` for discrete actions, ``torch.float32`` for Box.
        device: Where every tensor lives.
        obs_dtype: Storage dtype of observations.
    """

    def __init__(
        self,
        n_steps: int,
        n_envs: int,
        obs_shape: tuple[int, ...],
        action_shape: tuple[int, ...],
        action_dtype: torch.dtype,
        device: torch.device | str = "cpu",
        obs_dtype: torch.dtype = torch.float32,
    ) -> None:
        if n_steps < 1 or n_envs < 1:
            raise ValueError(f"Invalid buffer size: n_steps={n_steps}, n_envs={n_envs}; both must be >= 1")
        self.n_steps, self.n_envs = n_steps, n_envs
        self.device = torch.device(device)
        shape = (n_steps, n_envs)

        def alloc(*extra: int, dtype: torch.dtype = torch.float32) -> Tensor:
            return torch.zeros(*shape, *extra, dtype=dtype, device=self.device)

        self.observations = alloc(*obs_shape, dtype=obs_dtype)
        self.actions = alloc(*action_shape, dtype=action_dtype)
        self.log_probs = alloc()
        self.values = alloc()
        self.rewards = alloc()
        self.terminated = alloc(dtype=torch.bool)
        self.truncated = alloc(dtype=torch.bool)
        self.valid = alloc(dtype=torch.bool)
        self.advantages = alloc()
        self.returns = alloc()
        self.pos = 0
        self._numpy: dict[str, np.ndarray] | None = None
        if self.device.type == "cpu":
            names = ("observations", "actions", "log_probs", "values", "rewards", "terminated", "truncated", "valid")
            self._numpy = {name: getattr(self, name).numpy() for name in names}

    @property
    def full(self) -> bool:
        return self.pos == self.n_steps

    def reset(self) -> None:
        self.pos = 0

    def add(
        self,
        obs: Tensor | np.ndarray | None,
        actions: Tensor,
        log_probs: Tensor,
        values: Tensor,
        rewards: Tensor | np.ndarray,
        terminated: Tensor | np.ndarray,
        truncated: Tensor | np.ndarray,
        valid: Tensor | np.ndarray,
    ) -> None:
        """Store one vectorized step (each argument has leading dimension ``n_envs``).

        Numpy arrays (straight from the environment, or from the numpy rollout policy) are
        accepted; on the CPU they are written through numpy views of the storage (no tensor
        conversion per step).  ``obs=None`` means it was stored by :meth:`put_observation`.
        """
        if self.pos >= self.n_steps:
            raise RuntimeError("RolloutBuffer is full; call finish() and reset() before adding more steps")
        t = self.pos
        for name, value in (
            ("observations", obs),
            ("actions", actions),
            ("log_probs", log_probs),
            ("values", values),
            ("rewards", rewards),
            ("terminated", terminated),
            ("truncated", truncated),
            ("valid", valid),
        ):
            if name == "observations" and (
                value is None or (isinstance(value, Tensor) and value.data_ptr() == self.observations[t].data_ptr())
            ):
                continue
            if isinstance(value, np.ndarray):
                if self._numpy is not None:
                    self._numpy[name][t] = value
                else:
                    getattr(self, name)[t] = torch.as_tensor(value, device=self.device)
            else:
                getattr(self, name)[t] = value
        self.pos += 1

    def put_observation(self, obs: np.ndarray) -> Tensor:
        """Store the observation of the current step and return it as a tensor on the device.

        On the CPU the returned tensor is a view of the storage, so the policy reads the
        observation without another copy; :meth:`add` then receives it back and skips it.
        """
        t = self.pos
        if self._numpy is not None:
            self._numpy["observations"][t] = obs
        else:
            self.observations[t] = torch.as_tensor(obs, device=self.device)
        return self.observations[t]

    def put_observation_array(self, obs: np.ndarray) -> np.ndarray:
        """:meth:`put_observation` for the CPU's numpy rollout: returns the stored slot as a
        zero-copy numpy view (pass ``obs=None`` to :meth:`add` afterwards)."""
        if self._numpy is None:
            raise RuntimeError("put_observation_array needs a CPU buffer; use put_observation")
        slot = self._numpy["observations"][self.pos]
        slot[...] = obs
        return slot

    def finish(self, last_values: Tensor, gamma: float, gae_lambda: float) -> None:
        """Compute advantages and returns; ``last_values`` is V of the observation after the last step."""
        if not self.full:
            raise RuntimeError(f"RolloutBuffer.finish() called after {self.pos} of {self.n_steps} steps")
        next_values = torch.cat([self.values[1:], last_values.reshape(1, self.n_envs)], dim=0)
        self.advantages, self.returns = compute_gae(
            self.rewards, self.values, next_values, self.terminated, self.truncated, gamma, gae_lambda
        )

    @property
    def n_valid(self) -> int:
        return int(self.valid.sum())

    def batch(self) -> RolloutBatch:
        """All valid transitions, flattened in (step, env) order."""
        mask = self.valid.reshape(-1)
        idx = torch.nonzero(mask).squeeze(-1)

        def flat(x: Tensor) -> Tensor:
            return x.reshape(self.n_steps * self.n_envs, *x.shape[2:])[idx]

        return RolloutBatch(
            observations=flat(self.observations),
            actions=flat(self.actions),
            log_probs=flat(self.log_probs),
            values=flat(self.values),
            advantages=flat(self.advantages),
            returns=flat(self.returns),
        )


def minibatches(
    batch: RolloutBatch, batch_size: int, generator: torch.Generator | None = None
) -> Iterator[RolloutBatch]:
    """Shuffled minibatches of ``batch_size`` samples (the last one may be smaller)."""
    n = batch.size
    if batch_size < 1:
        raise ValueError(f"Invalid batch_size: {batch_size}; expected >= 1")
    device = batch.observations.device
    perm = torch.randperm(n, generator=generator, device="cpu").to(device)
    shuffled = batch.index(perm)  # one gather per field; the minibatches are views of it
    for start in range(0, n, batch_size):
        yield RolloutBatch(*(field[start : start + batch_size] for field in shuffled))

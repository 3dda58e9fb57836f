"""The one rollout buffer that TRPO, NPG, ACKTR and PPO share, and the one GAE.

Storage is preallocated as ``(n_steps, n_envs, ...)`` tensors on the agent's device and
never reshaped in place; batches are new tensors. Slot ``(t, i)`` is *invalid* when
sub-environment ``i`` was auto-resetting at step ``t`` (Gymnasium's ``NEXT_STEP`` autoreset:
see :mod:`trpo_lab.envs`); invalid slots carry the value of the final observation of the
episode that just ended, which is what GAE needs to bootstrap a truncated episode, and are
dropped from every batch.

GAE is a backward scan of ``n_steps`` tiny steps, each depending on the last, so its cost
is per-step overhead, not arithmetic: :func:`compute_gae` runs the scan in numpy on the host
for every device. On a GPU that is one device-to-host copy of the rollout's rewards, values
and flags and one copy of the advantages back, once per rollout, at its end, where the
rollout has synchronised at every step already; a torch scan would launch two kernels per
step instead. One implementation, so every device computes the same advantages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, TypeAlias, cast

import gymnasium as gym
import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from trpo_lab import resources
from trpo_lab.nn.extractors import check_observation_space, is_image_space
from trpo_lab.optim._flat import to_device_async
from trpo_lab.validation import check_int

__all__ = [
    "Observations",
    "RolloutBatch",
    "RolloutBuffer",
    "compute_gae",
    "flatten_observations",
    "map_observations",
    "minibatches",
    "observation_count",
    "unflatten_observations",
]

Observations: TypeAlias = "Tensor | dict[str, Tensor]"
"""A batch of observations: one tensor, or one tensor per key for a ``Dict`` observation space."""


def map_observations(fn: Callable[[Tensor], Tensor], obs: Observations) -> Observations:
    """``fn`` applied to the observation tensor, or to each key's tensor of a Dict observation."""
    if isinstance(obs, dict):
        return {key: fn(value) for key, value in obs.items()}
    return fn(obs)


def _first(obs: Observations) -> Tensor:
    """A tensor of ``obs`` (the first key's of a Dict observation): its leading dims and device are the batch's."""
    return next(iter(obs.values())) if isinstance(obs, dict) else obs


def observation_count(obs: Observations) -> int:
    """The number of observations in a batch (its leading dimension)."""
    return int(_first(obs).shape[0])


def flatten_observations(obs: Observations) -> list[Tensor]:
    """The tensors of a batch of observations in a fixed order (Dict keys sorted), e.g. for a collective."""
    return [obs[key] for key in sorted(obs)] if isinstance(obs, dict) else [obs]


def unflatten_observations(like: Observations, tensors: list[Tensor]) -> Observations:
    """Observations shaped like ``like`` from :func:`flatten_observations`-ordered ``tensors``."""
    return dict(zip(sorted(like), tensors, strict=True)) if isinstance(like, dict) else tensors[0]

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

    For each step ``t``, ``next_values[t]`` is the value of the observation that follows it:
    for a step that ends an episode by truncation that is the value of the final observation
    (bootstrapped), for a step that ends it by termination it is ignored.

        delta_t = r_t + gamma * V(s_{t+1}) * (1 - terminated_t) - V(s_t)
        A_t     = delta_t + gamma * lambda * (1 - done_t) * A_{t+1},   done = terminated | truncated

    Args:
        rewards: Float tensor ``(T, N)``.
        values: ``V(s_t)``, float ``(T, N)``.
        next_values: ``V(s_{t+1})``, float ``(T, N)``.
        terminated: Bool or 0/1 tensor ``(T, N)``.
        truncated: Bool or 0/1 tensor ``(T, N)``.
        gamma: Discount in (0, 1].
        gae_lambda: Bias/variance trade-off in [0, 1].

    Returns:
        ``(advantages, returns)`` on the device and in the dtype of ``rewards``, with
        ``returns = advantages + values`` (the critic's target). Not differentiable.
    """
    dtype = rewards.dtype if rewards.dtype in _NUMPY_FLOATS else torch.float32
    r, v, nv, term, trunc = _to_host([rewards, values, next_values, terminated, truncated], dtype)
    term, done = term.astype(bool, copy=False), term.astype(bool, copy=False) | trunc.astype(bool, copy=False)
    deltas = r + gamma * nv * ~term - v
    decay = (gamma * gae_lambda) * ~done
    deltas, decay = deltas.astype(r.dtype, copy=False), decay.astype(r.dtype, copy=False)
    advantages = np.empty_like(deltas)
    running = np.zeros_like(deltas[0])
    for t in range(deltas.shape[0] - 1, -1, -1):
        np.multiply(decay[t], running, out=running)
        running += deltas[t]
        advantages[t] = running
    adv = to_device_async(torch.from_numpy(advantages), rewards.device).to(rewards.dtype)
    return adv, adv + values.detach()


def _to_host(tensors: list[Tensor], dtype: torch.dtype) -> list[NDArray[Any]]:
    """Numpy arrays of ``tensors`` (views for CPU tensors, else one device-to-host copy of them all)."""
    if all(t.device.type == "cpu" for t in tensors):
        return [t.detach().to(dtype if t.is_floating_point() else t.dtype).numpy() for t in tensors]
    stacked = torch.stack([t.detach().to(dtype) for t in tensors]).cpu().numpy()
    return list(stacked)


class RolloutBatch(NamedTuple):
    """A flat batch of valid transitions (leading dimension = number of samples).

    ``observations`` is a tensor, or a dict of tensors (one per key) for a ``Dict``
    observation space; :meth:`index`, :meth:`slice`, :meth:`tensors` and :meth:`from_tensors`
    handle both, so no caller looks inside it.
    """

    observations: Observations
    actions: Tensor
    log_probs: Tensor
    values: Tensor
    advantages: Tensor
    returns: Tensor

    @property
    def size(self) -> int:
        """Number of samples."""
        return observation_count(self.observations)

    @property
    def device(self) -> torch.device:
        """Where the batch's tensors live."""
        return self.actions.device

    def map(self, fn: Callable[[Tensor], Tensor]) -> RolloutBatch:
        """``fn`` applied to every tensor of the batch (each observation key's included)."""
        return RolloutBatch(map_observations(fn, self.observations), *(fn(field) for field in self[1:]))

    def index(self, idx: Tensor) -> RolloutBatch:  # type: ignore[override]  # shadows tuple.index; callers rely on it
        """The samples at ``idx`` (a gather of every field)."""
        return self.map(lambda field: field[idx])

    def slice(self, start: int, stop: int) -> RolloutBatch:
        """The samples ``start:stop`` (views)."""
        return self.map(lambda field: field[start:stop])

    def tensors(self) -> list[Tensor]:
        """Every tensor of the batch, in a fixed order (observation keys sorted), for collectives."""
        return [*flatten_observations(self.observations), *self[1:]]

    def from_tensors(self, tensors: list[Tensor]) -> RolloutBatch:
        """A batch shaped like this one from :meth:`tensors`-ordered ``tensors`` (e.g. gathered ones)."""
        obs = self.observations
        n_obs = len(obs) if isinstance(obs, dict) else 1
        return RolloutBatch(unflatten_observations(obs, tensors[:n_obs]), *tensors[n_obs:])


class RolloutBuffer:
    """Preallocated on-policy storage with GAE.

    Args:
        n_steps: Steps per environment per rollout.
        n_envs: Number of parallel environments.
        obs_shape: Shape of one observation, or a dict of shapes (one per key) for a ``Dict`` space.
        action_shape: Shape of one action (``()`` for ``Discrete``).
        action_dtype: ``torch.long`` for discrete actions, ``torch.float32`` for Box.
        device: Where every tensor lives.
        obs_dtype: Storage dtype of observations (a dict of dtypes, by key, with a dict ``obs_shape``).
    """

    def __init__(
        self,
        n_steps: int,
        n_envs: int,
        obs_shape: tuple[int, ...] | dict[str, tuple[int, ...]],
        action_shape: tuple[int, ...],
        action_dtype: torch.dtype,
        device: torch.device | str = "cpu",
        obs_dtype: torch.dtype | dict[str, torch.dtype] = torch.float32,
    ) -> None:
        self.n_steps = check_int("n_steps", n_steps, minimum=1)
        self.n_envs = check_int("n_envs", n_envs, minimum=1)
        self.device = torch.device(device)
        shape = (n_steps, n_envs)

        def alloc(*extra: int, dtype: torch.dtype = torch.float32) -> Tensor:
            return torch.zeros(*shape, *extra, dtype=dtype, device=self.device)

        self.observations: Observations
        if isinstance(obs_shape, dict):
            dtypes = obs_dtype if isinstance(obs_dtype, dict) else dict.fromkeys(obs_shape, obs_dtype)
            self.observations = {key: alloc(*shape, dtype=dtypes[key]) for key, shape in obs_shape.items()}
        else:
            self.observations = alloc(*obs_shape, dtype=cast(torch.dtype, obs_dtype))
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
        self._numpy: dict[str, Any] | None = None
        """Numpy views of the CPU storage by field name (a dict of them, by key, for Dict observations)."""
        if self.device.type == "cpu":
            names = ("actions", "log_probs", "values", "rewards", "terminated", "truncated", "valid")
            self._numpy = {name: getattr(self, name).numpy() for name in names}
            obs = self.observations
            self._numpy["observations"] = (
                {key: value.numpy() for key, value in obs.items()} if isinstance(obs, dict) else obs.numpy()
            )

    @classmethod
    def for_spaces(
        cls,
        observation_space: gym.Space[Any],
        action_space: gym.Space[Any],
        n_steps: int,
        n_envs: int,
        device: torch.device | str = "cpu",
        max_memory: int | None = None,
    ) -> RolloutBuffer:
        """The buffer for one environment's spaces: ``Box`` observations as float32, except
        uint8 images (:func:`~trpo_lab.nn.extractors.is_image_space`), kept as uint8 (a
        quarter of the memory; the network scales them); ``Discrete`` ones as indices; a
        ``Dict`` of those as one tensor per key.

        Raises:
            ValueError: ``n_steps x n_envs`` slots do not fit in memory (``max_memory`` bytes,
                default: what the device has available), estimated before allocating
                (:func:`trpo_lab.resources.buffer_bytes`), or an observation space the
                native agents cannot store (a nested ``Dict``, a ``Tuple``, ...: the error names the key).
        """
        obs_shape: tuple[int, ...] | dict[str, tuple[int, ...]]
        obs_dtype: torch.dtype | dict[str, torch.dtype]
        if isinstance(observation_space, gym.spaces.Dict):
            check_observation_space(observation_space)
            specs = {str(key): _storage(space, str(key)) for key, space in observation_space.spaces.items()}
            obs_shape = {key: spec[0] for key, spec in specs.items()}
            obs_dtype = {key: spec[1] for key, spec in specs.items()}
        else:
            obs_shape, obs_dtype = _storage(observation_space)
        action_dtype = torch.float32 if isinstance(action_space, gym.spaces.Box) else torch.long
        what = f"a rollout buffer of n_steps x n_envs = {n_steps} x {n_envs} slots"
        per_step = resources.buffer_bytes(observation_space, action_space, 1, n_envs)

        def fits(limit: int) -> str | None:
            return f"n_steps {limit // per_step}" if limit >= per_step else None

        needed = resources.buffer_bytes(observation_space, action_space, n_steps, n_envs)
        resources.check_memory(needed, what, "n_steps", n_steps, device, max_memory, fits)
        try:
            return cls(
                n_steps, n_envs, obs_shape, tuple(action_space.shape or ()), action_dtype, device,
                obs_dtype=obs_dtype,
            )
        except RuntimeError:  # out of memory although the estimate fitted (memory taken meanwhile)
            raise ValueError(
                f"Invalid n_steps: {n_steps}; {what} (an estimated {resources.format_bytes(needed)}) "
                f"could not be allocated on {torch.device(device)}; lower n_steps or n_envs"
            ) from None

    def _store(self, t: int, obs: Any) -> None:
        """Write one step's observations (numpy or tensors, a dict of them for Dict spaces) into slot ``t``."""
        if isinstance(self.observations, dict):
            if not isinstance(obs, dict):
                raise TypeError(f"Expected a dict of observations with keys {sorted(self.observations)}, got {type(obs)}")
            for key, storage in self.observations.items():
                numpy_view = None if self._numpy is None else self._numpy["observations"][key]
                _write(storage, numpy_view, t, obs[key])
        else:
            _write(self.observations, None if self._numpy is None else self._numpy["observations"], t, obs)

    @property
    def full(self) -> bool:
        """Whether all ``n_steps`` steps are stored."""
        return self.pos == self.n_steps

    def reset(self) -> None:
        """Start a new rollout (the storage is reused)."""
        self.pos = 0

    def add(
        self,
        obs: Tensor | NDArray[Any] | dict[str, Any] | None,
        actions: Tensor | NDArray[Any],
        log_probs: Tensor | NDArray[Any],
        values: Tensor | NDArray[Any],
        rewards: Tensor | NDArray[Any],
        terminated: Tensor | NDArray[Any],
        truncated: Tensor | NDArray[Any],
        valid: Tensor | NDArray[Any],
    ) -> None:
        """Store one vectorized step (each argument has leading dimension ``n_envs``).

        Numpy arrays (straight from the environment, or from the numpy acting path) are
        accepted; on the CPU they are written through numpy views of the storage (no tensor
        conversion per step). ``obs`` is a dict of them (by key) for a Dict observation space;
        ``obs=None`` means it was stored by :meth:`put_observation`.
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
            if value is None:
                continue
            if name == "observations":
                self._store(t, value)
            elif isinstance(value, np.ndarray):
                if self._numpy is not None:
                    self._numpy[name][t] = value
                else:
                    getattr(self, name)[t] = torch.as_tensor(value, device=self.device)
            else:
                getattr(self, name)[t] = value
        self.pos += 1

    def put_observation(self, obs: Any) -> Any:
        """Store the observation of the current step and return the stored slot, without a copy:
        a numpy view on the CPU, a tensor on the device elsewhere (a dict of them, by key, for
        Dict observations; then pass ``obs=None`` to :meth:`add`). A torch env's tensors are
        stored as they are and read back as device tensors."""
        t = self.pos
        self._store(t, obs)
        if self._numpy is None or isinstance(obs, Tensor) or (isinstance(obs, dict) and isinstance(_first(obs), Tensor)):
            return map_observations(lambda storage: storage[t], self.observations)
        views = self._numpy["observations"]
        if isinstance(views, dict):
            return {key: view[t] for key, view in views.items()}
        return views[t]

    def mark_truncated(self, step: int, envs: NDArray[np.bool_]) -> None:
        """Mark step ``step`` of the environments in the mask ``envs`` as truncated (its
        advantage then bootstraps from the next slot's value instead of running through it)."""
        self.truncated[step, torch.as_tensor(envs, device=self.device)] = True

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
        """Number of valid slots (one host sync)."""
        return int(self.valid.sum())

    def batch(self) -> RolloutBatch:
        """All valid transitions, flattened in (step, env) order."""
        mask = self.valid.reshape(-1)
        idx = torch.nonzero(mask).squeeze(-1)

        def flat(x: Tensor) -> Tensor:
            return x.reshape(self.n_steps * self.n_envs, *x.shape[2:])[idx]

        return RolloutBatch(
            observations=map_observations(flat, self.observations),
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
    check_int("batch_size", batch_size, minimum=1, expected=">= 1")
    perm = torch.randperm(n, generator=generator, device="cpu").to(batch.device)
    shuffled = batch.index(perm)  # one gather per field; the minibatches are views of it
    for start in range(0, n, batch_size):
        yield shuffled.slice(start, start + batch_size)


def _storage(space: gym.Space[Any], key: str | None = None) -> tuple[tuple[int, ...], torch.dtype]:
    """``(shape, dtype)`` of one stored observation of ``space`` (a Box or a Discrete)."""
    if isinstance(space, gym.spaces.Discrete):
        return (), torch.long
    if isinstance(space, gym.spaces.Box):
        dtype = torch.uint8 if is_image_space(space, normalize_images=False) else torch.float32
        return tuple(space.shape), dtype
    where = f" at key {key!r}" if key is not None else ""
    raise ValueError(
        f"Unsupported observation space {space}{where} for the native agents' rollout buffer; "
        "supported: Box and Discrete (flat, or uint8 images), or a Dict of those (not nested)"
    )


def _write(storage: Tensor, numpy_view: NDArray[Any] | None, t: int, value: Any) -> None:
    """``storage[t] = value``: through the numpy view on the CPU for numpy values, else as a tensor."""
    if isinstance(value, np.ndarray) and numpy_view is not None:
        numpy_view[t] = value
    elif isinstance(value, Tensor):
        storage[t] = value
    else:
        storage[t] = torch.as_tensor(np.asarray(value), device=storage.device)

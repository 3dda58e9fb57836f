"""The rollout's acting paths, derived from :class:`~trpo_lab.nn.policy.ActorCritic`'s one definition.

A rollout step feeds the policy one observation per environment, a batch so small that
per-operator overhead, not arithmetic, sets the cost. So the rollout acts through a
:class:`RolloutActor` built from a snapshot of the current weights (build another after an
update), behind one interface, ``act(obs) -> (actions, log_probs, values)`` and
``values(obs)``:

* :class:`TorchActor` (any device) runs :func:`~trpo_lab.nn.policy.mlp_forward` over
  block-diagonal stacks of the actor's and critic's layers (layer 1 stacks both input
  matrices, deeper layers are block-diagonal, and the Gaussian ``log_std`` is folded into
  the last layer as zero-weight rows), so one pass computes both networks; where the two
  networks cannot be stacked (other depths) it calls the reference methods;
* :class:`NumpyActor` (CPU) runs the same stacked layers in numpy, whose per-call overhead
  is far below torch's, with the distribution's numpy sampling formula.

Both consume the same noise, a :class:`NoiseStream` drawn in chunks from one CPU torch
generator, so the actions of a seed do not depend on which path acts: same noise, same
actions, and log-probabilities and values equal to the reference to float rounding
(``tests/nn/test_acting.py``).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from trpo_lab.nn.distributions import ActionDistribution
from trpo_lab.nn.extractors import FlattenExtractor, as_tensors
from trpo_lab.nn.policy import ActorCritic, Layer, mlp_forward
from trpo_lab.optim._flat import to_device_async
from trpo_lab.validation import check_int

__all__ = [
    "NoiseStream",
    "RolloutActor",
    "TorchActor",
    "NumpyActor",
    "make_actor",
    "numpy_support",
    "stacked_layers",
]

Array = Tensor | NDArray[Any]


class NoiseStream:
    """The sampling noise of one rollout, drawn in chunks from one CPU torch generator.

    Each call of :meth:`next_array` / :meth:`next_tensor` returns the noise of one step,
    ``(n_envs, distribution.noise_dim)``. The chunk size depends only on ``n_envs``,
    ``n_steps`` and the noise width, so the stream of a seed is the same whatever acts on it.

    Args:
        distribution: The policy's action distribution (it draws the noise).
        generator: A CPU ``torch.Generator``.
        n_envs: Rows per step.
        n_steps: Steps of the rollout (chunks hold at most this many steps).

    Raises:
        ValueError: a generator that is not on the CPU, or a size below 1.
    """

    CHUNK_ELEMENTS = 1 << 16
    """Noise values drawn per refill (at least one step's worth)."""

    def __init__(self, distribution: ActionDistribution, generator: torch.Generator, n_envs: int, n_steps: int) -> None:
        if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise ValueError(
                f"Invalid generator: {generator!r}; expected a CPU torch.Generator (one noise stream whatever the device)"
            )
        self.distribution = distribution
        self.generator = generator
        self.n_envs = check_int("n_envs", n_envs, minimum=1)
        n_steps = check_int("n_steps", n_steps, minimum=1)
        step_elements = self.n_envs * max(1, distribution.noise_dim)
        self.chunk_steps = max(1, min(n_steps, self.CHUNK_ELEMENTS // step_elements))
        self._chunk = torch.empty(0)
        self._array: NDArray[np.float32] = np.empty((0, self.n_envs, distribution.noise_dim), np.float32)
        self._on_device: Tensor | None = None
        self._next = 0

    def _advance(self) -> int:
        if self._next == len(self._array):
            self._chunk = self.distribution.draw_noise((self.chunk_steps, self.n_envs), self.generator)
            self._array = self._chunk.numpy()
            self._on_device = None
            self._next = 0
        self._next += 1
        return self._next - 1

    def next_array(self) -> NDArray[np.float32]:
        """The next step's noise as a numpy array."""
        step = self._advance()
        row: NDArray[np.float32] = self._array[step]
        return row

    def next_tensor(self, device: torch.device) -> Tensor:
        """The next step's noise as a tensor on ``device`` (one copy per chunk)."""
        step = self._advance()
        if self._on_device is None:
            self._on_device = to_device_async(self._chunk, device)  # pinned: the host does not wait
        return self._on_device[step]


class RolloutActor(Protocol):
    """What the rollout acts through: numpy arrays or tensors in, the same kind out."""

    def act(self, obs: Array) -> tuple[Array, Array, Array]:
        """Sampled ``(actions, log_probs, values)`` for a batch of raw observations (one per env)."""
        ...

    def values(self, obs: Array) -> Array:
        """State values ``(batch,)`` of raw observations."""
        ...


def _stackable(policy: ActorCritic) -> bool:
    """Whether actor and critic can run as one block-diagonal pass: same depth and the same
    parameter-free activation."""
    kinds = {type(m) for m in (*policy.actor, *policy.critic) if not isinstance(m, nn.Linear)}
    free = all(not list(m.parameters()) for m in (*policy.actor, *policy.critic) if not isinstance(m, nn.Linear))
    return len(policy.actor_linears) == len(policy.critic_linears) and len(kinds) <= 1 and free


def _with_log_std(layers: list[Layer], log_std: Tensor | None, at: int) -> list[Layer]:
    """``layers`` whose last layer also outputs ``log_std`` (zero weights), inserted at row ``at``."""
    if log_std is None:
        return layers
    weight, bias = layers[-1]
    zeros = weight.new_zeros(log_std.shape[0], weight.shape[1])
    weight = torch.cat([weight[:at], zeros, weight[at:]])
    bias = torch.cat([bias[:at], log_std.to(bias.dtype), bias[at:]])
    return [*layers[:-1], (weight, bias)]


def stacked_layers(policy: ActorCritic, fold_log_std: bool = True) -> list[list[Layer]]:
    """Detached copies of the policy's layers as passes whose outputs, concatenated, are
    ``[dist_params, value]`` (``[actor_out, value]`` without ``fold_log_std``): one
    block-diagonal pass where :func:`_stackable`, else the actor's pass and the critic's."""
    with torch.no_grad():
        actor = [(w.detach().clone(), b.detach().clone()) for w, b in policy.actor_layers()]
        critic = [(w.detach().clone(), b.detach().clone()) for w, b in policy.critic_layers()]
        log_std = policy.log_std.detach() if policy.log_std is not None and fold_log_std else None
        n_actor_out = actor[-1][0].shape[0]
        if not _stackable(policy):
            return [_with_log_std(actor, log_std, n_actor_out), critic]
        stacked: list[Layer] = []
        for i, ((wa, ba), (wc, bc)) in enumerate(zip(actor, critic)):
            weight = torch.cat([wa, wc]) if i == 0 else _block_diag(wa, wc)
            stacked.append((weight, torch.cat([ba, bc])))
        return [_with_log_std(stacked, log_std, n_actor_out)]


def _block_diag(a: Tensor, b: Tensor) -> Tensor:
    """``[[a, 0], [0, b]]``."""
    out = a.new_zeros(a.shape[0] + b.shape[0], a.shape[1] + b.shape[1])
    out[: a.shape[0], : a.shape[1]] = a
    out[a.shape[0] :, a.shape[1] :] = b
    return out


class TorchActor:
    """The rollout's torch acting path (any device): :func:`stacked_layers` through
    :func:`~trpo_lab.nn.policy.mlp_forward`, sampling with :meth:`ActionDistribution.sample_from_noise`.

    A policy whose extractors have parameters (images, Dict observations) acts through its
    reference :meth:`~trpo_lab.nn.policy.ActorCritic.forward` instead: the convolutions,
    not the per-call overhead, set the cost there."""

    def __init__(self, policy: ActorCritic, noise: NoiseStream) -> None:
        self._reference: ActorCritic | None = None if policy.flat_features else policy
        self.extractor = policy.features_extractor
        self.distribution = policy.distribution
        self.noise = noise
        self.device = next(policy.parameters()).device
        self.param_dim = policy.distribution.param_dim
        self._passes = stacked_layers(policy)
        self._activations = [policy.actor_activations, policy.critic_activations][: len(self._passes)]

    def _forward(self, obs: Array) -> tuple[Tensor, Tensor]:
        if self._reference is not None:
            params, values = self._reference(as_tensors(obs, self.device))
            return params, values
        x = self.extractor(torch.as_tensor(obs, device=self.device))
        if len(self._passes) == 1:
            out = mlp_forward(self._passes[0], self._activations[0], x)
            return out[:, : self.param_dim], out[:, self.param_dim]
        params = mlp_forward(self._passes[0], self._activations[0], x)
        return params, mlp_forward(self._passes[1], self._activations[1], x)[:, 0]

    def act(self, obs: Array) -> tuple[Tensor, Tensor, Tensor]:
        params, values = self._forward(obs)
        actions, log_probs = self.distribution.sample_from_noise(params, self.noise.next_tensor(self.device))
        return actions, log_probs, values

    def values(self, obs: Array) -> Tensor:
        return self._forward(obs)[1]


def _tanh_(x: NDArray[Any]) -> None:
    np.tanh(x, out=x)


def _relu_(x: NDArray[Any]) -> None:
    np.maximum(x, 0.0, out=x)


_NUMPY_ACTIVATIONS = {nn.Tanh: _tanh_, nn.ReLU: _relu_}


def numpy_support(policy: ActorCritic) -> str | None:
    """Why :class:`NumpyActor` cannot run ``policy``, or None when it can."""
    params = list(policy.parameters())
    if any(p.device.type != "cpu" for p in params):
        return "the parameters are not on the CPU"
    if any(p.dtype not in (torch.float32, torch.float64) for p in params):
        return "the parameters are not float32 or float64"
    if not isinstance(policy.features_extractor, FlattenExtractor):
        return f"numpy has no {type(policy.features_extractor).__name__}"
    kinds = {type(m) for m in (*policy.actor, *policy.critic) if not isinstance(m, nn.Linear)}
    if not kinds <= set(_NUMPY_ACTIVATIONS):
        return f"numpy has no {sorted(k.__name__ for k in kinds - set(_NUMPY_ACTIVATIONS))} activation"
    return None


class NumpyActor:
    """The CPU rollout's numpy acting path: :func:`stacked_layers` as numpy matrices, features
    by :meth:`FlattenExtractor.forward_numpy`, sampling by the distribution's numpy formula
    (:meth:`~trpo_lab.nn.distributions.ActionDistribution.numpy_sampler`)."""

    def __init__(self, policy: ActorCritic, noise: NoiseStream) -> None:
        reason = numpy_support(policy)
        if reason is not None:
            raise ValueError(f"Invalid backend: 'numpy' for this policy; {reason} (use 'torch' or 'auto')")
        assert isinstance(policy.features_extractor, FlattenExtractor)
        self.extractor = policy.features_extractor
        self.distribution = policy.distribution
        self.noise = noise
        self.param_dim = policy.actor_linears[-1].out_features
        stacked = stacked_layers(policy, fold_log_std=False)
        self._passes = [[(w.numpy().T.copy(), b.numpy().copy()) for w, b in layers] for layers in stacked]
        log_std = policy.log_std.detach().numpy().copy() if policy.log_std is not None else None
        self._sample = policy.distribution.numpy_sampler(log_std)
        kind = next((type(m) for m in policy.actor if not isinstance(m, nn.Linear)), nn.Tanh)
        self._activation = _NUMPY_ACTIVATIONS[kind]

    def _mlp(self, layers: list[tuple[NDArray[Any], NDArray[Any]]], x: NDArray[Any]) -> NDArray[Any]:
        # mlp_forward, in numpy and in place (x @ W^T + b with W^T stored)
        for weight, bias in layers[:-1]:
            x = x @ weight
            x += bias
            self._activation(x)
        weight, bias = layers[-1]
        out: NDArray[Any] = x @ weight
        out += bias
        return out

    def _forward(self, obs: Array) -> tuple[NDArray[Any], NDArray[Any]]:
        x = self.extractor.forward_numpy(obs if isinstance(obs, np.ndarray) else obs.numpy())
        if len(self._passes) == 1:
            out = self._mlp(self._passes[0], x)
            return out[:, : self.param_dim], out[:, self.param_dim]
        return self._mlp(self._passes[0], x), self._mlp(self._passes[1], x)[:, 0]

    def act(self, obs: Array) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
        params, values = self._forward(obs)
        actions, log_probs = self._sample(params, self.noise.next_array())
        return actions, log_probs, values

    def values(self, obs: Array) -> NDArray[Any]:
        values: NDArray[Any] = self._forward(obs)[1].copy()
        return values


def make_actor(policy: ActorCritic, noise: NoiseStream, backend: str = "auto") -> RolloutActor:
    """The rollout's acting path for ``policy``, from a snapshot of its current weights.

    Args:
        policy: The policy.
        noise: Where the sampling noise comes from.
        backend: ``"numpy"``, ``"torch"``, or ``"auto"`` (default): numpy where
            :func:`numpy_support` allows it, else torch.

    Raises:
        ValueError: an unknown backend, or ``"numpy"`` for a policy it cannot run.
    """
    if backend not in ("auto", "numpy", "torch"):
        raise ValueError(f"Invalid backend: {backend!r}; expected 'auto', 'numpy' or 'torch'")
    if backend == "numpy" or (backend == "auto" and numpy_support(policy) is None):
        return NumpyActor(policy, noise)
    return TorchActor(policy, noise)

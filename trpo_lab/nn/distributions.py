"""Action distributions over one parameter tensor, with analytic KL and noise-driven sampling.

A distribution is a stateless object that works on a single *parameter tensor* per batch
(logits for categorical actions, ``[mean, log_std]`` for Gaussians). That keeps the rollout
free of ``torch.distributions`` bookkeeping, makes the old policy a plain detached tensor
for KL computations, and works unchanged under ``torch.func.vmap`` (the batched line search).

Sampling is split in two so that every acting path consumes the same random numbers:
:meth:`ActionDistribution.draw_noise` draws the noise (from one torch generator), and
:meth:`ActionDistribution.sample_from_noise` turns parameters and noise into actions and
their log-probabilities. For categorical actions the noise is Gumbel, ``G = -log E`` with
``E ~ Exp(1)``, and the action is ``argmax(log p + G)`` (the Gumbel-max trick: a sample of
``Categorical(p)``); for Gaussian actions it is ``z ~ N(0, I)`` and the action
``mean + exp(log_std) * z``, whose log-probability is ``Σ(-z²/2 - log std - log √(2π))``.
:meth:`ActionDistribution.sample_from_noise_numpy` is the same formula on numpy arrays, for
the CPU rollout (tested equal to the torch one).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import gymnasium as gym
import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

__all__ = [
    "ActionDistribution",
    "Categorical",
    "MultiCategorical",
    "DiagGaussian",
    "make_distribution",
    "check_start",
]

FloatArray = NDArray[np.floating]
NumpySampler = Callable[[FloatArray, FloatArray], tuple[NDArray[np.generic], FloatArray]]
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


class ActionDistribution(ABC):
    """A distribution parametrised by one tensor of shape ``(batch, param_dim)``.

    Attributes:
        param_dim: Width of the parameter tensor.
        noise_dim: Width of the noise one action consumes (see :meth:`draw_noise`).
    """

    param_dim: int
    noise_dim: int

    @abstractmethod
    def draw_noise(self, shape: Sequence[int], generator: torch.Generator | None = None) -> Tensor:
        """Noise of shape ``(*shape, noise_dim)`` in float32 on ``generator``'s device (CPU without one)."""

    @abstractmethod
    def sample_from_noise(self, params: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """``(actions, log_probs)`` of the actions that ``noise`` selects under ``params``."""

    @abstractmethod
    def sample_from_noise_numpy(self, params: FloatArray, noise: FloatArray) -> tuple[NDArray[np.generic], FloatArray]:
        """:meth:`sample_from_noise` on numpy arrays (the CPU rollout); ``params`` may be overwritten."""

    def numpy_sampler(self, log_std: FloatArray | None) -> NumpySampler:
        """:meth:`sample_from_noise_numpy` for a policy's head output (logits, or Gaussian means
        whose state-independent ``log_std`` is given here, so that its terms are computed once)."""
        return self.sample_from_noise_numpy

    def sample_with_log_prob(self, params: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(actions, log_probs)`` with fresh noise from ``generator``.

        The noise is drawn on the generator's device and moved to the parameters' one, so a
        CPU generator gives the same actions whatever device the policy is on.
        """
        noise = self.draw_noise(params.shape[:-1], generator)
        if noise.device != params.device:
            noise = noise.to(params.device, non_blocking=True)
        return self.sample_from_noise(params, noise)

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One action per row of ``params``."""
        return self.sample_with_log_prob(params, generator)[0]

    @abstractmethod
    def mode(self, params: Tensor) -> Tensor:
        """Most likely action per row."""

    @abstractmethod
    def log_prob(self, params: Tensor, actions: Tensor) -> Tensor:
        """Per-sample log-probability of ``actions``."""

    @abstractmethod
    def entropy(self, params: Tensor) -> Tensor:
        """Per-sample entropy."""

    @abstractmethod
    def kl(self, old_params: Tensor, new_params: Tensor) -> Tensor:
        """Per-sample analytic KL(old || new)."""

    def log_prob_entropy_by_hand(self, params: Tensor, actions: Tensor) -> LogProbEntropyVJP | None:
        """:meth:`log_prob` and :meth:`entropy` of (graph-free) ``params`` with their
        vector-Jacobian product written out, ``vjp(grad_log_probs, grad_entropy) -> grad_params``
        (all per sample); None where it is not written (the caller then takes autograd).
        Tested equal to autograd's."""
        return None


LogProbEntropyVJP = tuple[Tensor, Tensor, Callable[[Tensor, Tensor], Tensor]]
"""``(log_probs, entropy, vjp)`` of :meth:`ActionDistribution.log_prob_entropy_by_hand`."""


def _gumbel(shape: Sequence[int], generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else torch.device("cpu")
    exponential = torch.empty(tuple(shape), device=device).exponential_(generator=generator)
    return exponential.log_().neg_()


def _gumbel_max(logits: Tensor, gumbel: Tensor) -> tuple[Tensor, Tensor]:
    log_p = torch.log_softmax(logits, dim=-1)
    actions = torch.argmax(log_p + gumbel, dim=-1)
    return actions, log_p.gather(-1, actions.unsqueeze(-1)).squeeze(-1)


def _gumbel_max_numpy(logits: FloatArray, gumbel: FloatArray) -> tuple[NDArray[np.int64], FloatArray]:
    # argmax(log p + G) = argmax(logits - max + G): log p differs by a constant per row
    logits -= logits.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(logits).sum(axis=-1))
    actions = np.argmax(logits + gumbel, axis=-1)
    log_probs: FloatArray = logits[np.arange(len(actions)), actions] - log_norm
    return actions, log_probs


def _categorical_kl(old_logits: Tensor, new_logits: Tensor) -> Tensor:
    old_log_p = torch.log_softmax(old_logits, dim=-1)
    new_log_p = torch.log_softmax(new_logits, dim=-1)
    return (old_log_p.exp() * (old_log_p - new_log_p)).sum(-1)


def _categorical_entropy(logits: Tensor) -> Tensor:
    log_p = torch.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


class Categorical(ActionDistribution):
    """Softmax distribution over ``n`` actions; params are logits ``(batch, n)``."""

    def __init__(self, n: int) -> None:
        self.param_dim = self.noise_dim = int(n)

    def draw_noise(self, shape: Sequence[int], generator: torch.Generator | None = None) -> Tensor:
        return _gumbel((*shape, self.noise_dim), generator)

    def sample_from_noise(self, params: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        return _gumbel_max(params, noise)

    def sample_from_noise_numpy(self, params: FloatArray, noise: FloatArray) -> tuple[NDArray[np.generic], FloatArray]:
        return _gumbel_max_numpy(params, noise)

    def mode(self, params: Tensor) -> Tensor:
        return torch.argmax(params, dim=-1)

    def log_prob(self, params: Tensor, actions: Tensor) -> Tensor:
        log_p = torch.log_softmax(params, dim=-1)
        return log_p.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)

    def entropy(self, params: Tensor) -> Tensor:
        return _categorical_entropy(params)

    def log_prob_entropy_by_hand(self, params: Tensor, actions: Tensor) -> LogProbEntropyVJP:
        # ∂ log p_a / ∂l = onehot(a) − p;  ∂H/∂l = −p ⊙ (log p + H)
        with torch.no_grad():
            log_p = torch.log_softmax(params, dim=-1)
            probs = log_p.exp()
            index = actions.long().unsqueeze(-1)
            log_probs = log_p.gather(-1, index).squeeze(-1)
            entropy = -(probs * log_p).sum(-1)

        def vjp(grad_log_probs: Tensor, grad_entropy: Tensor) -> Tensor:
            with torch.no_grad():
                weights = (log_p + entropy.unsqueeze(-1)).mul_(grad_entropy.unsqueeze(-1))
                grad = probs.mul(weights.add_(grad_log_probs.unsqueeze(-1))).neg_()
                return grad.scatter_add_(-1, index, grad_log_probs.unsqueeze(-1))

        return log_probs, entropy, vjp

    def kl(self, old_params: Tensor, new_params: Tensor) -> Tensor:
        return _categorical_kl(old_params, new_params)


class MultiCategorical(ActionDistribution):
    """Independent categoricals for a ``MultiDiscrete`` space; params are concatenated logits."""

    def __init__(self, nvec: Sequence[int]) -> None:
        self.nvec = [int(n) for n in nvec]
        self.param_dim = self.noise_dim = sum(self.nvec)
        self._bounds = np.cumsum([0, *self.nvec]).tolist()

    def _split(self, params: Tensor) -> tuple[Tensor, ...]:
        return torch.split(params, self.nvec, dim=-1)

    def draw_noise(self, shape: Sequence[int], generator: torch.Generator | None = None) -> Tensor:
        return _gumbel((*shape, self.noise_dim), generator)

    def sample_from_noise(self, params: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        parts = [_gumbel_max(lg, g) for lg, g in zip(self._split(params), self._split(noise))]
        actions = torch.stack([a for a, _ in parts], dim=-1)
        return actions, torch.stack([lp for _, lp in parts], dim=-1).sum(-1)

    def sample_from_noise_numpy(self, params: FloatArray, noise: FloatArray) -> tuple[NDArray[np.generic], FloatArray]:
        spans = list(zip(self._bounds[:-1], self._bounds[1:]))
        parts = [_gumbel_max_numpy(params[:, a:b], noise[:, a:b]) for a, b in spans]
        actions = np.stack([a for a, _ in parts], axis=-1)
        return actions, np.stack([lp for _, lp in parts], axis=-1).sum(-1)

    def mode(self, params: Tensor) -> Tensor:
        return torch.stack([torch.argmax(lg, dim=-1) for lg in self._split(params)], dim=-1)

    def log_prob(self, params: Tensor, actions: Tensor) -> Tensor:
        actions = actions.long()
        total = torch.zeros(params.shape[:-1], device=params.device, dtype=params.dtype)
        for i, logits in enumerate(self._split(params)):
            log_p = torch.log_softmax(logits, dim=-1)
            total = total + log_p.gather(-1, actions[..., i : i + 1]).squeeze(-1)
        return total

    def entropy(self, params: Tensor) -> Tensor:
        return torch.stack([_categorical_entropy(lg) for lg in self._split(params)], dim=-1).sum(-1)

    def kl(self, old_params: Tensor, new_params: Tensor) -> Tensor:
        pairs = zip(self._split(old_params), self._split(new_params))
        return torch.stack([_categorical_kl(o, n) for o, n in pairs], dim=-1).sum(-1)


class DiagGaussian(ActionDistribution):
    """Diagonal Gaussian; params are ``[mean, log_std]`` concatenated, ``(batch, 2 * dim)``."""

    def __init__(self, dim: int) -> None:
        self.dim = self.noise_dim = int(dim)
        self.param_dim = 2 * self.dim

    def _split(self, params: Tensor) -> tuple[Tensor, Tensor]:
        return params[..., : self.dim], params[..., self.dim :]

    def draw_noise(self, shape: Sequence[int], generator: torch.Generator | None = None) -> Tensor:
        device = generator.device if generator is not None else torch.device("cpu")
        return torch.randn((*shape, self.noise_dim), generator=generator, device=device)

    def sample_from_noise(self, params: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        mean, log_std = self._split(params)
        actions = mean + noise * log_std.exp()
        return actions, (-0.5 * noise.square() - log_std - _LOG_SQRT_2PI).sum(-1)

    def sample_from_noise_numpy(self, params: FloatArray, noise: FloatArray) -> tuple[NDArray[np.generic], FloatArray]:
        mean, log_std = params[:, : self.dim], params[:, self.dim :]
        actions = mean + noise * np.exp(log_std)
        log_probs = -0.5 * np.einsum("ij,ij->i", noise, noise) - (log_std.sum(-1) + self.dim * _LOG_SQRT_2PI)
        return actions, log_probs.astype(params.dtype, copy=False)

    def numpy_sampler(self, log_std: FloatArray | None) -> NumpySampler:
        if log_std is None:
            return self.sample_from_noise_numpy
        std = np.exp(log_std)
        constant = (-(log_std.sum() + self.dim * _LOG_SQRT_2PI)).astype(log_std.dtype)

        def sample(means: FloatArray, noise: FloatArray) -> tuple[NDArray[np.generic], FloatArray]:
            log_probs: FloatArray = -0.5 * np.einsum("ij,ij->i", noise, noise) + constant
            return means + noise * std, log_probs

        return sample

    def mode(self, params: Tensor) -> Tensor:
        return self._split(params)[0]

    def log_prob(self, params: Tensor, actions: Tensor) -> Tensor:
        mean, log_std = self._split(params)
        z = (actions - mean) * torch.exp(-log_std)
        return (-0.5 * z.square() - log_std - _LOG_SQRT_2PI).sum(-1)

    def entropy(self, params: Tensor) -> Tensor:
        log_std = self._split(params)[1]
        return (log_std + 0.5 + _LOG_SQRT_2PI).sum(-1)

    def log_prob_entropy_by_hand(self, params: Tensor, actions: Tensor) -> LogProbEntropyVJP:
        # with z = (a − μ) e^{−s}: ∂ log p/∂μ = z e^{−s}, ∂ log p/∂s = z² − 1, ∂H/∂s = 1
        with torch.no_grad():
            mean, log_std = self._split(params)
            inv_std = torch.exp(-log_std)
            z = (actions - mean) * inv_std
            log_probs = (-0.5 * z.square() - log_std - _LOG_SQRT_2PI).sum(-1)
            entropy = (log_std + 0.5 + _LOG_SQRT_2PI).sum(-1)

        def vjp(grad_log_probs: Tensor, grad_entropy: Tensor) -> Tensor:
            with torch.no_grad():
                weight = grad_log_probs.unsqueeze(-1)
                grad_mean = z * inv_std * weight
                grad_log_std = (z.square() - 1.0).mul_(weight).add_(grad_entropy.unsqueeze(-1))
                return torch.cat([grad_mean, grad_log_std], dim=-1)

        return log_probs, entropy, vjp

    def kl(self, old_params: Tensor, new_params: Tensor) -> Tensor:
        # KL(N(m0, s0^2) || N(m1, s1^2)) = log(s1/s0) + (s0^2 + (m0 - m1)^2) / (2 s1^2) - 1/2
        mean0, log_std0 = self._split(old_params)
        mean1, log_std1 = self._split(new_params)
        var_ratio = torch.exp(2.0 * (log_std0 - log_std1))
        diff = (mean0 - mean1) * torch.exp(-log_std1)
        return (log_std1 - log_std0 + 0.5 * (var_ratio + diff.square()) - 0.5).sum(-1)


def make_distribution(action_space: gym.Space) -> ActionDistribution:  # type: ignore[type-arg]
    """The action distribution for a Gymnasium action space.

    Raises:
        ValueError: for spaces other than ``Discrete``, ``Box`` and ``MultiDiscrete`` (and for
            those with a nonzero ``start``: the policy samples 0..n-1).
    """
    if isinstance(action_space, gym.spaces.Discrete):
        check_start(action_space, "action")
        return Categorical(int(action_space.n))
    if isinstance(action_space, gym.spaces.MultiDiscrete):
        if np.asarray(action_space.nvec).ndim != 1:
            raise ValueError(f"Unsupported action space {action_space}: MultiDiscrete must be one-dimensional")
        check_start(action_space, "action")
        return MultiCategorical([int(n) for n in np.asarray(action_space.nvec)])
    if isinstance(action_space, gym.spaces.Box):
        if len(action_space.shape) != 1:
            raise ValueError(f"Unsupported action space {action_space}: Box actions must be one-dimensional")
        return DiagGaussian(int(action_space.shape[0]))
    raise ValueError(
        f"Unsupported action space {action_space}; supported: Discrete, Box (1-D) and MultiDiscrete"
    )


def check_start(space: gym.spaces.Discrete | gym.spaces.MultiDiscrete, kind: str) -> None:
    """Refuse a ``Discrete`` / ``MultiDiscrete`` space that does not start at 0.

    Raises:
        ValueError: naming the space and its ``start``.
    """
    if np.any(np.asarray(space.start) != 0):
        raise ValueError(
            f"Unsupported {kind} space {space}: start={space.start}; supported: Discrete / MultiDiscrete "
            "starting at 0 (wrap the env to shift its values)"
        )

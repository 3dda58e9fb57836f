"""Actor-critic networks and action distributions.

Distributions are stateless objects that work on a single *parameter tensor* per
batch (logits for categorical actions, ``[mean, log_std]`` for Gaussians).  That
keeps the hot rollout loop free of ``torch.distributions`` bookkeeping, makes the
old policy a plain detached tensor for KL computations, and works unchanged under
``torch.func.vmap`` (the batched line search).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "ActionDistribution",
    "Categorical",
    "DiagGaussian",
    "MultiCategorical",
    "ActorCritic",
    "FusedActorCritic",
    "NumpyRolloutPolicy",
    "make_distribution",
    "validate_policy_kwargs",
    "ACTIVATIONS",
]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
}


class ActionDistribution(ABC):
    """Interface of a distribution parametrised by one tensor of shape ``(batch, param_dim)``."""

    param_dim: int

    @abstractmethod
    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw one action per row of ``params``."""

    def sample_with_log_prob(self, params: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(actions, log_probs)`` in one go (the rollout's hot path)."""
        actions = self.sample(params, generator)
        return actions, self.log_prob(params, actions)

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


def _categorical_sample(logits: Tensor, generator: torch.Generator | None) -> Tensor:
    return _sample_from_probs(torch.softmax(logits, dim=-1), generator)


def _sample_from_probs(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    # Exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) is distributed as Categorical(p)
    # (the Gumbel-max trick without the two logarithms); cheaper than torch.multinomial.
    race = torch.empty_like(probs).exponential_(generator=generator)
    return torch.argmax(probs / race, dim=-1)


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
        self.param_dim = n

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return _categorical_sample(params, generator)

    def sample_with_log_prob(self, params: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        log_p = torch.log_softmax(params, dim=-1)
        actions = _sample_from_probs(log_p.exp(), generator)
        return actions, log_p.gather(-1, actions.unsqueeze(-1)).squeeze(-1)

    def mode(self, params: Tensor) -> Tensor:
        return torch.argmax(params, dim=-1)

    def log_prob(self, params: Tensor, actions: Tensor) -> Tensor:
        log_p = torch.log_softmax(params, dim=-1)
        return log_p.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)

    def entropy(self, params: Tensor) -> Tensor:
        return _categorical_entropy(params)

    def kl(self, old_params: Tensor, new_params: Tensor) -> Tensor:
        return _categorical_kl(old_params, new_params)


class MultiCategorical(ActionDistribution):
    """Independent categoricals for a ``MultiDiscrete`` space; params are concatenated logits."""

    def __init__(self, nvec: Sequence[int]) -> None:
        self.nvec = [int(n) for n in nvec]
        self.param_dim = sum(self.nvec)

    def _split(self, params: Tensor) -> tuple[Tensor, ...]:
        return torch.split(params, self.nvec, dim=-1)

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return torch.stack([_categorical_sample(lg, generator) for lg in self._split(params)], dim=-1)

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


_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


class DiagGaussian(ActionDistribution):
    """Diagonal Gaussian; params are ``[mean, log_std]`` concatenated, ``(batch, 2 * dim)``."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.param_dim = 2 * dim

    def _split(self, params: Tensor) -> tuple[Tensor, Tensor]:
        return params[..., : self.dim], params[..., self.dim :]

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        mean, log_std = self._split(params)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + noise * log_std.exp()

    def mode(self, params: Tensor) -> Tensor:
        return self._split(params)[0]

    def log_prob(self, params: Tensor, actions: Tensor) -> Tensor:
        mean, log_std = self._split(params)
        z = (actions - mean) * torch.exp(-log_std)
        return (-0.5 * z.square() - log_std - _LOG_SQRT_2PI).sum(-1)

    def entropy(self, params: Tensor) -> Tensor:
        log_std = self._split(params)[1]
        return (log_std + 0.5 + _LOG_SQRT_2PI).sum(-1)

    def kl(self, old_params: Tensor, new_params: Tensor) -> Tensor:
        # KL(N(m0, s0^2) || N(m1, s1^2)) = log(s1/s0) + (s0^2 + (m0 - m1)^2) / (2 s1^2) - 1/2
        mean0, log_std0 = self._split(old_params)
        mean1, log_std1 = self._split(new_params)
        var_ratio = torch.exp(2.0 * (log_std0 - log_std1))
        diff = (mean0 - mean1) * torch.exp(-log_std1)
        return (log_std1 - log_std0 + 0.5 * (var_ratio + diff.square()) - 0.5).sum(-1)


def make_distribution(action_space: gym.Space) -> ActionDistribution:
    """The action distribution for a Gymnasium action space.

    Raises:
        ValueError: for spaces other than ``Discrete``, ``Box`` and ``MultiDiscrete`` (and for
            those with a nonzero ``start``: the policy samples 0..n-1).
    """
    if isinstance(action_space, gym.spaces.Discrete):
        _check_start(action_space, "action")
        return Categorical(int(action_space.n))
    if isinstance(action_space, gym.spaces.MultiDiscrete):
        if np.asarray(action_space.nvec).ndim != 1:
            raise ValueError(f"Unsupported action space {action_space}: MultiDiscrete must be one-dimensional")
        _check_start(action_space, "action")
        return MultiCategorical(list(np.asarray(action_space.nvec)))
    if isinstance(action_space, gym.spaces.Box):
        if len(action_space.shape) != 1:
            raise ValueError(f"Unsupported action space {action_space}: Box actions must be one-dimensional")
        return DiagGaussian(int(action_space.shape[0]))
    raise ValueError(
        f"Unsupported action space {action_space}; supported: Discrete, Box (1-D) and MultiDiscrete"
    )


def _check_start(space: gym.spaces.Discrete | gym.spaces.MultiDiscrete, kind: str) -> None:
    if np.any(np.asarray(space.start) != 0):
        raise ValueError(
            f"Unsupported {kind} space {space}: start={space.start}; supported: Discrete / MultiDiscrete "
            "starting at 0 (wrap the env to shift its values)"
        )


def observation_dim(observation_space: gym.Space) -> int:
    """Flat input size for an observation space (Box, or Discrete encoded one-hot)."""
    if isinstance(observation_space, gym.spaces.Box):
        return int(np.prod(observation_space.shape))
    if isinstance(observation_space, gym.spaces.Discrete):
        _check_start(observation_space, "observation")
        return int(observation_space.n)
    raise ValueError(f"Unsupported observation space {observation_space}; supported: Box and Discrete")


def _mlp(sizes: Sequence[int], activation: type[nn.Module], out_gain: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        linear = nn.Linear(sizes[i], sizes[i + 1])
        last = i == len(sizes) - 2
        nn.init.orthogonal_(linear.weight, gain=out_gain if last else math.sqrt(2.0))
        nn.init.zeros_(linear.bias)
        layers.append(linear)
        if not last:
            layers.append(activation())
    return nn.Sequential(*layers)


POLICY_KWARGS = ("net_arch", "activation_fn", "log_std_init", "ortho_init")


def validate_policy_kwargs(policy_kwargs: Mapping[str, Any]) -> None:
    """Check ``policy_kwargs`` without building a network (configs call this).

    Raises:
        ValueError: an unknown key, or a value :class:`ActorCritic` would reject, naming both.
    """
    unknown = sorted(set(policy_kwargs) - set(POLICY_KWARGS))
    if unknown:
        raise ValueError(f"Invalid policy_kwargs key(s) {unknown}; expected some of {list(POLICY_KWARGS)}")
    if "net_arch" in policy_kwargs:
        _parse_net_arch(policy_kwargs["net_arch"])
    if "activation_fn" in policy_kwargs:
        resolve_activation(policy_kwargs["activation_fn"])
    if "log_std_init" in policy_kwargs:
        value = policy_kwargs["log_std_init"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"Invalid policy_kwargs.log_std_init: {value!r}; expected a finite number")
    if "ortho_init" in policy_kwargs and not isinstance(policy_kwargs["ortho_init"], bool):
        raise ValueError(f"Invalid policy_kwargs.ortho_init: {policy_kwargs['ortho_init']!r}; expected true or false")


def _parse_net_arch(net_arch: Any) -> tuple[list[int], list[int]]:
    if isinstance(net_arch, dict):
        unknown = sorted(set(net_arch) - {"pi", "vf"})
        if unknown:
            raise ValueError(f"Invalid policy_kwargs.net_arch key(s) {unknown}; expected 'pi' and/or 'vf'")
        pi, vf = net_arch.get("pi", [64, 64]), net_arch.get("vf", [64, 64])
    elif isinstance(net_arch, (list, tuple)):
        pi = vf = list(net_arch)
    else:
        raise ValueError(f"Invalid policy_kwargs.net_arch: {net_arch!r}; expected a list of sizes or dict(pi=[...], vf=[...])")
    for name, sizes in (("pi", pi), ("vf", vf)):
        positive = isinstance(sizes, (list, tuple)) and all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes
        )
        if not positive:
            raise ValueError(f"Invalid policy_kwargs.net_arch {name}: {sizes!r}; expected positive integers")
    return list(pi), list(vf)


def resolve_activation(activation_fn: str | type[nn.Module]) -> type[nn.Module]:
    """Accept an activation by name (as in TOML presets) or as an ``nn.Module`` class."""
    if isinstance(activation_fn, str):
        key = activation_fn.lower().removeprefix("nn.")
        if key not in ACTIVATIONS:
            raise ValueError(
                f"Invalid policy_kwargs.activation_fn: {activation_fn!r}; expected one of {sorted(ACTIVATIONS)}"
            )
        return ACTIVATIONS[key]
    if isinstance(activation_fn, type) and issubclass(activation_fn, nn.Module):
        return activation_fn
    raise ValueError(f"Invalid policy_kwargs.activation_fn: {activation_fn!r}; expected a name or nn.Module class")


_FAST_ACTIVATIONS: dict[type[nn.Module], Callable[[Tensor], Tensor]] = {
    nn.Tanh: torch.tanh,
    nn.ReLU: torch.relu,
}


class FusedActorCritic:
    """Inference-only actor and critic in one pass of block-diagonal layers.

    Layer 1 stacks both input weight matrices; deeper layers are block-diagonal, so a batch
    goes through ``depth`` matrix products instead of ``2 * depth`` (the per-op overhead,
    not the arithmetic, dominates for the small batches of a rollout).  Built from the
    current weights by :meth:`ActorCritic.fused`; rebuild it after every update.
    """

    def __init__(self, policy: ActorCritic) -> None:
        actor = [m for m in policy.actor if isinstance(m, nn.Linear)]
        critic = [m for m in policy.critic if isinstance(m, nn.Linear)]
        self.layers: list[tuple[Tensor, Tensor]] = []
        with torch.no_grad():
            for i, (a, c) in enumerate(zip(actor, critic)):
                weight = torch.cat([a.weight, c.weight]) if i == 0 else torch.block_diag(a.weight, c.weight)
                self.layers.append((weight.detach().clone(), torch.cat([a.bias, c.bias]).detach().clone()))
        # A network without hidden layers has no activation; the loop below then never calls it.
        activation = next((m for m in policy.actor if not isinstance(m, nn.Linear)), nn.Identity())
        self.activation: Callable[[Tensor], Tensor] = _FAST_ACTIVATIONS.get(type(activation), activation)
        self.n_actor_out = actor[-1].out_features
        self.log_std = policy.log_std.detach().clone() if policy.log_std is not None else None
        self.policy = policy

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(dist_params, values)`` for preprocessed observations."""
        for weight, bias in self.layers[:-1]:
            x = self.activation(torch.nn.functional.linear(x, weight, bias))
        out = torch.nn.functional.linear(x, *self.layers[-1])
        params = out[:, : self.n_actor_out]
        if self.log_std is not None:
            params = torch.cat([params, self.log_std.expand_as(params)], dim=-1)
        return params, out[:, self.n_actor_out]

    def act(self, obs: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Sampled ``(actions, log_probs, values)`` for raw observations."""
        params, values = self(self.policy.preprocess(obs))
        actions, log_probs = self.policy.distribution.sample_with_log_prob(params, generator)
        return actions, log_probs, values


def _tanh_(x: np.ndarray) -> np.ndarray:
    return np.tanh(x, out=x)


def _relu_(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0, out=x)


_NUMPY_ACTIVATIONS: dict[type[nn.Module], Callable[[np.ndarray], np.ndarray]] = {
    nn.Tanh: _tanh_,
    nn.ReLU: _relu_,
}


class NumpyRolloutPolicy:
    """The CPU rollout's policy: actor and critic in one numpy pass, and the sampling.

    A rollout step feeds the policy a handful of observations (one per environment), so
    torch's per-operator dispatch costs more than the arithmetic; numpy's is several times
    cheaper.  Like :class:`FusedActorCritic`, layer 1 stacks both input weight matrices and
    deeper layers are block-diagonal.  Built by :meth:`ActorCritic.numpy_policy` from a copy
    of the current weights; build another after every update.

    The noise for a chunk of steps is drawn at once from ``rng``, a numpy generator that
    :meth:`ActorCritic.numpy_policy` seeds from the agent's torch generator, so a run is
    reproducible from its seed and a checkpoint (which holds the torch generator) resumes it
    exactly.  Categorical actions use the Gumbel-max trick, ``argmax(logits + G)``; Gaussian
    ones ``mean + std * z``, whose log-probability is ``Σ(-z²/2 - log std) - d log √(2π)``.
    """

    _CHUNK_ELEMENTS = 1 << 16  # noise drawn per refill

    def __init__(self, policy: ActorCritic, rng: np.random.Generator, n_envs: int, n_steps: int) -> None:
        actor = [m for m in policy.actor if isinstance(m, nn.Linear)]
        critic = [m for m in policy.critic if isinstance(m, nn.Linear)]
        self._layers: list[tuple[np.ndarray, np.ndarray]] = []
        for i, (a, c) in enumerate(zip(actor, critic, strict=True)):
            wa, wc = a.weight.detach().numpy(), c.weight.detach().numpy()
            if i == 0:
                weight = np.concatenate([wa, wc]).T  # (in, out_actor + out_critic)
            else:
                weight = np.zeros((wa.shape[1] + wc.shape[1], wa.shape[0] + wc.shape[0]), dtype=wa.dtype)
                weight[: wa.shape[1], : wa.shape[0]] = wa.T
                weight[wa.shape[1] :, wa.shape[0] :] = wc.T
            self._layers.append((weight, np.concatenate([a.bias.detach().numpy(), c.bias.detach().numpy()])))
        activation = next((type(m) for m in policy.actor if not isinstance(m, nn.Linear)), nn.Tanh)
        self._activation = _NUMPY_ACTIVATIONS[activation]
        self._n_out = actor[-1].out_features
        self._gaussian = policy.log_std is not None
        self._rng = rng
        self._rows = np.arange(n_envs)
        width = self._n_out
        self._chunk_steps = max(1, min(n_steps, self._CHUNK_ELEMENTS // max(1, n_envs * width)))
        self._noise = np.empty((0, n_envs, width), dtype=np.float32)
        self._next = 0
        if policy.log_std is not None:
            log_std = policy.log_std.detach().numpy()
            self._std = np.exp(log_std)
            self._log_prob_const = np.float32(-(float(log_std.sum()) + width * _LOG_SQRT_2PI))

    def _forward(self, obs: np.ndarray) -> np.ndarray:
        x = obs.reshape(obs.shape[0], -1)
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        for weight, bias in self._layers[:-1]:
            x = x @ weight
            x += bias
            self._activation(x)
        weight, bias = self._layers[-1]
        out = x @ weight
        out += bias
        return out

    def _draw(self, n_envs: int) -> np.ndarray:
        if self._next == len(self._noise) or self._noise.shape[1] != n_envs:
            shape = (self._chunk_steps, n_envs, self._n_out)
            if self._gaussian:
                self._noise = self._rng.standard_normal(shape, dtype=np.float32)
            else:  # Gumbel noise -log(E), E ~ Exp(1)
                self._noise = -np.log(self._rng.standard_exponential(shape, dtype=np.float32))
            self._next = 0
        noise = self._noise[self._next]
        self._next += 1
        return noise

    def values(self, obs: np.ndarray) -> np.ndarray:
        """State values ``(batch,)`` for raw observations."""
        return self._forward(obs)[:, self._n_out].copy()

    def act(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sampled ``(actions, log_probs, values)`` for a batch of raw observations."""
        out = self._forward(obs)
        params, values = out[:, : self._n_out], out[:, self._n_out]
        noise = self._draw(len(out))
        if self._gaussian:
            actions = params + noise * self._std
            log_probs = -0.5 * np.einsum("ij,ij->i", noise, noise) + self._log_prob_const
            return actions, log_probs, values
        shifted = params - params.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(shifted).sum(axis=1))
        actions = np.argmax(shifted + noise, axis=1)
        return actions, shifted[self._rows[: len(out)], actions] - log_norm, values


class ActorCritic(nn.Module):
    """Separate MLP actor and critic with orthogonal initialisation.

    Args:
        observation_space: ``Box`` (flattened) or ``Discrete`` (one-hot).
        action_space: ``Discrete``, 1-D ``Box`` or ``MultiDiscrete``.
        net_arch: Hidden sizes, shared by both networks, or ``dict(pi=[...], vf=[...])``.
            Default ``dict(pi=[64, 64], vf=[64, 64])``.
        activation_fn: ``"tanh"`` (default), ``"relu"``, ... or an ``nn.Module`` class.
        log_std_init: Initial state-independent log standard deviation (Box actions).
        ortho_init: Orthogonal init (gain sqrt(2) hidden, 0.01 policy head, 1 value head).

    The actor's and critic's parameters are the explicit groups :meth:`actor_parameters`
    and :meth:`critic_parameters`.
    """

    def __init__(
        self,
        observation_space: gym.Space,
        action_space: gym.Space,
        net_arch: Any = None,
        activation_fn: str | type[nn.Module] = "tanh",
        log_std_init: float = 0.0,
        ortho_init: bool = True,
    ) -> None:
        super().__init__()
        self.distribution = make_distribution(action_space)
        self.obs_dim = observation_dim(observation_space)
        self.one_hot_obs = isinstance(observation_space, gym.spaces.Discrete)
        pi_arch, vf_arch = _parse_net_arch(net_arch if net_arch is not None else {"pi": [64, 64], "vf": [64, 64]})
        activation = resolve_activation(activation_fn)
        n_outputs = self.distribution.param_dim
        self.is_gaussian = isinstance(self.distribution, DiagGaussian)
        if self.is_gaussian:
            n_outputs = n_outputs // 2
        self.actor = _mlp([self.obs_dim, *pi_arch, n_outputs], activation, out_gain=0.01)
        self.critic = _mlp([self.obs_dim, *vf_arch, 1], activation, out_gain=1.0)
        if not ortho_init:
            for module in (*self.actor, *self.critic):
                if isinstance(module, nn.Linear):
                    module.reset_parameters()
        self.log_std = nn.Parameter(torch.full((n_outputs,), float(log_std_init))) if self.is_gaussian else None
        self._numpy_params: list[nn.Parameter] | None = None  # see numpy_policy

    def actor_parameters(self) -> list[nn.Parameter]:
        params = list(self.actor.parameters())
        if self.log_std is not None:
            params.append(self.log_std)
        return params

    def critic_parameters(self) -> list[nn.Parameter]:
        return list(self.critic.parameters())

    def preprocess(self, obs: Tensor) -> Tensor:
        if self.one_hot_obs:
            return nn.functional.one_hot(obs.long().reshape(-1), self.obs_dim).to(torch.float32)
        if obs.dim() != 2:
            obs = obs.reshape(obs.shape[0], -1)
        return obs if obs.dtype == torch.float32 else obs.to(torch.float32)

    def dist_params(self, obs: Tensor) -> Tensor:
        """Distribution parameters ``(batch, param_dim)`` for preprocessed observations."""
        out = self.actor(obs)
        if self.log_std is not None:
            out = torch.cat([out, self.log_std.expand_as(out)], dim=-1)
        return out

    def actor_shapes(self) -> list[torch.Size]:
        return [p.shape for p in self.actor_parameters()]

    def dist_params_from_flat(self, flat_actor: Tensor, obs: Tensor) -> Tensor:
        """Distribution parameters with the actor's parameters replaced by a flat vector.

        ``flat_actor`` is laid out like ``parameters_to_vector(actor_parameters())``.  This is
        a pure function of its inputs (``torch.func.functional_call``), so it can be
        vmapped over many candidate vectors, as the batched line search does.
        """
        names = [name for name, _ in self.actor.named_parameters()]
        tensors: list[Tensor] = []
        offset = 0
        for shape in self.actor_shapes():
            numel = math.prod(shape)
            tensors.append(flat_actor[offset : offset + numel].view(shape))
            offset += numel
        out = torch.func.functional_call(self.actor, dict(zip(names, tensors)), (obs,))
        if self.log_std is not None:
            out = torch.cat([out, tensors[-1].expand_as(out)], dim=-1)
        return out

    def value(self, obs: Tensor) -> Tensor:
        """State values ``(batch,)`` for preprocessed observations."""
        return self.critic(obs).squeeze(-1)

    def traced_forward(self, obs: Tensor) -> tuple[Tensor, Tensor, list[tuple[nn.Linear, Tensor, Tensor]]]:
        """:meth:`dist_params` and :meth:`value` of preprocessed observations, the same
        computation, plus ``(layer, input, output)`` of every ``nn.Linear`` (actor's, then
        critic's): what K-FAC needs to record its statistics without module hooks."""
        trace: list[tuple[nn.Linear, Tensor, Tensor]] = []
        outputs = []
        for network in (self.actor, self.critic):
            x = obs
            for module in network:
                y = module(x)
                if isinstance(module, nn.Linear):
                    trace.append((module, x, y))
                x = y
            outputs.append(x)
        params, values = outputs[0], outputs[1].squeeze(-1)
        if self.log_std is not None:
            params = torch.cat([params, self.log_std.expand_as(params)], dim=-1)
        return params, values, trace

    def act(
        self, obs: Tensor, generator: torch.Generator | None = None, deterministic: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Sample actions for raw observations; returns ``(actions, log_probs, values)``."""
        x = self.preprocess(obs)
        params = self.dist_params(x)
        dist = self.distribution
        if deterministic:
            actions = dist.mode(params)
            return actions, dist.log_prob(params, actions), self.value(x)
        actions, log_probs = dist.sample_with_log_prob(params, generator)
        return actions, log_probs, self.value(x)

    def fused(self) -> FusedActorCritic | ActorCritic:
        """A fast inference view (:class:`FusedActorCritic`) when actor and critic have the
        same depth and activation, else ``self``; both offer ``act(obs, generator)``."""
        n_actor = sum(isinstance(m, nn.Linear) for m in self.actor)
        n_critic = sum(isinstance(m, nn.Linear) for m in self.critic)
        if n_actor != n_critic:
            return self
        return FusedActorCritic(self)

    def numpy_policy(self, generator: torch.Generator, n_envs: int, n_steps: int) -> NumpyRolloutPolicy | None:
        """The CPU rollout's numpy policy (:class:`NumpyRolloutPolicy`), or None where it does
        not apply: parameters off the CPU or in a dtype other than float32/float64, ``Discrete``
        observations, ``MultiDiscrete`` actions, actor and critic of different depths or
        activations, or an activation other than tanh / ReLU.

        Draws one seed from ``generator`` for the noise of a rollout of ``n_steps`` steps of
        ``n_envs`` environments.
        """
        if self._numpy_params is None:  # the structure never changes: decide once
            n_actor = sum(isinstance(m, nn.Linear) for m in self.actor)
            n_critic = sum(isinstance(m, nn.Linear) for m in self.critic)
            kinds = {type(m) for m in (*self.actor, *self.critic) if not isinstance(m, nn.Linear)}
            supported = (
                (self.log_std is not None or isinstance(self.distribution, Categorical))
                and not self.one_hot_obs
                and n_actor == n_critic
                and kinds <= set(_NUMPY_ACTIVATIONS)
                and len(kinds) <= 1
            )
            self._numpy_params = list(self.parameters()) if supported else []
        if not self._numpy_params or any(
            p.device.type != "cpu" or p.dtype not in (torch.float32, torch.float64) for p in self._numpy_params
        ):
            return None
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        return NumpyRolloutPolicy(self, np.random.Generator(np.random.PCG64(seed)), n_envs, n_steps)

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        x = self.preprocess(obs)
        return self.dist_params(x), self.value(x)

"""Tiny hand-built policies with analytic KL divergences, shared by the curvature tests.

Each policy maps a batch of observations to the parameters of its action
distribution; the KL(old ‖ new) between two such outputs is written out in
closed form here, so the tests differentiate a formula, not a library.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.autograd.functional import hessian
from torch.func import functional_call

from trpo_lab.optim._flat import flat_params, unflatten

OBS_DIM = 3
BATCH = 7
MULTI_DISCRETE_NVEC = (3, 2, 4)
POLICY_KINDS = ("categorical", "gaussian", "multidiscrete")

Outputs = tuple[Tensor, ...]


def categorical_kl(old_logits: Tensor, new_logits: Tensor) -> Tensor:
    """KL(old ‖ new) = Σ_a p_old(a) (log p_old(a) - log p_new(a)), per state."""
    old_log_probs = torch.log_softmax(old_logits, dim=-1)
    new_log_probs = torch.log_softmax(new_logits, dim=-1)
    return (old_log_probs.exp() * (old_log_probs - new_log_probs)).sum(-1)


def gaussian_kl(old: Outputs, new: Outputs) -> Tensor:
    """KL(N(μ₀, σ₀²) ‖ N(μ, σ²)) = Σ_i log(σ_i/σ₀_i) + (σ₀_i² + (μ₀_i - μ_i)²) / (2σ_i²) - 1/2, per state."""
    (old_mean, old_log_std), (new_mean, new_log_std) = old, new
    variance_ratio_term = (torch.exp(2 * old_log_std) + (old_mean - new_mean) ** 2) / (2 * torch.exp(2 * new_log_std))
    return (new_log_std - old_log_std + variance_ratio_term - 0.5).sum(-1)


class CategoricalPolicy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(OBS_DIM, 5), nn.Tanh(), nn.Linear(5, 4))

    def forward(self, obs: Tensor) -> Outputs:
        return (self.net(obs),)

    @staticmethod
    def kl(old: Outputs, new: Outputs) -> Tensor:
        return categorical_kl(old[0], new[0])


class GaussianPolicy(nn.Module):
    """A diagonal Gaussian: the network gives the mean, a separate parameter the state-independent log-std."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(OBS_DIM, 5), nn.Tanh(), nn.Linear(5, 2))
        self.log_std = nn.Parameter(torch.tensor([-0.3, 0.2]))

    def forward(self, obs: Tensor) -> Outputs:
        mean = self.net(obs)
        return mean, self.log_std.expand_as(mean)

    @staticmethod
    def kl(old: Outputs, new: Outputs) -> Tensor:
        return gaussian_kl(old, new)


class MultiDiscretePolicy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(OBS_DIM, 5), nn.Tanh(), nn.Linear(5, sum(MULTI_DISCRETE_NVEC)))

    def forward(self, obs: Tensor) -> Outputs:
        return (self.net(obs),)

    @staticmethod
    def kl(old: Outputs, new: Outputs) -> Tensor:
        """Independent components: the KL is the sum of the per-component Categorical KLs."""
        old_splits = torch.split(old[0], MULTI_DISCRETE_NVEC, dim=-1)
        new_splits = torch.split(new[0], MULTI_DISCRETE_NVEC, dim=-1)
        return torch.stack([categorical_kl(o, n) for o, n in zip(old_splits, new_splits)]).sum(0)


POLICIES: dict[str, type[CategoricalPolicy | GaussianPolicy | MultiDiscretePolicy]] = {
    "categorical": CategoricalPolicy,
    "gaussian": GaussianPolicy,
    "multidiscrete": MultiDiscretePolicy,
}


class PolicyProblem:
    """A tiny policy, a batch of states, the old distribution detached at the current parameters, and its KLs."""

    def __init__(self, kind: str, seed: int = 0, dtype: torch.dtype = torch.float64) -> None:
        self.key = (kind, seed, dtype)
        torch.manual_seed(seed)
        self.policy = POLICIES[kind]().to(dtype)
        self.obs = torch.randn(BATCH, OBS_DIM, dtype=dtype)
        self.names = [name for name, _ in self.policy.named_parameters()]
        self.params = [param for _, param in self.policy.named_parameters()]
        self.old = tuple(output.detach() for output in self.policy(self.obs))

    @property
    def size(self) -> int:
        return sum(param.numel() for param in self.params)

    def outputs_of_params(self, params: tuple[Tensor, ...]) -> Outputs:
        return functional_call(self.policy, dict(zip(self.names, params)), (self.obs,))

    def kl_fn(self) -> Tensor:
        """The mean KL at the module's current parameters (a closure for double backprop)."""
        return self.policy.kl(self.old, self.policy(self.obs)).mean()

    def kl_fn_of_params(self, params: tuple[Tensor, ...]) -> Tensor:
        return self.policy.kl(self.old, self.outputs_of_params(params)).mean()

    def kl_fn_of_flat(self, flat: Tensor) -> Tensor:
        return self.kl_fn_of_params(unflatten(flat, self.params))

    def explicit_hessian(self) -> Tensor:
        """The dense Hessian of the mean KL at the initial parameters, straight from torch.autograd.

        Problems are deterministic in (kind, seed, dtype), so the matrix is computed once per key.
        """
        if self.key not in _HESSIANS:
            _HESSIANS[self.key] = hessian(self.kl_fn_of_flat, flat_params(self.params), vectorize=True)
        return _HESSIANS[self.key].clone()


_HESSIANS: dict[tuple[str, int, torch.dtype], Tensor] = {}


@pytest.fixture
def make_problem() -> Callable[..., PolicyProblem]:
    """Returns ``PolicyProblem(kind, seed=0, dtype=torch.float64)``; kinds are listed in ``POLICY_KINDS``."""
    return PolicyProblem

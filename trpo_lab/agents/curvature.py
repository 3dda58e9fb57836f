"""Curvature backends for the trust-region step of TRPO and NPG (``curvature = ...``).

A backend turns the surrogate gradient g into a step direction s ≈ (F + γI)⁻¹ g, with F the
Fisher of the policy at θ_old (the Hessian of the mean KL) and γ = ``cg_damping``. The agent
then scales s to the KL radius with sᵀFs from a Fisher-vector product and line-searches (TRPO)
or applies (NPG) it, the same way whichever backend produced s:

==========  =====================================================================================
``cg``      conjugate gradient on Fisher-vector products (Schulman et al., 2015): ``cg_max_steps``
            products, converges to F⁻¹g.
``kfac``    K-FAC's preconditioned gradient, (A ⊗ G + γI)⁻¹ g per layer (Martens & Grosse, 2015),
            from :class:`trpo_lab.optim.KFAC` (the class ACKTR uses) with its statistics from
            actions sampled from the current policy; parameters outside Linear layers (a
            Gaussian's log-std) take the plain gradient, K-FAC's convention.
``shampoo`` Shampoo's direction L^(-1/4) g R^(-1/4) (Gupta, Koren & Singer, 2018) from
            :meth:`trpo_lab.optim.Shampoo.preconditioned_direction`. Shampoo preconditions with
            the gradients' own second moments, not F, so this is not a natural gradient; the KL
            scaling and the line search still keep the step inside the trust region.
``exact``   the dense solve (F + γI)⁻¹ g with the explicit KL Hessian
            (:func:`trpo_lab.optim.exact.natural_gradient_step`): P backward passes and an O(P³)
            solve, so only for actors of at most :data:`EXACT_MAX_PARAMETERS` parameters.
==========  =====================================================================================

Backends are RL-aware (they know the policy and its distribution); the numerics they call live
in :mod:`trpo_lab.optim`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from trpo_lab.config import TrustRegionConfig
from trpo_lab.optim._flat import total_numel, unflatten
from trpo_lab.optim.cg import solve_cg
from trpo_lab.optim.exact import natural_gradient_step
from trpo_lab.optim.kfac import KFAC
from trpo_lab.optim.shampoo import Shampoo
from trpo_lab.policies import ActorCritic

__all__ = [
    "EXACT_MAX_PARAMETERS",
    "CGCurvature",
    "Curvature",
    "CurvatureProblem",
    "ExactCurvature",
    "KFACCurvature",
    "ShampooCurvature",
    "check_exact_size",
    "exact_natural_gradient",
    "make_curvature",
]

#: Largest actor (in parameters) for which the dense Fisher is formed, by ``curvature="exact"``
#: and by ``diagnostics.exact_every``. The explicit KL Hessian costs one backward pass over the
#: Fisher batch per parameter, plus an O(P³) solve: about 0.2 s per update for P ≈ 100 and 4 s
#: for P ≈ 2,000 on one CPU core with 2,048 states. ``net_arch=[16]`` gives 114 parameters on
#: CartPole-v1 and 82 on Pendulum-v1; the default ``[64, 64]`` gives 4,610 and 4,545.
EXACT_MAX_PARAMETERS = 2_000


@dataclass(frozen=True)
class CurvatureProblem:
    """What a backend may use to turn the gradient into a step direction, at θ_old.

    Attributes:
        grad: The flat gradient g of the surrogate (to be maximised) w.r.t. the actor parameters.
        fvp: ``v ↦ (F + γI) v``, the damped Fisher-vector product.
        kl_of_flat: The mean KL(π_old ‖ π_φ) over ``fisher_obs`` as a function of a flat actor
            vector φ (for dense references).
        theta: The flat actor parameters θ_old.
        fisher_obs: The (preprocessed) states F is estimated on, the FVP's (sub)sample.
    """

    grad: Tensor
    fvp: Callable[[Tensor], Tensor]
    kl_of_flat: Callable[[Tensor], Tensor]
    theta: Tensor
    fisher_obs: Tensor


def check_exact_size(num_parameters: int, what: str) -> None:
    """Refuse a dense Fisher for actors above :data:`EXACT_MAX_PARAMETERS` parameters.

    Raises:
        ValueError: naming ``what``, the parameter count and the limit.
    """
    if num_parameters > EXACT_MAX_PARAMETERS:
        raise ValueError(
            f"Invalid {what}: the dense Fisher needs an actor of at most {EXACT_MAX_PARAMETERS} parameters, "
            f"this one has {num_parameters}; use a smaller policy_kwargs.net_arch (e.g. [16])"
        )


def exact_natural_gradient(problem: CurvatureProblem, damping: float) -> Tensor:
    """(F + damping·I)⁻¹ g with F the explicit Hessian of ``problem.kl_of_flat`` at θ_old."""
    return natural_gradient_step(problem.kl_of_flat, problem.grad, problem.theta, damping=damping)


class Curvature(ABC):
    """Where the trust-region step direction comes from; one subclass per ``curvature`` value.

    Args:
        policy: The agent's policy; backends precondition its actor parameters.
        config: The agent's config (``cg_damping``, ``cg_max_steps``, ``cg_tol``).
        generator: Random generator for the backend's own sampling (K-FAC's sampled Fisher).
    """

    name: ClassVar[str]

    def __init__(self, policy: ActorCritic, config: TrustRegionConfig, generator: torch.Generator) -> None:
        self.policy = policy
        self.config = config
        self.generator = generator

    @abstractmethod
    def direction(self, problem: CurvatureProblem) -> tuple[Tensor, dict[str, Tensor]]:
        """The flat direction s (same layout as ``problem.grad``) and ``train/...`` metrics."""

    def direction_product(self) -> Tensor | None:
        """(F + γI) s for the last direction, when the backend has it for free (else None)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """State that must survive a checkpoint (statistics, factors); empty when stateless."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class CGCurvature(Curvature):
    """s = CG(F + γI, g) with ``cg_max_steps`` Fisher-vector products (Schulman et al., 2015)."""

    name = "cg"

    _product: Tensor | None = None

    def direction(self, problem: CurvatureProblem) -> tuple[Tensor, dict[str, Tensor]]:
        # On the CPU a converged CG stops early (one scalar read per iteration, no extra
        # products); on a GPU it runs all iterations without host synchronisation.
        cg = solve_cg(
            problem.fvp,
            problem.grad,
            max_iter=self.config.cg_max_steps,
            tol=self.config.cg_tol,
            stop_early=problem.grad.device.type == "cpu",
        )
        self._product = problem.grad - cg.residual  # (F + γI) s = g − r
        metrics = {"train/cg_residual": cg.residual_norm, "train/cg_iterations": cg.iterations.to(cg.x.dtype)}
        return cg.x, metrics

    def direction_product(self) -> Tensor | None:
        return self._product


class ExactCurvature(Curvature):
    """s = (F + γI)⁻¹ g by a dense solve; refuses actors above :data:`EXACT_MAX_PARAMETERS`."""

    name = "exact"

    def __init__(self, policy: ActorCritic, config: TrustRegionConfig, generator: torch.Generator) -> None:
        super().__init__(policy, config, generator)
        check_exact_size(total_numel(policy.actor_parameters()), "curvature 'exact'")

    def direction(self, problem: CurvatureProblem) -> tuple[Tensor, dict[str, Tensor]]:
        return exact_natural_gradient(problem, self.config.cg_damping), {}


class KFACCurvature(Curvature):
    r"""s = K-FAC's preconditioned gradient, (A ⊗ G + γI)⁻¹ g for each Linear layer of the actor.

    The factors come from a Fisher pass on the problem's states with actions sampled from the
    current policy, a ~ π_old(·|s), and the loss −1/N Σ log π(a|s) (the true Fisher; the taken
    actions would give the empirical one). They are refreshed on every update: ``stat_decay``
    0.95 averages them over the last ~20 policies, each batch's factors weighing 5% (Martens &
    Grosse, 2015, use 0.95), and ``inverse_every`` 1 recomputes the eigendecompositions every
    update (a few small symmetric matrices per layer). The damping is ``cg_damping`` in K-FAC's
    "eigen" mode, so the direction solves the same damped system as CG, with F replaced by its
    Kronecker factorisation. K-FAC's step rule (learning rate, KL clip, momentum) is not used.
    """

    name = "kfac"
    STAT_DECAY: ClassVar[float] = 0.95

    def __init__(self, policy: ActorCritic, config: TrustRegionConfig, generator: torch.Generator) -> None:
        super().__init__(policy, config, generator)
        self.kfac = KFAC(
            policy.actor,
            lr=1.0,
            momentum=0.0,
            damping=config.cg_damping,
            kl_clip=None,
            stat_decay=self.STAT_DECAY,
            inverse_every=1,
        )
        self.layer_params = list(policy.actor.parameters())

    def _track_fisher(self, obs: Tensor) -> None:
        policy, dist = self.policy, self.policy.distribution
        with torch.enable_grad(), self.kfac.track_statistics():
            dist_params = policy.dist_params(obs)
            sampled = dist.sample(dist_params.detach(), self.generator)
            fisher_loss = -dist.log_prob(dist_params, sampled).mean()
            torch.autograd.grad(fisher_loss, self.layer_params)

    def direction(self, problem: CurvatureProblem) -> tuple[Tensor, dict[str, Tensor]]:
        self._track_fisher(problem.fisher_obs)
        pieces = unflatten(problem.grad, self.policy.actor_parameters())
        count = len(self.layer_params)
        preconditioned = self.kfac.precondition(list(pieces[:count]))
        flat = torch.cat([p.reshape(-1) for p in [*preconditioned, *pieces[count:]]])
        return flat, {}

    def state_dict(self) -> dict[str, Any]:
        return {"kfac": self.kfac.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.kfac.load_state_dict(dict(state["kfac"]))


class ShampooCurvature(Curvature):
    r"""s = Shampoo's direction for g: L^(-1/4) g R^(-1/4) per weight matrix, per-axis diagonal for vectors.

    Shampoo runs without momentum (β₁ = 0: the direction is for this update's gradient only),
    with exponentially averaged statistics (β₂ = 0.9, about the last ten gradients, bias
    corrected), preconditioned from the first update with roots recomputed every update, and
    without grafting (the KL scaling sets the step length). ``epsilon`` 1e-8 regularises the
    statistics before the inverse roots. The gradient is handed to
    :meth:`~trpo_lab.optim.Shampoo.preconditioned_direction` through the parameters' ``.grad``,
    which is restored afterwards.
    """

    name = "shampoo"
    BETA2: ClassVar[float] = 0.9
    EPSILON: ClassVar[float] = 1e-8

    def __init__(self, policy: ActorCritic, config: TrustRegionConfig, generator: torch.Generator) -> None:
        super().__init__(policy, config, generator)
        self.params = policy.actor_parameters()
        self.shampoo = Shampoo(
            self.params,
            lr=1.0,
            betas=(0.0, self.BETA2),
            epsilon=self.EPSILON,
            precondition_every=1,
            start_preconditioning_step=1,
            grafting="none",
        )

    def direction(self, problem: CurvatureProblem) -> tuple[Tensor, dict[str, Tensor]]:
        saved = [p.grad for p in self.params]
        try:
            for param, piece in zip(self.params, unflatten(problem.grad, self.params)):
                param.grad = piece.detach().clone()
            directions = self.shampoo.preconditioned_direction()
        finally:
            for param, grad in zip(self.params, saved):
                param.grad = grad
        return torch.cat([d.reshape(-1) for d in directions]), {}

    def state_dict(self) -> dict[str, Any]:
        return {"shampoo": self.shampoo.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.shampoo.load_state_dict(dict(state["shampoo"]))


CURVATURE_BACKENDS: dict[str, type[Curvature]] = {
    backend.name: backend for backend in (CGCurvature, KFACCurvature, ShampooCurvature, ExactCurvature)
}


def make_curvature(policy: ActorCritic, config: TrustRegionConfig, generator: torch.Generator) -> Curvature:
    """The backend named by ``config.curvature``."""
    return CURVATURE_BACKENDS[config.curvature](policy, config, generator)

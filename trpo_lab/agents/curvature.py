"""Curvature backends for the trust-region step of TRPO and NPG (``curvature = ...``).

A backend turns the surrogate gradient g into a step direction s ≈ (F + γI)⁻¹ g, with F the
Fisher of the policy at θ_old (the Hessian of the mean KL) and γ = ``cg_damping``. It is the
``solve`` of :func:`trpo_lab.optim.trust_region.natural_step`, which then scales s to the KL
radius with sᵀFs and hands it to the line search (TRPO) or applies it (NPG), the same way
whichever backend produced s:

==========  =====================================================================================
``cg``      conjugate gradient on Fisher-vector products (Schulman et al., 2015): ``cg_max_steps``
            products, converges to F⁻¹g.
``kfac``    K-FAC's preconditioned gradient, (A ⊗ G + γI)⁻¹ g per layer (Martens & Grosse, 2015),
            from :class:`trpo_lab.optim.KFAC` (the class ACKTR uses) with its statistics from
            actions sampled from the current policy; parameters outside Linear / Conv2d layers
            (a Gaussian's log-std) take the plain gradient, K-FAC's convention.
``shampoo`` Shampoo's direction L^(-1/4) g R^(-1/4) (Gupta, Koren & Singer, 2018) from
            :meth:`trpo_lab.optim.Shampoo.preconditioned_direction`. Shampoo preconditions with
            the gradients' own second moments, not F, so this is not a natural gradient; the KL
            scaling and the line search still keep the step inside the trust region.
``exact``   the dense solve (F + γI)⁻¹ g with the explicit KL Hessian
            (:func:`trpo_lab.optim.exact.natural_gradient_step`): P backward passes and an O(P³)
            solve, so only for actors within :func:`exact_parameter_limit` (memory and time).
==========  =====================================================================================

Backends see parameters, modules and closures only (a :class:`CurvatureProblem` per update),
not a policy class, so the same backends serve :mod:`trpo_lab.agents.trpo` and the SB3
adapters of :mod:`trpo_lab.sb3.trpo`; the numerics they call live in :mod:`trpo_lab.optim`.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from trpo_lab.config import TrustRegionConfig
from trpo_lab.nn.policy import ActorCritic
from trpo_lab.optim._flat import total_numel, unflatten
from trpo_lab.optim.exact import natural_gradient_step, solve_damped
from trpo_lab.optim.fisher import sampled_fisher_loss
from trpo_lab.optim.kfac import KFAC, StatisticsReducer
from trpo_lab.optim.shampoo import Shampoo
from trpo_lab.optim.trust_region import Direction, FisherVectorProduct, Solve, cg_solve

__all__ = [
    "EXACT_HESSIAN_MAX_PARAMETERS",
    "EXACT_MAX_PARAMETERS",
    "CGCurvature",
    "Curvature",
    "CurvatureProblem",
    "ExactCurvature",
    "LayerTrace",
    "KFACCurvature",
    "ShampooCurvature",
    "actor_fisher_loss",
    "check_exact_size",
    "exact_natural_gradient",
    "exact_cost",
    "exact_parameter_limit",
    "make_curvature",
]

#: Memory the dense references may take for their P × P matrices (bytes), and the time one
#: update's dense solve may take (seconds), at the CPU rate below. ``curvature="exact"`` and
#: ``diagnostics.exact_every`` refuse actors whose :func:`exact_cost` exceeds either.
EXACT_MEMORY_BYTES = 1 << 30
EXACT_MAX_SECONDS = 30.0
#: One CPU core's dense linear-algebra rate assumed by :func:`exact_cost` (flop/s).
EXACT_FLOPS_PER_SECOND = 1e10
#: Dense P × P float32 matrices alive at once: the Fisher, its damped copy and the solver's workspace.
_EXACT_MATRICES = 4


def exact_cost(num_parameters: int) -> tuple[float, float]:
    """``(bytes, seconds)`` of one dense natural-gradient solve for an actor of P parameters.

    Memory: :data:`_EXACT_MATRICES` float32 P × P matrices. Time: the symmetric rank check
    and solve, about P³ floating-point operations, at :data:`EXACT_FLOPS_PER_SECOND`. Forming
    the Fisher from the outputs (:func:`trpo_lab.optim.exact.output_space_fisher`) adds
    2 N D P² for N states and D distribution parameters, less than the solve on classic
    control. The default [64, 64] actor (4,610 parameters on CartPole-v1) needs 340 MB and
    about 10 s at that rate.
    """
    p = float(num_parameters)
    return _EXACT_MATRICES * 4.0 * p * p, p**3 / EXACT_FLOPS_PER_SECOND


def exact_parameter_limit(memory_bytes: float | None = None, max_seconds: float | None = None) -> int:
    """The largest P whose :func:`exact_cost` fits ``memory_bytes`` and ``max_seconds``
    (default :data:`EXACT_MEMORY_BYTES`, :data:`EXACT_MAX_SECONDS`)."""
    memory = EXACT_MEMORY_BYTES if memory_bytes is None else memory_bytes
    seconds = EXACT_MAX_SECONDS if max_seconds is None else max_seconds
    by_memory = math.isqrt(int(memory // (_EXACT_MATRICES * 4)))
    budget = seconds * EXACT_FLOPS_PER_SECOND
    by_time = int(round(budget ** (1.0 / 3.0)))  # the integer cube root, exact despite rounding
    while by_time > 0 and by_time**3 > budget:
        by_time -= 1
    while (by_time + 1) ** 3 <= budget:
        by_time += 1
    return max(1, min(by_memory, by_time))


#: :func:`exact_parameter_limit` with the defaults (6,694 parameters: the time bound).
EXACT_MAX_PARAMETERS = exact_parameter_limit()
#: The limit where F can only be formed as the Hessian of ``kl_of_flat`` (P backward passes
#: over the Fisher batch, about 4 s for P = 2,000 and 2,048 states on one core, minutes for
#: the default actors): a problem without ``dense_fisher``, as the SB3 adapters build.
EXACT_HESSIAN_MAX_PARAMETERS = 2_000


@dataclass(frozen=True)
class CurvatureProblem:
    """What a backend may use, besides g and the Fisher-vector product, at θ_old.

    Attributes:
        theta: The flat actor parameters θ_old.
        kl_of_flat: The mean KL(π_old ‖ π_φ) over the Fisher states as a function of a flat
            actor vector φ (dense references: ``exact`` and ``diagnostics.exact_every``).
        fisher_loss: ``() ↦ −mean log π(ã|s)``, ã ~ π_old(·|s), on the Fisher states with its
            forward pass inside, through the layers' modules (K-FAC records its statistics
            with module hooks): the sampled-Fisher loss of any ``nn.Module`` policy.
        fisher_trace: The same loss from a hook-free forward, with ``(layer, input, output)``
            of each of the actor's layers (:meth:`ActorCritic.traced_forward`); K-FAC records
            its statistics from the gradients at those outputs. Used when given.
        dense_fisher: ``() ↦`` the dense Fisher (P, P) at θ_old on the Fisher states, formed
            from the outputs (:func:`trpo_lab.optim.exact.output_space_fisher`); the dense
            references use it instead of the Hessian of ``kl_of_flat`` (P backward passes).
    """

    theta: Tensor
    kl_of_flat: Callable[[Tensor], Tensor] | None = None
    fisher_loss: Callable[[], Tensor] | None = None
    fisher_trace: Callable[[], tuple[Tensor, list[LayerTrace]]] | None = None
    dense_fisher: Callable[[], Tensor] | None = None


LayerTrace = tuple[nn.Module, Tensor, Tensor]
"""``(layer, input, output)`` of one layer in a forward pass."""


def actor_fisher_loss(policy: ActorCritic, obs: Tensor, generator: torch.Generator) -> tuple[Tensor, list[LayerTrace]]:
    """−1/N Σ log π(ã|s) with ã ~ π(·|s) drawn from ``generator`` (the true, sampled Fisher's loss),
    and the actor's layer trace of that forward (:attr:`CurvatureProblem.fisher_trace`)."""
    dist = policy.distribution
    dist_params, _, trace = policy.traced_forward(obs)
    actor_layers = {id(module) for network in policy.actor_modules() for module in network.modules()}
    sampled = dist.sample(dist_params.detach(), generator)
    loss = sampled_fisher_loss(lambda a: dist.log_prob(dist_params, a), sampled).policy
    return loss, [entry for entry in trace if id(entry[0]) in actor_layers]


def check_exact_size(num_parameters: int, what: str, hessian_only: bool = False) -> None:
    """Refuse a dense Fisher whose :func:`exact_cost` exceeds the memory or time limit.

    Args:
        num_parameters: The actor's size P.
        what: The setting that asked for the dense Fisher, for the message.
        hessian_only: F will be formed as the Hessian of the KL (no ``dense_fisher``): the
            limit is :data:`EXACT_HESSIAN_MAX_PARAMETERS`.

    Raises:
        ValueError: naming ``what``, the parameter count, its estimated memory and time, and
            the limits.
    """
    if hessian_only and num_parameters > EXACT_HESSIAN_MAX_PARAMETERS:
        raise ValueError(
            f"Invalid {what}: the dense Fisher needs an actor of at most {EXACT_HESSIAN_MAX_PARAMETERS} "
            f"parameters when formed as the Hessian of the KL (one backward pass per parameter), this one "
            f"has {num_parameters}; use a smaller policy_kwargs.net_arch (e.g. [16])"
        )
    if num_parameters > EXACT_MAX_PARAMETERS:
        memory, seconds = exact_cost(num_parameters)
        raise ValueError(
            f"Invalid {what}: the dense Fisher needs an actor of at most {EXACT_MAX_PARAMETERS} parameters, "
            f"this one has {num_parameters} (about {memory / 2**20:.0f} MB and {seconds:.0f} s per update, "
            f"limits {EXACT_MEMORY_BYTES / 2**20:.0f} MB and {EXACT_MAX_SECONDS:.0f} s); use a smaller "
            "policy_kwargs.net_arch (e.g. [64, 32])"
        )


def exact_natural_gradient(grad: Tensor, problem: CurvatureProblem, damping: float) -> Tensor:
    """(F + damping·I)⁻¹ g with F ``problem.dense_fisher()`` if given, else the explicit
    Hessian of ``problem.kl_of_flat`` at θ_old."""
    if problem.dense_fisher is not None:
        fisher = problem.dense_fisher()
        return solve_damped(fisher, grad.detach().to(fisher.dtype), damping)
    if problem.kl_of_flat is None:
        raise ValueError("Invalid problem: the dense natural gradient needs kl_of_flat; the caller gave None")
    return natural_gradient_step(problem.kl_of_flat, grad, problem.theta, damping=damping)


class Curvature(ABC):
    """Where the trust-region step direction comes from; one subclass per ``curvature`` value.

    Args:
        params: The actor parameters, in the flat layout of the gradient.
        config: The agent's config (``cg_damping``, ``cg_max_steps``, ``cg_tol``).
        module: The module holding the actor's layers (K-FAC tracks its Linear / Conv2d layers).
        statistics_reducer: Combines K-FAC's per-batch factors over data-parallel ranks
            (:meth:`trpo_lab.distributed.Reducer.weighted_means`); None or the identity in
            one process.
    """

    name: ClassVar[str]

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        config: TrustRegionConfig,
        module: nn.Module | None = None,
        statistics_reducer: StatisticsReducer | None = None,
    ) -> None:
        self.params = list(params)
        self.config = config

    @abstractmethod
    def direction(self, grad: Tensor, fvp: FisherVectorProduct, problem: CurvatureProblem) -> Direction:
        """s for the flat gradient ``grad`` (its layout), with (F + γI) s when known and metrics."""

    def solver(self, problem: CurvatureProblem) -> Solve:
        """This backend as :func:`~trpo_lab.optim.trust_region.natural_step`'s ``solve`` for one problem."""
        return functools.partial(self.direction, problem=problem)

    def state_dict(self) -> dict[str, Any]:
        """State that must survive a checkpoint (statistics, factors); empty when stateless."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Restore :meth:`state_dict`; ``strict`` as ``nn.Module``'s (SB3's ``set_parameters`` passes it).

        Raises:
            ValueError: a stateless backend is given state (``strict``).
        """
        if strict and state:
            raise ValueError(f"Invalid curvature state: keys {sorted(state)} for the stateless backend {self.name!r}")


class CGCurvature(Curvature):
    """s = CG(F + γI, g) with ``cg_max_steps`` Fisher-vector products (Schulman et al., 2015).

    On the CPU a converged CG stops early (one scalar read per iteration, no extra products);
    on a GPU it runs all iterations without host synchronisation. (F + γI) s = g − r comes
    with the direction, so sᵀFs costs no further product.
    """

    name = "cg"

    def direction(self, grad: Tensor, fvp: FisherVectorProduct, problem: CurvatureProblem) -> Direction:
        # sync_free unset: stop early on the CPU only (cg_solve's default); set: its opposite.
        stop_early = None if self.config.sync_free is None else not self.config.sync_free
        return cg_solve(self.config.cg_max_steps, self.config.cg_tol, stop_early)(grad, fvp)


class ExactCurvature(Curvature):
    """s = (F + γI)⁻¹ g by a dense solve; refuses actors above :data:`EXACT_MAX_PARAMETERS`."""

    name = "exact"

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        config: TrustRegionConfig,
        module: nn.Module | None = None,
        statistics_reducer: StatisticsReducer | None = None,
    ) -> None:
        super().__init__(params, config)
        check_exact_size(total_numel(self.params), "curvature 'exact'")

    def direction(self, grad: Tensor, fvp: FisherVectorProduct, problem: CurvatureProblem) -> Direction:
        return Direction(exact_natural_gradient(grad, problem, self.config.cg_damping))


class KFACCurvature(Curvature):
    r"""s = K-FAC's preconditioned gradient, (A ⊗ G + γI)⁻¹ g for each Linear / Conv2d layer of the actor.

    The factors come from a Fisher pass (``problem.fisher_trace`` or ``fisher_loss``) on the problem's states with
    actions sampled from the current policy, a ~ π_old(·|s), and the loss −1/N Σ log π(a|s)
    (the true Fisher; the taken actions would give the empirical one). They are refreshed on
    every update: ``stat_decay`` 0.95 averages them over the last ~20 policies, each batch's
    factors weighing 5% (Martens & Grosse, 2015, use 0.95), and ``inverse_every`` 1 recomputes
    the eigendecompositions every update (a few small symmetric matrices per layer). The
    damping is ``cg_damping`` in K-FAC's "eigen" mode, so the direction solves the same damped
    system as CG, with F replaced by its Kronecker factorisation. K-FAC's step rule (learning
    rate, KL clip, momentum) is not used.
    """

    name = "kfac"
    STAT_DECAY: ClassVar[float] = 0.95

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        config: TrustRegionConfig,
        module: nn.Module | None = None,
        statistics_reducer: StatisticsReducer | None = None,
    ) -> None:
        super().__init__(params, config)
        if module is None:
            raise ValueError("Invalid module: None; curvature 'kfac' needs the module that holds the actor's layers")
        self.kfac = KFAC(
            module,
            lr=1.0,
            momentum=0.0,
            damping=config.cg_damping,
            kl_clip=None,
            stat_decay=self.STAT_DECAY,
            inverse_every=1,
            statistics_reducer=statistics_reducer,
            # sync_free unset: on for CUDA (the agents' rule, OnPolicyAgent.sync_free).
            sync_free=self.params[0].device.type == "cuda" if config.sync_free is None else config.sync_free,
        )
        self.layer_params: list[Tensor] = list(self.kfac.param_groups[0]["params"])
        position = {id(param): index for index, param in enumerate(self.params)}
        outside = [tuple(p.shape) for p in self.layer_params if id(p) not in position]
        if outside:
            raise ValueError(
                f"Invalid module: parameters of shapes {outside} are not actor parameters; expected a module "
                "whose trainable parameters the policy distribution depends on"
            )
        self._positions = [position[id(param)] for param in self.layer_params]

    def _record_fisher(self, problem: CurvatureProblem) -> None:
        if problem.fisher_trace is not None:
            with torch.enable_grad(), self.kfac.track_statistics(hooks=False):
                loss, trace = problem.fisher_trace()
                output_grads = torch.autograd.grad(loss, [output for _, _, output in trace])
                for (layer, inputs, _), output_grad in zip(trace, output_grads, strict=True):
                    self.kfac.record_statistics(layer, inputs, output_grad)
        elif problem.fisher_loss is not None:
            with torch.enable_grad(), self.kfac.track_statistics():
                torch.autograd.grad(problem.fisher_loss(), self.layer_params)
        else:
            raise ValueError("Invalid problem: curvature 'kfac' needs fisher_trace or fisher_loss; the caller gave neither")

    def direction(self, grad: Tensor, fvp: FisherVectorProduct, problem: CurvatureProblem) -> Direction:
        self._record_fisher(problem)
        pieces = list(unflatten(grad, self.params))
        preconditioned = self.kfac.precondition([pieces[index] for index in self._positions])
        for index, piece in zip(self._positions, preconditioned):
            pieces[index] = piece
        return Direction(torch.cat([piece.reshape(-1) for piece in pieces]))

    def state_dict(self) -> dict[str, Any]:
        return {"kfac": self.kfac.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        self.kfac.load_state_dict(dict(state["kfac"]))


class ShampooCurvature(Curvature):
    r"""s = Shampoo's direction for g: L^(-1/4) g R^(-1/4) per weight matrix, per-axis diagonal for vectors.

    Shampoo runs without momentum (β₁ = 0: the direction is for this update's gradient only),
    with exponentially averaged statistics (β₂ = 0.99, about the last hundred gradients, bias
    corrected), preconditioned from the first update with roots recomputed every update.
    Two settings make it work with the default [64, 64] actor (before them TRPO reached only
    68 on CartPole-v1 on some seeds):

    - per-parameter SGD grafting: each weight and bias keeps its gradient's norm and takes
      only its direction from Shampoo. Ungrafted, L^(-1/4) G R^(-1/4) has about the same norm
      for every layer whatever its gradient, so the first layers' 100-1000x smaller, noisier
      gradients took most of the KL-scaled step;
    - a relative ``epsilon`` 1e-4 (ε times each statistic's mean eigenvalue): one update
      gives one gradient, so the statistics stay of low rank, and an absolute ε = 1e-8
      amplified the directions they had not seen by ε^(-1/4) = 100 per side, a factor tied
      to the gradients' scale. The relative ε bounds it by 10 against a direction of average
      curvature, whatever the scale.

    The KL scaling then sets the step length. The gradient is handed to
    :meth:`~trpo_lab.optim.Shampoo.preconditioned_direction` through the parameters' ``.grad``,
    which is restored afterwards.
    """

    name = "shampoo"
    BETA2: ClassVar[float] = 0.99
    EPSILON: ClassVar[float] = 1e-4
    RELATIVE_EPSILON: ClassVar[bool] = True
    GRAFTING: ClassVar[str] = "sgd"

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        config: TrustRegionConfig,
        module: nn.Module | None = None,
        statistics_reducer: StatisticsReducer | None = None,
    ) -> None:
        super().__init__(params, config)
        self.shampoo = Shampoo(
            self.params,
            lr=1.0,
            betas=(0.0, self.BETA2),
            epsilon=self.EPSILON,
            relative_epsilon=self.RELATIVE_EPSILON,
            precondition_every=1,
            start_preconditioning_step=1,
            grafting=self.GRAFTING,  # type: ignore[arg-type]
        )

    def direction(self, grad: Tensor, fvp: FisherVectorProduct, problem: CurvatureProblem) -> Direction:
        saved = [p.grad for p in self.params]
        try:
            for param, piece in zip(self.params, unflatten(grad, self.params)):
                param.grad = piece.detach().clone()
            directions = self.shampoo.preconditioned_direction()
        finally:
            for param, saved_grad in zip(self.params, saved):
                param.grad = saved_grad
        return Direction(torch.cat([d.reshape(-1) for d in directions]))

    def state_dict(self) -> dict[str, Any]:
        return {"shampoo": self.shampoo.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        self.shampoo.load_state_dict(dict(state["shampoo"]))


CURVATURE_BACKENDS: dict[str, type[Curvature]] = {
    backend.name: backend for backend in (CGCurvature, KFACCurvature, ShampooCurvature, ExactCurvature)
}


def make_curvature(
    config: TrustRegionConfig,
    params: Sequence[nn.Parameter],
    module: nn.Module | None = None,
    statistics_reducer: StatisticsReducer | None = None,
) -> Curvature:
    """The backend named by ``config.curvature`` over the actor ``params`` (see :class:`Curvature`)."""
    return CURVATURE_BACKENDS[config.curvature](params, config, module, statistics_reducer)

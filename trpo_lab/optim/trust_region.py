r"""The natural step of TRPO and NPG: the one place that combines the trust-region pieces.

Given the gradient :math:`g = ∇_θ L(θ_{old})` of an objective to maximise and the (damped)
Fisher-vector product :math:`v ↦ F v` of the mean KL at :math:`θ_{old}`,

.. math::

    s ≈ F^{-1} g, \qquad β = \sqrt{2δ / s^⊤ F s}, \qquad Δθ = β s,

where :math:`s` comes from a curvature solver (conjugate gradient on :math:`F v` by default;
K-FAC, Shampoo or a dense solve are other ``solve`` callables). Under the quadratic model
:math:`KL(θ, θ + Δθ) ≈ ½ Δθ^⊤ F Δθ` the step lands on the trust-region boundary
:math:`KL = δ` (Schulman et al., 2015, "Trust Region Policy Optimization", Appendix C). NPG
applies :math:`Δθ` as it is, a natural-gradient step with a per-update step size (Kakade,
2001, "A Natural Policy Gradient"); TRPO backtracks along it with the KL-constrained line
search :func:`trust_region_line_search` (:func:`~trpo_lab.optim.line_search.kl_line_search`);
:func:`take_full_step` is NPG's. Both judge candidates through a :class:`NaturalStep`'s
``evaluate(candidates) -> (losses, kls)`` closure, sequentially or batched (``torch.func.vmap``).

Everything here works on flat vectors and closures, like ``torch.optim``: nothing knows about
policies, environments or processes. Callers pass ``fvp`` already averaged over their data
(e.g. over data-parallel ranks) and an ``evaluate(candidates) -> (losses, kls)`` closure.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple

import torch
from torch import Tensor

from trpo_lab.optim._flat import assign_flat_, flat_params
from trpo_lab.optim.cg import solve_cg
from trpo_lab.optim.line_search import LineSearchResult, kl_line_search

__all__ = [
    "Direction",
    "Evaluate",
    "FisherVectorProduct",
    "NaturalStep",
    "NaturalStepResult",
    "Solve",
    "cg_solve",
    "natural_step",
    "scale_to_kl_radius",
    "take_full_step",
    "trust_region_line_search",
]

FisherVectorProduct = Callable[[Tensor], Tensor]
"""``v ↦ F v`` on flat vectors (damping included)."""

_NO_METRICS: Mapping[str, Tensor] = MappingProxyType({})


class Direction(NamedTuple):
    """What a curvature solver returns for one gradient.

    Attributes:
        direction: The flat direction :math:`s ≈ F^{-1} g` (same layout as the gradient).
        product: :math:`F s` when the solver has it for free (CG: :math:`g − r`), else None;
            :func:`natural_step` then spends one Fisher-vector product on it.
        metrics: The solver's diagnostics (0-dim tensors), e.g. ``cg_residual``.
    """

    direction: Tensor
    product: Tensor | None = None
    metrics: Mapping[str, Tensor] = _NO_METRICS


Solve = Callable[[Tensor, FisherVectorProduct], Direction]
"""``(g, fvp) ↦ Direction``: where the step direction comes from."""


def cg_solve(max_iter: int = 10, tol: float = 1e-10, stop_early: bool | None = None) -> Solve:
    """Conjugate gradient on the Fisher-vector product as a :data:`Solve` (the default solver).

    Args:
        max_iter: CG iterations, one Fisher-vector product each. Default 10.
        tol: CG stops changing the solution once ``‖r‖² < tol``. Default 1e-10.
        stop_early: Stop the loop once converged (one host read per iteration). Default: on
            the CPU only, so that a GPU run makes no host synchronisation.

    Returns:
        A solver whose :class:`Direction` carries :math:`F s = g − r` (no extra product) and
        the metrics ``cg_residual`` (:math:`‖r‖`) and ``cg_iterations`` (as the gradient's dtype).
    """

    def solve(grad: Tensor, fvp: FisherVectorProduct) -> Direction:
        early = grad.device.type == "cpu" if stop_early is None else stop_early
        cg = solve_cg(fvp, grad, max_iter=max_iter, tol=tol, stop_early=early)
        metrics = {"cg_residual": cg.residual_norm, "cg_iterations": cg.iterations.to(cg.x.dtype)}
        return Direction(cg.x, grad - cg.residual, metrics)

    return solve


class NaturalStepResult(NamedTuple):
    """The natural step of one update, before it is applied; every field is a tensor.

    Attributes:
        direction: :math:`s ≈ F^{-1} g`.
        full_step: :math:`Δθ = β s`, on the quadratic model's KL boundary.
        curvature: :math:`s^⊤ F s`.
        expected_improvement: :math:`g^⊤ Δθ`, the first-order predicted gain of the full step.
        metrics: The solver's diagnostics (:attr:`Direction.metrics`).
    """

    direction: Tensor
    full_step: Tensor
    curvature: Tensor
    expected_improvement: Tensor
    metrics: Mapping[str, Tensor]


def scale_to_kl_radius(direction: Tensor, curvature: Tensor, kl_limit: float) -> Tensor:
    r"""The step :math:`β s` with :math:`β = \sqrt{2δ / s^⊤ F s}`.

    Under the quadratic model :math:`KL(θ, θ + βs) ≈ ½ β² s^⊤ F s` this step lands on the
    trust-region boundary :math:`KL = δ` (Schulman et al., 2015, Appendix C).

    Args:
        direction: The direction :math:`s` (flat).
        curvature: :math:`s^⊤ F s` (0-dim), e.g. ``s · fvp(s)`` or, after CG, ``s · (g − r)``.
        kl_limit: :math:`δ > 0`.

    Returns:
        The scaled step; the zero vector when :math:`s^⊤ F s` is not positive and finite (a
        numerically zero gradient), rather than a division by zero. No host synchronisation.
    """
    if not kl_limit > 0:
        raise ValueError(f"Invalid kl_limit: {kl_limit!r}; expected > 0")
    ok = (curvature > 0) & torch.isfinite(curvature)
    safe = torch.where(ok, curvature, torch.ones_like(curvature))
    beta = torch.where(ok, torch.sqrt(2.0 * kl_limit / safe), torch.zeros_like(curvature))
    return beta * direction


def natural_step(
    grad: Tensor, fvp: FisherVectorProduct, kl_limit: float, *, solve: Solve | None = None
) -> NaturalStepResult:
    r"""The natural-gradient step :math:`β s`, :math:`s ≈ F^{-1} g`, :math:`β = \sqrt{2δ / s^⊤Fs}`.

    Args:
        grad: The flat gradient :math:`g` of the objective to maximise, at :math:`θ_{old}`.
        fvp: :math:`v ↦ F v`, the damped Fisher-vector product of the mean KL at
            :math:`θ_{old}` (:func:`~trpo_lab.optim.fisher.fisher_vector_product`).
        kl_limit: The trust-region radius :math:`δ > 0`.
        solve: Where :math:`s` comes from; default :func:`cg_solve` with its defaults. When
            the solver returns no :math:`F s`, one extra ``fvp`` call computes it.

    Returns:
        A :class:`NaturalStepResult`; nothing is applied. No host synchronisation beyond the
        solver's own (CG stops early on the CPU).

    Raises:
        ValueError: ``kl_limit <= 0``, or ``grad`` is not a flat vector.
    """
    if not kl_limit > 0:
        raise ValueError(f"Invalid kl_limit: {kl_limit!r}; expected > 0")
    if not isinstance(grad, Tensor) or grad.dim() != 1:
        shape = tuple(grad.shape) if isinstance(grad, Tensor) else type(grad).__name__
        raise ValueError(f"Invalid grad: got {shape}; expected a 1-D (flat) tensor")
    solved = (solve or cg_solve())(grad, fvp)
    direction = solved.direction
    product = solved.product if solved.product is not None else fvp(direction)
    curvature = torch.dot(direction, product)
    full_step = scale_to_kl_radius(direction, curvature, kl_limit)
    return NaturalStepResult(direction, full_step, curvature, torch.dot(grad, full_step), solved.metrics)


Evaluate = Callable[[Tensor], tuple[Tensor, Tensor]]
"""``(K, P)`` flat candidate parameters ↦ ``(losses (K,), mean KLs (K,))``, the loss being the
negative objective; must not need the parameters to be changed (e.g. ``torch.func``)."""


class NaturalStep(NamedTuple):
    """A natural step ready to be applied: the scaled step and what judging a candidate needs.

    Attributes:
        full_step: :math:`Δθ = β s` (:attr:`NaturalStepResult.full_step`).
        expected_improvement: :math:`g^⊤ Δθ`.
        loss0: The loss (negative objective) at :math:`θ_{old}`.
        evaluate: The :data:`Evaluate` closure of this problem (π_old bound in it).
        metrics: Diagnostics of the step (0-dim tensors), keyed as the caller logs them.
    """

    full_step: Tensor
    expected_improvement: Tensor
    loss0: Tensor
    evaluate: Evaluate
    metrics: dict[str, Tensor]


def trust_region_line_search(
    params: Sequence[Tensor],
    step: NaturalStep,
    *,
    kl_limit: float,
    shrinking_factor: float = 0.8,
    max_iter: int = 10,
    accept_ratio: float = 0.0,
    batched: bool = False,
) -> LineSearchResult:
    r"""TRPO's acceptance of a natural step: backtrack along :math:`β s` within the KL limit.

    Tries :math:`θ_{old} + c^k β s` for :math:`k = 0, 1, …` and keeps the first candidate that
    improves the loss (by more than ``accept_ratio`` of :math:`c^k g^⊤ β s`) with mean KL
    :math:`≤ δ` (Schulman et al., 2015, Appendix C); see
    :func:`~trpo_lab.optim.line_search.kl_line_search`, which this calls with the step's full
    step, loss, expected improvement and ``evaluate``.

    Args:
        params: The parameters :math:`θ` the step is for (flat layout = their order); the
            kept candidate is written into them (θ_old restored bitwise on failure).
        step: The step, its ``evaluate`` called once per candidate, or once with all
            ``max_iter`` of them when ``batched``.
        kl_limit: :math:`δ > 0`.
        shrinking_factor: :math:`c ∈ (0, 1)`. Default 0.8.
        max_iter: Candidates tried. Default 10.
        accept_ratio: Required fraction of the predicted improvement. Default 0.
        batched: One call for all candidates, chosen with tensor operations (no host
            synchronisation). Default False: stop at the first acceptable one.

    Returns:
        The :class:`~trpo_lab.optim.line_search.LineSearchResult`.
    """
    return kl_line_search(
        params,
        step.full_step.detach(),
        step.evaluate,
        loss0=step.loss0,
        expected_improvement=step.expected_improvement.detach(),
        kl_limit=kl_limit,
        shrinking_factor=shrinking_factor,
        max_iter=max_iter,
        accept_ratio=accept_ratio,
        batched=batched,
    )


def take_full_step(params: Sequence[Tensor], step: NaturalStep) -> tuple[Tensor, Tensor]:
    r"""NPG's application of a natural step: :math:`θ ← θ_{old} + β s`, unsearched (Kakade, 2001).

    Returns:
        ``(loss, kl)`` at the new parameters, from ``step.evaluate`` (one candidate).
    """
    params = list(params)
    new_params = flat_params(params) + step.full_step.detach()
    losses, kls = step.evaluate(new_params.unsqueeze(0))
    assign_flat_(params, new_params)
    return losses[0], kls[0]

"""KL-constrained backtracking line search (the step acceptance of TRPO).

TRPO scales its natural-gradient direction to the edge of the trust region and
then shrinks it geometrically until the step both improves the objective and
keeps the mean KL within the limit (Schulman et al., 2015, "Trust Region Policy
Optimization", Appendix C). The search here is RL-agnostic: it sees flat
candidate parameter vectors and a closure that returns their losses and KLs.
It runs either one candidate at a time, stopping at the first acceptable one,
or all candidates in one batched evaluation with the choice made by tensor
operations and no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from trpo_lab.optim._flat import assign_flat_, flat_params, total_numel, validate_params
from trpo_lab.validation import check_int, check_number

__all__ = ["LineSearchResult", "kl_line_search"]


class LineSearchResult(NamedTuple):
    """The outcome of :func:`kl_line_search`; every field is a 0-dim tensor.

    Attributes:
        success: bool, whether an acceptable candidate was found.
        step_fraction: The accepted fraction ``shrinking_factor**i`` of the full
            step; 0 on failure.
        backtracks: int64, the index ``i`` of the accepted candidate (0 means the
            full step); ``max_iter`` on failure.
        loss: The loss at the parameters kept (``loss0`` on failure).
        kl: The KL at the parameters kept; 0 on failure.
        expected_improvement: The first-order predicted improvement of the
            accepted step, ``step_fraction * expected_improvement``; 0 on failure.
        actual_improvement: ``loss0 - loss`` at the parameters kept; 0 on failure.
    """

    success: Tensor
    step_fraction: Tensor
    backtracks: Tensor
    loss: Tensor
    kl: Tensor
    expected_improvement: Tensor
    actual_improvement: Tensor


def _validate(
    params: list[Tensor],
    full_step: Tensor,
    loss0: Tensor,
    expected_improvement: Tensor,
    kl_limit: float,
    shrinking_factor: float,
    max_iter: int,
    accept_ratio: float,
) -> None:
    check_number("kl_limit", kl_limit, minimum=0.0, strict=True)
    check_number("shrinking_factor", shrinking_factor, minimum=0.0, maximum=1.0, strict=True,
                 expected="a number in the open interval (0, 1)")
    check_int("max_iter", max_iter, minimum=1)
    check_number("accept_ratio", accept_ratio, minimum=0.0)
    size = total_numel(params)
    if not isinstance(full_step, Tensor) or full_step.dim() != 1 or full_step.numel() != size:
        shape = tuple(full_step.shape) if isinstance(full_step, Tensor) else type(full_step).__name__
        raise ValueError(
            f"Invalid full_step: got {shape}; expected a 1-D tensor of length {size} "
            "(the total number of parameter elements)"
        )
    for name, value in (("loss0", loss0), ("expected_improvement", expected_improvement)):
        if not isinstance(value, Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"Invalid {name}: got {shape}; expected a scalar tensor")


def _candidates(theta0: Tensor, full_step: Tensor, fractions: Tensor) -> Tensor:
    """Returns the ``(K, P)`` candidates ``θ0 + fractions[k] · full_step``."""
    return theta0 + fractions.unsqueeze(-1) * full_step


def _evaluate(evaluate: Callable[[Tensor], tuple[Tensor, Tensor]], candidates: Tensor) -> tuple[Tensor, Tensor]:
    count = candidates.shape[0]
    with torch.no_grad():
        losses, kls = evaluate(candidates)
    for name, value in (("losses", losses), ("kls", kls)):
        if not isinstance(value, Tensor) or value.numel() != count:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"Invalid evaluate: it returned {name} of shape {shape} for {count} candidate(s); "
                f"expected a tensor of shape ({count},)"
            )
    return losses.detach().reshape(count), kls.detach().reshape(count)


def _acceptable(
    losses: Tensor,
    kls: Tensor,
    fractions: Tensor,
    loss0: Tensor,
    expected_improvement: Tensor,
    kl_limit: float,
    accept_ratio: float,
) -> Tensor:
    """Returns the boolean mask of candidates that satisfy the acceptance test."""
    improved = (loss0 - losses) > accept_ratio * fractions * expected_improvement
    return torch.isfinite(losses) & torch.isfinite(kls) & (kls <= kl_limit) & improved


def _finish(
    params: list[Tensor],
    theta0: Tensor,
    full_step: Tensor,
    fractions: Tensor,
    losses: Tensor,
    kls: Tensor,
    acceptable: Tensor,
    loss0: Tensor,
    expected_improvement: Tensor,
    max_iter: int,
) -> LineSearchResult:
    """Picks the first acceptable candidate, writes the kept parameters, builds the result.

    Only tensor operations: the index is a device tensor, selected values come
    from ``index_select`` and ``torch.where``, so nothing waits for the host.
    """
    evaluated = acceptable.shape[0]
    positions = torch.arange(evaluated, device=acceptable.device)
    backtracks = torch.where(acceptable, positions, max_iter).amin()
    success = backtracks < max_iter
    chosen = backtracks.clamp(max=evaluated - 1).reshape(1)

    def pick(values: Tensor) -> Tensor:
        return values.index_select(0, chosen).squeeze(0)

    step_fraction = torch.where(success, pick(fractions[:evaluated]), 0.0)
    loss = torch.where(success, pick(losses), loss0)
    kl = torch.where(success, pick(kls), 0.0)
    predicted = torch.where(success, step_fraction * expected_improvement, 0.0)
    actual = torch.where(success, loss0 - loss, 0.0)
    kept = torch.where(success, _candidates(theta0, full_step, step_fraction), theta0)
    assign_flat_(params, kept)
    return LineSearchResult(
        success=success,
        step_fraction=step_fraction,
        backtracks=backtracks,
        loss=loss,
        kl=kl,
        expected_improvement=predicted,
        actual_improvement=actual,
    )


def kl_line_search(
    params: Sequence[Tensor],
    full_step: Tensor,
    evaluate: Callable[[Tensor], tuple[Tensor, Tensor]],
    *,
    loss0: Tensor,
    expected_improvement: Tensor,
    kl_limit: float,
    shrinking_factor: float = 0.8,
    max_iter: int = 10,
    accept_ratio: float = 0.0,
    batched: bool = False,
) -> LineSearchResult:
    r"""Backtracks along ``full_step`` until the loss improves within the KL limit.

    Candidate ``i = 0, …, max_iter-1`` is ``θ_i = θ_0 + c^i · s`` with
    ``c = shrinking_factor`` and ``s = full_step``. It is acceptable iff

    .. math::

        L(θ_i),\ D(θ_i) \text{ finite},\quad D(θ_i) \le δ,\quad
        L(θ_0) - L(θ_i) > r \cdot c^i \cdot E

    with ``δ = kl_limit``, ``r = accept_ratio`` and ``E = expected_improvement``
    (``accept_ratio = 0`` asks for strict improvement, as sb3-contrib's TRPO
    does; ``0.1`` is the Armijo-style test of Schulman et al., 2015, "Trust
    Region Policy Optimization", Appendix C). The first acceptable candidate is
    written into ``params`` in place (under ``torch.no_grad``). If none is
    acceptable, ``params`` are restored bitwise to ``θ_0``.

    Args:
        params: The parameter tensors ``θ``; their order defines the flat layout.
        full_step: The full step ``s``, a 1-D tensor of length ``Σ p.numel()``.
        evaluate: Maps a ``(K, P)`` tensor of flat candidate parameter vectors to
            ``(losses, kls)``, each of shape ``(K,)``, without needing ``params``
            to be changed (e.g. with ``torch.func.functional_call``, and
            ``torch.func.vmap`` over candidates in batched mode). It is called
            under ``torch.no_grad``. The loss is minimised: pass the negative
            surrogate objective.
        loss0: The loss at ``θ_0``, a scalar tensor.
        expected_improvement: The first-order predicted decrease of the loss for
            the full step, ``-∇L · s``, a scalar tensor.
        kl_limit: The trust-region radius ``δ > 0`` on the KL (sb3-contrib's
            ``target_kl``).
        shrinking_factor: The ratio ``c ∈ (0, 1)`` between consecutive step
            sizes. Default 0.8.
        max_iter: The number of candidates, ``>= 1``. Default 10.
        accept_ratio: The fraction ``r >= 0`` of the predicted improvement that
            must be realised. Default 0.
        batched: If False, evaluate one candidate at a time (``K = 1``) and stop
            at the first acceptable one, which reads a value on the host per
            candidate. If True, evaluate all ``max_iter`` candidates in one call
            and choose with tensor operations, with no host synchronisation.
            Both modes give the same result for the same losses and KLs.

    Returns:
        A :class:`LineSearchResult`.

    Raises:
        ValueError: If ``kl_limit <= 0``, ``shrinking_factor`` is outside
            ``(0, 1)``, ``max_iter < 1``, ``accept_ratio < 0``, ``full_step`` is
            not a flat vector of the total parameter size, ``loss0`` or
            ``expected_improvement`` is not a scalar tensor, or ``evaluate``
            returns tensors of the wrong size.
    """
    params = validate_params(params)
    _validate(params, full_step, loss0, expected_improvement, kl_limit, shrinking_factor, max_iter, accept_ratio)
    theta0 = flat_params(params)
    full_step = full_step.detach().to(theta0.dtype)
    loss0 = loss0.detach().reshape(())
    expected_improvement = expected_improvement.detach().reshape(())
    # Computed once on the device and shared by both modes, so that candidate i
    # is bitwise the same vector whichever mode built it.
    fractions = torch.pow(
        torch.full((max_iter,), shrinking_factor, dtype=theta0.dtype, device=theta0.device),
        torch.arange(max_iter, dtype=theta0.dtype, device=theta0.device),
    )

    def acceptable(losses: Tensor, kls: Tensor, candidate_fractions: Tensor) -> Tensor:
        return _acceptable(losses, kls, candidate_fractions, loss0, expected_improvement, kl_limit, accept_ratio)

    if batched:
        losses, kls = _evaluate(evaluate, _candidates(theta0, full_step, fractions))
    else:
        loss_list: list[Tensor] = []
        kl_list: list[Tensor] = []
        for index in range(max_iter):
            loss_i, kl_i = _evaluate(evaluate, _candidates(theta0, full_step, fractions[index : index + 1]))
            loss_list.append(loss_i)
            kl_list.append(kl_i)
            if bool(acceptable(loss_i, kl_i, fractions[index : index + 1])):
                break
        losses, kls = torch.cat(loss_list), torch.cat(kl_list)
    mask = acceptable(losses, kls, fractions[: losses.shape[0]])
    return _finish(params, theta0, full_step, fractions, losses, kls, mask, loss0, expected_improvement, max_iter)

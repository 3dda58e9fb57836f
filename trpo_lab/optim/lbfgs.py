r"""L-BFGS with a fixed budget and no host synchronisation (the device-resident critic fit).

``torch.optim.LBFGS`` decides on the host: it reads the loss (``float``), compares norms and
steps in its strong-Wolfe line search with Python ``if``\ s, so on a GPU every iteration waits
for the device several times. :func:`lbfgs_fixed` makes the same kind of quasi-Newton steps
with every decision a tensor operation:

* exactly ``max_iter`` iterations run, each with one loss-and-gradient evaluation;
* the direction is the two-loop recursion (Nocedal & Wright, 2006, Algorithm 7.4) over the
  last ``history_size`` curvature pairs, kept in preallocated ``(m, P)`` tensors; a pair
  enters only when :math:`y^⊤ s > ε` (masked write), and the initial Hessian scale is
  :math:`γ = s^⊤ y / y^⊤ y` of the newest pair;
* a direction that does not descend (:math:`g^⊤ d ≥ 0`) is replaced by :math:`-g`;
* instead of a line search, each trial point :math:`x + t d` is accepted if it satisfies the
  Armijo condition :math:`f(x + t d) ≤ f(x) + c_1 t\, g^⊤ d` and is finite; a rejected trial
  is undone with ``torch.where`` and the next iteration tries half the step along the same
  direction. An accepted step resets :math:`t` to 1 (the first iteration, without curvature
  information, starts at :math:`\min(1, 1/‖g‖_1)` as torch's LBFGS).

Once converged (a zero gradient or direction) the remaining iterations change nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from trpo_lab.optim._flat import assign_flat_, flat_params, validate_params
from trpo_lab.validation import check_int, check_number, is_number, require

__all__ = ["LBFGSResult", "lbfgs_fixed"]


class LBFGSResult(NamedTuple):
    """The outcome of :func:`lbfgs_fixed` (0-dim tensors).

    Attributes:
        loss: The loss at the parameters kept.
        accepted: int64, how many of the trial steps were accepted.
    """

    loss: Tensor
    accepted: Tensor


def _two_loop(grad: Tensor, s_hist: Tensor, y_hist: Tensor, rho: Tensor, count: Tensor, gamma: Tensor) -> Tensor:
    """``-H g`` by the two-loop recursion over the stored pairs, newest first (masked by ``count``)."""
    m = s_hist.shape[0]
    q = grad.neg()
    alphas: list[Tensor] = []
    slots: list[Tensor] = []
    for i in range(m):  # newest to oldest
        slot = torch.remainder(count - 1 - i, m).reshape(1)
        used = count > i
        s, y, r = s_hist.index_select(0, slot)[0], y_hist.index_select(0, slot)[0], rho.index_select(0, slot)[0]
        alpha = torch.where(used, r * torch.dot(s, q), 0.0)
        q = q - alpha * y
        alphas.append(alpha)
        slots.append(slot)
    q = q * gamma
    for i in reversed(range(m)):  # oldest to newest
        slot, used = slots[i], count > i
        s, y, r = s_hist.index_select(0, slot)[0], y_hist.index_select(0, slot)[0], rho.index_select(0, slot)[0]
        beta = torch.where(used, r * torch.dot(y, q), 0.0)
        q = q + (alphas[i] - beta) * s
    return q


def lbfgs_fixed(
    params: Sequence[Tensor],
    loss_and_grad: Callable[[], tuple[Tensor, Tensor]],
    *,
    max_iter: int = 25,
    history_size: int = 25,
    armijo: float = 1e-4,
    curvature_eps: float = 1e-10,
) -> LBFGSResult:
    r"""Minimise a loss over ``params`` by ``max_iter`` masked L-BFGS steps, without host syncs.

    Args:
        params: The parameters (their order defines the flat layout); updated in place.
        loss_and_grad: Evaluates the loss at the *current* values of ``params`` and returns
            ``(loss (0-dim), flat gradient)``, e.g. a forward, ``backward`` and the
            concatenated ``.grad``\ s. Called ``max_iter + 1`` times.
        max_iter: Iterations (trial steps), ``>= 1``. Default 25.
        history_size: Curvature pairs kept, ``>= 1``. Default 25.
        armijo: :math:`c_1` of the sufficient-decrease test, in ``[0, 1)``. Default 1e-4.
        curvature_eps: A pair enters the history only if :math:`y^⊤ s >` this. Default 1e-10.

    Returns:
        An :class:`LBFGSResult`; ``params`` hold the last accepted point.

    Raises:
        ValueError: for a bad ``max_iter``, ``history_size``, ``armijo`` or ``curvature_eps``.
    """
    params = validate_params(params)
    check_int("max_iter", max_iter, minimum=1)
    check_int("history_size", history_size, minimum=1)
    require(is_number(armijo) and 0.0 <= armijo < 1.0, "armijo", armijo, "a number in [0, 1)")
    check_number("curvature_eps", curvature_eps, minimum=0.0)
    with torch.no_grad():
        x = flat_params(params)
    loss, grad = loss_and_grad()
    loss, grad = loss.detach().reshape(()), grad.detach()
    size, device, dtype = x.numel(), x.device, x.dtype
    s_hist = torch.zeros(history_size, size, dtype=dtype, device=device)
    y_hist = torch.zeros_like(s_hist)
    rho = torch.zeros(history_size, dtype=dtype, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    gamma = torch.ones((), dtype=dtype, device=device)
    accepted = torch.zeros((), dtype=torch.int64, device=device)
    direction = grad.neg()
    step = torch.clamp(1.0 / grad.abs().sum().clamp_min(torch.finfo(dtype).tiny), max=1.0)
    for _ in range(max_iter):
        slope = torch.dot(grad, direction)
        trial = x + step * direction
        with torch.no_grad():
            assign_flat_(params, trial)
        trial_loss, trial_grad = loss_and_grad()
        trial_loss, trial_grad = trial_loss.detach().reshape(()), trial_grad.detach()
        ok = (
            torch.isfinite(trial_loss)
            & torch.isfinite(trial_grad).all()
            & (slope < 0)
            & (trial_loss <= loss + armijo * step * slope)
        )
        s, y = trial - x, trial_grad - grad
        ys = torch.dot(y, s)
        keep_pair = ok & (ys > curvature_eps)
        slot = torch.remainder(count, history_size).reshape(1)
        s_hist.index_copy_(0, slot, torch.where(keep_pair, s, s_hist.index_select(0, slot)[0]).unsqueeze(0))
        y_hist.index_copy_(0, slot, torch.where(keep_pair, y, y_hist.index_select(0, slot)[0]).unsqueeze(0))
        safe_ys = torch.where(keep_pair, ys, torch.ones_like(ys))
        rho.index_copy_(0, slot, torch.where(keep_pair, 1.0 / safe_ys, rho.index_select(0, slot)[0]).reshape(1))
        gamma = torch.where(keep_pair, ys / torch.dot(y, y).clamp_min(torch.finfo(dtype).tiny), gamma)
        count = count + keep_pair.to(torch.int64)
        x = torch.where(ok, trial, x)
        loss = torch.where(ok, trial_loss, loss)
        grad = torch.where(ok, trial_grad, grad)
        accepted = accepted + ok.to(torch.int64)
        new_direction = _two_loop(grad, s_hist, y_hist, rho, count, gamma)
        descends = torch.dot(grad, new_direction) < 0  # else fall back to steepest descent
        new_direction = torch.where(descends, new_direction, grad.neg())
        direction = torch.where(ok, new_direction, direction)
        step = torch.where(ok, torch.ones_like(step), 0.5 * step)
    with torch.no_grad():
        assign_flat_(params, x)
    return LBFGSResult(loss=loss, accepted=accepted)

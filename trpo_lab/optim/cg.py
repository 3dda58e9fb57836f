"""Conjugate gradient for symmetric positive (semi-)definite systems given as matrix-vector products.

TRPO and natural policy gradient never form the Fisher matrix ``F``; they solve
``F x = g`` with a few conjugate-gradient iterations on Fisher-vector products
(Schulman et al., 2015, "Trust Region Policy Optimization", Appendix C;
Hestenes & Stiefel, 1952). The solver here runs a fixed number of iterations
and freezes its state by masking once converged, so that on a GPU it never
waits for the host (no ``.item()``, no ``if residual < tol: break``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from trpo_lab.validation import check_int, check_number

__all__ = ["CGResult", "conjugate_gradient", "solve_cg"]


class CGResult(NamedTuple):
    """The outcome of :func:`solve_cg`; every field is a tensor on the device of ``b``.

    Attributes:
        x: The approximate solution of ``A x = b``, same shape and dtype as ``b``.
        residual_norm: 0-dim tensor, ``‖r‖₂`` with ``r`` the residual ``b - A x``
            as tracked by the CG recurrence (not recomputed with an extra product).
        iterations: 0-dim int64 tensor, the number of iterations that changed ``x``.
        residual: The recurrence's residual vector ``r = b - A x``, so that
            ``A x = b - r`` is available without another ``matvec`` (TRPO's ``sᵀFs``).
    """

    x: Tensor
    residual_norm: Tensor
    iterations: Tensor
    residual: Tensor


def _validate(b: Tensor, max_iter: int, tol: float, x0: Tensor | None) -> None:
    if not isinstance(b, Tensor) or b.dim() != 1:
        shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
        raise ValueError(f"Invalid b: got {shape}; expected a 1-D tensor (a flat vector)")
    if not b.is_floating_point():
        raise ValueError(f"Invalid b: got dtype {b.dtype}; expected a floating-point tensor")
    check_int("max_iter", max_iter, minimum=1)
    check_number("tol", tol, minimum=0.0, expected="a finite number >= 0 (a bound on the squared residual)")
    if x0 is not None and (not isinstance(x0, Tensor) or x0.shape != b.shape):
        shape = tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__
        raise ValueError(f"Invalid x0: got {shape}; expected None or a tensor of the shape of b, {tuple(b.shape)}")


def solve_cg(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    max_iter: int = 10,
    tol: float = 1e-10,
    x0: Tensor | None = None,
    stop_early: bool = False,
) -> CGResult:
    r"""Solves ``A x = b`` for a symmetric positive-definite ``A`` by conjugate gradient.

    With ``r_0 = b - A x_0`` and ``p_0 = r_0``, each iteration computes

    .. math::

        α_k = \frac{r_k^⊤ r_k}{p_k^⊤ A p_k},\quad
        x_{k+1} = x_k + α_k p_k,\quad
        r_{k+1} = r_k - α_k A p_k,\quad
        β_k = \frac{r_{k+1}^⊤ r_{k+1}}{r_k^⊤ r_k},\quad
        p_{k+1} = r_{k+1} + β_k p_k

    (Hestenes & Stiefel, 1952; used by Schulman et al., 2015, "Trust Region
    Policy Optimization", Appendix C). In exact arithmetic it solves the system
    in at most as many iterations as ``A`` has distinct eigenvalues.

    Exactly ``max_iter`` iterations run, each with one call to ``matvec``; there
    is no host synchronisation in the loop. An iteration is *active* while
    ``r^⊤ r >= tol`` (and ``r^⊤ r > 0``) and the curvature ``p^⊤ A p`` is
    positive and finite; an inactive iteration leaves ``x``, ``r`` and ``p``
    unchanged (selected with ``torch.where``), so the result equals that of a
    loop that breaks at convergence, and no division by zero can produce NaN or
    inf. ``p^⊤ A p <= 0`` only happens for a matrix that is not positive
    definite (e.g. a Fisher without damping along a direction it ignores); the
    solver then keeps the last iterate, as truncated CG does.

    Args:
        matvec: The linear operator ``v ↦ A v`` on flat vectors, e.g. a
            Fisher-vector product. Must not modify its argument. Its outputs
            (like ``b``) are detached: the solve is not part of any autograd graph.
        b: The right-hand side, a 1-D floating-point tensor (float32 or float64,
            any device).
        max_iter: The number of iterations (and ``matvec`` calls), ``>= 1``.
            Default 10, as sb3-contrib's ``cg_max_steps``.
        tol: Tolerance on the *squared* residual norm ``‖b - A x‖²``: iterations
            stop changing ``x`` once ``r^⊤ r < tol``. This is the meaning of
            sb3-contrib's ``residual_tol``. Default ``1e-10``.
        x0: Optional starting point, shape of ``b``; zero when ``None`` (which
            saves one ``matvec`` call).
        stop_early: Break out of the loop, skipping the remaining ``matvec`` calls,
            once an iteration is inactive. This reads one scalar on the host per
            iteration: worth it on the CPU (where that read is free and a
            Fisher-vector product is not), never on a GPU. The result is identical.

    Returns:
        A :class:`CGResult` with the solution, the recurrence's residual norm
        ``‖r‖₂`` and the number of iterations that changed ``x``.

    Raises:
        ValueError: If ``b`` is not a 1-D floating-point tensor, ``max_iter < 1``,
            ``tol`` is negative or not finite, or ``x0`` has the wrong shape.
    """
    _validate(b, max_iter, tol, x0)
    b = b.detach()
    if x0 is None:
        x = torch.zeros_like(b)
        r = b.clone()
    else:
        x = x0.detach().to(dtype=b.dtype, device=b.device).clone()
        r = b - matvec(x).detach()
    p = r.clone()
    r_dot_r = torch.dot(r, r)
    iterations = torch.zeros((), dtype=torch.int64, device=b.device)
    for _ in range(max_iter):
        active = (r_dot_r >= tol) & (r_dot_r > 0)
        if stop_early and not bool(active):
            break
        a_p = matvec(p).detach()
        curvature = torch.dot(p, a_p)
        step = active & (curvature > 0) & torch.isfinite(curvature)
        if stop_early and not bool(step):
            break
        alpha = torch.where(step, r_dot_r / torch.where(step, curvature, torch.ones_like(curvature)), 0.0)
        x = torch.where(step, x + alpha * p, x)
        r = torch.where(step, r - alpha * a_p, r)
        new_r_dot_r = torch.where(step, torch.dot(r, r), r_dot_r)
        beta = new_r_dot_r / torch.where(step, r_dot_r, torch.ones_like(r_dot_r))
        p = torch.where(step, r + beta * p, p)
        r_dot_r = new_r_dot_r
        iterations = iterations + step.to(torch.int64)
    return CGResult(x=x, residual_norm=torch.sqrt(r_dot_r), iterations=iterations, residual=r)


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    max_iter: int = 10,
    tol: float = 1e-10,
    x0: Tensor | None = None,
    stop_early: bool = False,
) -> Tensor:
    """Returns the solution of ``A x = b`` computed by :func:`solve_cg`.

    Same arguments as :func:`solve_cg`; use that function to also get the
    residual norm and iteration count (e.g. for logging ``train/cg_residual``).
    """
    return solve_cg(matvec, b, max_iter=max_iter, tol=tol, x0=x0, stop_early=stop_early).x

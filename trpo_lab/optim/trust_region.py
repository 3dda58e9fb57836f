"""Scaling a natural-gradient direction to the edge of a KL trust region."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["scale_to_kl_radius"]


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

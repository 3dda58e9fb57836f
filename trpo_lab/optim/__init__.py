"""Curvature and trust-region numerics, RL-agnostic and usable like ``torch.optim``.

- :func:`conjugate_gradient` / :func:`solve_cg`: CG with a fixed iteration count and masking.
- :func:`fisher_vector_product`: ``v -> (∇²KL + damping·I) v`` by double backprop (or
  :func:`fisher_vector_product_func` with ``torch.func``).
- :func:`sampled_fisher_loss`: the loss whose gradients give K-FAC the Fisher's statistics.
- :func:`kl_line_search`: KL-constrained backtracking, sequential or batched.
- :func:`lbfgs_fixed`: L-BFGS with a fixed budget and no host synchronisation.
- :func:`natural_step`: the one trust-region step (direction, sᵀFs, scaling to the KL radius),
  then :func:`trust_region_line_search` (TRPO) or :func:`take_full_step` (NPG).
- :class:`KFAC`: Kronecker-factored natural gradient over Linear/Conv2d layers (ACKTR).
- :class:`Shampoo`: per-axis inverse-root preconditioning with grafting.
- :mod:`trpo_lab.optim.exact`: dense Fisher, Hessian, natural-gradient and Newton steps.
- :mod:`trpo_lab.optim.linalg`: the robust symmetric eigendecomposition and inverse roots
  (float64 retry) that K-FAC and Shampoo share.
"""

from trpo_lab.optim._flat import assign_flat_, flat_params, unflatten
from trpo_lab.optim.cg import CGResult, conjugate_gradient, solve_cg
from trpo_lab.optim.fisher import (
    FisherLoss,
    fisher_vector_product,
    fisher_vector_product_func,
    flat_grad,
    sampled_fisher_loss,
)
from trpo_lab.optim.kfac import KFAC
from trpo_lab.optim.lbfgs import LBFGSResult, lbfgs_fixed
from trpo_lab.optim.line_search import LineSearchResult, kl_line_search
from trpo_lab.optim.shampoo import InverseRootError, Shampoo, matrix_inverse_root
from trpo_lab.optim.trust_region import (
    Direction,
    NaturalStep,
    cg_solve,
    natural_step,
    scale_to_kl_radius,
    take_full_step,
    trust_region_line_search,
)

__all__ = [
    "CGResult",
    "Direction",
    "FisherLoss",
    "NaturalStep",
    "InverseRootError",
    "KFAC",
    "LineSearchResult",
    "Shampoo",
    "assign_flat_",
    "cg_solve",
    "conjugate_gradient",
    "fisher_vector_product",
    "fisher_vector_product_func",
    "flat_grad",
    "flat_params",
    "kl_line_search",
    "LBFGSResult",
    "lbfgs_fixed",
    "matrix_inverse_root",
    "natural_step",
    "sampled_fisher_loss",
    "scale_to_kl_radius",
    "solve_cg",
    "take_full_step",
    "trust_region_line_search",
    "unflatten",
]

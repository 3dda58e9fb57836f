"""Curvature and trust-region numerics, RL-agnostic and usable like ``torch.optim``.

- :func:`conjugate_gradient` / :func:`solve_cg`: CG with a fixed iteration count and masking.
- :func:`fisher_vector_product`: ``v -> (∇²KL + damping·I) v`` by double backprop (or
  :func:`fisher_vector_product_func` with ``torch.func``).
- :func:`kl_line_search`: KL-constrained backtracking, sequential or batched.
- :class:`KFAC`: Kronecker-factored natural gradient over Linear/Conv2d layers (ACKTR).
- :class:`Shampoo`: per-axis inverse-root preconditioning with grafting.
- :mod:`trpo_lab.optim.exact`: dense Fisher, Hessian, natural-gradient and Newton steps.
- :mod:`trpo_lab.optim.linalg`: the robust symmetric eigendecomposition and inverse roots
  (float64 retry) that K-FAC and Shampoo share.
"""

from trpo_lab.optim._flat import assign_flat_, flat_params, unflatten
from trpo_lab.optim.cg import CGResult, conjugate_gradient, solve_cg
from trpo_lab.optim.fisher import fisher_vector_product, fisher_vector_product_func, flat_grad
from trpo_lab.optim.kfac import KFAC
from trpo_lab.optim.line_search import LineSearchResult, kl_line_search
from trpo_lab.optim.shampoo import InverseRootError, Shampoo, matrix_inverse_root
from trpo_lab.optim.trust_region import scale_to_kl_radius

__all__ = [
    "CGResult",
    "InverseRootError",
    "KFAC",
    "LineSearchResult",
    "Shampoo",
    "assign_flat_",
    "conjugate_gradient",
    "fisher_vector_product",
    "fisher_vector_product_func",
    "flat_grad",
    "flat_params",
    "kl_line_search",
    "matrix_inverse_root",
    "scale_to_kl_radius",
    "solve_cg",
    "unflatten",
]

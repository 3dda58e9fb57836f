"""Shampoo: a preconditioned optimizer with one preconditioner per tensor axis.

References:
    Gupta, Koren & Singer (2018), "Shampoo: Preconditioned Stochastic Tensor Optimization".
    Anil, Gupta, Koren, Regan & Singer (2020), "Scalable Second Order Optimization for Deep
    Learning" (exponential moving averages, grafting, large-dimension fallback).
    Shi et al. (2023), "A Distributed Data-Parallel PyTorch Implementation of the Distributed
    Shampoo Optimizer for Training Neural Networks At-Scale" (filtered gradient, float64 retry).
    Agarwal, Anil, Hazan, Koren & Zhang (2020), "Disentangling Adaptive Gradient Methods from
    Learning Rates" (grafting).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, overload

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from trpo_lab.optim._flat import all_finite
from trpo_lab.optim.linalg import InverseRootError, matrix_inverse_root
from trpo_lab.validation import check_int, check_number, is_int, require

__all__ = ["InverseRootError", "Shampoo", "matrix_inverse_root"]

Grafting = Literal["adam", "sgd", "none"]
_GRAFTING_CHOICES: tuple[str, ...] = ("adam", "sgd", "none")

# Per-parameter event counters kept in the optimizer state (so they survive state_dict());
# `Shampoo.stats` sums them over all parameters.
_COUNTERS: tuple[str, ...] = ("skipped_nonfinite_steps", "root_float64_retries", "root_fallbacks")


def _diagonal_inverse_root(statistics: Tensor, root: int, epsilon: float) -> Tensor:
    return (statistics.clamp(min=0.0) + epsilon).pow(-1.0 / root)


def _mean_eigenvalue(statistics: Tensor) -> Tensor:
    """``τ = tr(S) / d`` (the mean entry of a diagonal statistic), floored at the dtype's
    smallest normal number so that an all-zero statistic divides safely; a device tensor."""
    trace = statistics.mean() if statistics.ndim == 1 else statistics.diagonal().mean()
    return trace.clamp(min=torch.finfo(statistics.dtype).tiny)


def _axis_statistics(gradient: Tensor, axis: int, diagonal: bool) -> Tensor:
    """``G⁽ⁱ⁾ G⁽ⁱ⁾ᵀ`` (or only its diagonal), contracting ``gradient`` over all axes but one."""
    unfolded = gradient.movedim(axis, 0).reshape(gradient.shape[axis], -1)
    if diagonal:
        return unfolded.square().sum(dim=1)
    return unfolded @ unfolded.mT


def _precondition(tensor: Tensor, inverse_roots: Sequence[Tensor]) -> Tensor:
    """``tensor ×₁ P⁽¹⁾ ×₂ P⁽²⁾ ⋯ ×ₖ P⁽ᵏ⁾``, a vector ``P⁽ⁱ⁾`` acting as a diagonal matrix.

    Each mode product contracts the leading axis and appends the result as the last axis,
    so after all k of them the axes are back in their original order.
    """
    for inverse_root in inverse_roots:
        if inverse_root.ndim == 1:
            tensor = tensor.movedim(0, -1) * inverse_root
        else:
            tensor = torch.tensordot(tensor, inverse_root, dims=([0], [0]))
    return tensor


class Shampoo(Optimizer):
    r"""Shampoo with grafting, in the style of ``torch.optim``.

    For a parameter of order ``k`` (vectors and scalars count as order 1) with gradient
    ``G_t`` at its ``t``-th step:

    .. math::

        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) G_t, \qquad \hat m_t = m_t / (1 - \beta_1^t) \\
        S^{(i)}_t &= \beta_2 S^{(i)}_{t-1} + (1 - \beta_2)\, G^{(i)}_t G^{(i)\top}_t
            \quad (\beta_2 = 1:\ S^{(i)}_t = S^{(i)}_{t-1} + G^{(i)}_t G^{(i)\top}_t) \\
        P^{(i)} &= \big(\hat S^{(i)} + \epsilon_i I\big)^{-1/p}, \qquad p = 2k,
            \qquad \hat S^{(i)} = S^{(i)} / (1 - \beta_2^t) \text{ if } \beta_2 < 1 \\
        D_t &= \hat m_t \times_1 P^{(1)} \times_2 P^{(2)} \cdots \times_k P^{(k)} \\
        U_t &= D_t \, \lVert A_t \rVert_F / \lVert D_t \rVert_F
            \ \text{ if } t \ge t_0, \text{ else } U_t = A_t \\
        \theta_t &= \theta_{t-1} - \eta \lambda \theta_{t-1} - \eta U_t

    with ``εᵢ = ε`` (absolute, the default) or, with ``relative_epsilon=True``,
    ``εᵢ = ε · τᵢ``, ``τᵢ = tr(Ŝ⁽ⁱ⁾) / dᵢ`` the statistic's mean eigenvalue. An absolute ε
    is tied to the gradients' scale: while the statistics have low rank (the first steps,
    or an EMA over few gradients, ``β₂ < 1``), every direction they have not seen is
    multiplied by ``ε^{-1/p}`` (100 for ε = 1e-8, p = 4, per side of a matrix) against
    ``λ^{-1/p}`` for the seen ones, so a new gradient's unseen component dominates ``D_t``.
    The relative ε bounds that amplification by ``ε^{-1/p}`` against a direction of average
    curvature whatever the gradients' scale (it is computed as ``τ^{-1/p} (Ŝ/τ + εI)^{-1/p}``,
    with no host synchronisation).

    where ``G⁽ⁱ⁾`` is ``G`` with axis ``i`` moved first and the other axes flattened (so
    ``S⁽ⁱ⁾`` contracts over all other axes), ``×ᵢ`` is the mode-``i`` product, and ``A_t`` is
    the grafted optimizer's step on the same filtered gradient ``m̂_t``:

    * ``grafting="adam"``: ``A_t = m̂_t / (sqrt(v_t / (1 - β_g^t)) + ε_g)`` with
      ``v_t = β_g v_{t-1} + (1 - β_g) G_t²``; with ``betas[0]`` as Adam's ``beta1`` this is
      exactly ``torch.optim.Adam`` (``AdamW`` when ``weight_decay > 0``).
    * ``grafting="sgd"``: ``A_t = m̂_t``; with ``betas[0] = 0`` this is ``torch.optim.SGD``.
    * ``grafting="none"``: no rescaling, ``U_t = D_t`` once preconditioning has started and
      ``U_t = m̂_t`` before.

    For a matrix ``G`` (m × n) this is ``L^{-1/4} m̂ R^{-1/4}`` with ``L = Σ G Gᵀ`` and
    ``R = Σ Gᵀ G``. Grafting (Agarwal et al. 2020) takes the direction from Shampoo and the
    per-parameter step size from the grafted optimizer, so learning rates tuned for Adam or
    SGD carry over.

    Diagonal fallback. An axis gets a *diagonal* statistic ``s⁽ⁱ⁾ = diag(G⁽ⁱ⁾ G⁽ⁱ⁾ᵀ)``
    (shape ``(dᵢ,)``, the sum of squares over all other axes) instead of the full
    ``(dᵢ, dᵢ)`` matrix when the parameter has order 1 (vectors, biases; scalars are viewed as
    shape ``(1,)``) or when ``dᵢ > max_preconditioner_dim``. That axis is then scaled
    elementwise by ``(ŝ⁽ⁱ⁾ + ε)^{-1/p}`` with the same ``p``; for a vector this is
    AdaGrad (``β₂ = 1``) or RMSProp (``β₂ < 1``). Every axis is therefore preconditioned and
    ``p = 2k`` always counts all axes.

    Schedule. Statistics are accumulated from the first step. The matrix roots are
    recomputed at steps ``t = t₀, t₀ + precondition_every, t₀ + 2·precondition_every, …``
    (``t₀ = start_preconditioning_step``) and reused in between; diagonal roots cost
    nothing and are recomputed every step. Step counts are per parameter.

    Robustness. A matrix root is computed with ``torch.linalg.eigh``
    (:func:`trpo_lab.optim.linalg.matrix_inverse_root`); on an exception or a
    non-finite result it is retried in float64 (counted in ``root_float64_retries``); if that
    fails too, the previous root is kept (the identity before the first success) and
    ``root_fallbacks`` is incremented. If a parameter's gradient, its updated statistics or
    its grafting second moment are not finite, that parameter's step is skipped entirely
    (its state and value are left untouched, the step is not counted) and
    ``skipped_nonfinite_steps`` is incremented. Counters live in each parameter's state and
    are summed by :attr:`stats`.

    State is kept in the parameter's dtype (``load_state_dict`` casts it to that dtype
    anyway); roots of float16/bfloat16 statistics are computed in float32.

    Using the direction without stepping (e.g. a TRPO step scaled to a KL radius)::

        optimizer.zero_grad()
        loss.backward()                                  # loss to minimise
        directions = optimizer.preconditioned_direction()
        # directions[j] is U_t for the j-th parameter (in param_groups order); the step that
        # step() would take is -lr * U_t. Scale it, line-search it, write the parameters.

    ``preconditioned_direction()`` advances the state exactly as :meth:`step` does, so call
    one or the other per gradient, not both.

    Args:
        params: Iterable of parameters or parameter-group dicts.
        lr: Learning rate ``η``. Default ``1e-3``. Read from ``param_groups`` at every step, so
            schedulers and Stable-Baselines3 may change it.
        betas: ``(β₁, β₂)``. ``β₁`` is the momentum: the EMA of gradients ``m`` that both
            Shampoo and the grafted optimizer precondition (Distributed Shampoo's filtered
            gradient; Adam's ``beta1``), ``0 ≤ β₁ < 1``. ``β₂`` is the EMA of the Shampoo
            statistics, ``0 < β₂ ≤ 1``; ``1.0`` sums them as in the paper. Default
            ``(0.9, 1.0)``.
        epsilon: Regulariser ``ε`` added to every eigenvalue (diagonal entry) of the
            statistics before the inverse root, ``> 0``. Default ``1e-12``.
        relative_epsilon: Scale ``ε`` by each statistic's mean eigenvalue (see above).
            Default ``False`` (absolute).
        weight_decay: Decoupled (AdamW-style) weight decay ``λ``: ``θ ← θ - η λ θ``, not added
            to the gradient, ``≥ 0``. Default ``0.0``.
        precondition_every: Steps between recomputations of the matrix roots, ``≥ 1``.
            Default ``10``.
        start_preconditioning_step: First step ``t₀`` (1-based) that uses the Shampoo
            direction; steps before it are exactly the grafted optimizer's, ``≥ 1``.
            Default ``10``.
        max_preconditioner_dim: Largest axis length that gets a full ``(d, d)`` statistic;
            longer axes get the diagonal fallback, ``≥ 1``. Default ``1024``.
        exponent_override: If given, every axis uses ``P⁽ⁱ⁾ = (Ŝ⁽ⁱ⁾ + εI)^{-1/exponent_override}``
            instead of ``p = 2k``, ``≥ 1``. Default ``None``.
        grafting: ``"adam"``, ``"sgd"`` or ``"none"`` (see above). Default ``"adam"``.
        grafting_beta2: The grafted Adam's second-moment decay ``β_g``, ``0 ≤ β_g < 1``.
            Default ``0.999``.
        grafting_epsilon: The grafted Adam's ``ε_g``, ``≥ 0``. Default ``1e-8``.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        *,
        betas: tuple[float, float] = (0.9, 1.0),
        epsilon: float = 1e-12,
        weight_decay: float = 0.0,
        precondition_every: int = 10,
        start_preconditioning_step: int = 10,
        max_preconditioner_dim: int = 1024,
        exponent_override: int | None = None,
        relative_epsilon: bool = False,
        grafting: Grafting = "adam",
        grafting_beta2: float = 0.999,
        grafting_epsilon: float = 1e-8,
    ) -> None:
        check_number("lr", lr, minimum=0.0)
        require(len(betas) == 2, "betas", betas, "a pair (beta1, beta2)")
        check_number("betas[0]", betas[0], minimum=0.0, expected="0 <= beta1 < 1")
        require(betas[0] < 1.0, "betas[0]", betas[0], "0 <= beta1 < 1")
        check_number("betas[1]", betas[1], minimum=0.0, maximum=1.0, expected="0 < beta2 <= 1")
        require(betas[1] > 0.0, "betas[1]", betas[1], "0 < beta2 <= 1")
        check_number("epsilon", epsilon, minimum=0.0, strict=True)
        check_number("weight_decay", weight_decay, minimum=0.0)
        check_int("precondition_every", precondition_every, minimum=1)
        check_int("start_preconditioning_step", start_preconditioning_step, minimum=1)
        check_int("max_preconditioner_dim", max_preconditioner_dim, minimum=1)
        require(
            exponent_override is None or (is_int(exponent_override) and exponent_override >= 1),
            "exponent_override", exponent_override, "None or an integer >= 1",
        )
        require(isinstance(relative_epsilon, bool), "relative_epsilon", relative_epsilon, "True or False")
        require(grafting in _GRAFTING_CHOICES, "grafting", grafting, f"one of {_GRAFTING_CHOICES}")
        check_number("grafting_beta2", grafting_beta2, minimum=0.0, expected="0 <= beta < 1")
        require(grafting_beta2 < 1.0, "grafting_beta2", grafting_beta2, "0 <= beta < 1")
        check_number("grafting_epsilon", grafting_epsilon, minimum=0.0)
        defaults: dict[str, Any] = dict(
            lr=lr,
            betas=tuple(betas),
            epsilon=epsilon,
            weight_decay=weight_decay,
            precondition_every=precondition_every,
            start_preconditioning_step=start_preconditioning_step,
            max_preconditioner_dim=max_preconditioner_dim,
            exponent_override=exponent_override,
            relative_epsilon=relative_epsilon,
            grafting=grafting,
            grafting_beta2=grafting_beta2,
            grafting_epsilon=grafting_epsilon,
        )
        super().__init__(params, defaults)

    @property
    def stats(self) -> dict[str, int]:
        """Event counts summed over all parameters: ``skipped_nonfinite_steps``,
        ``root_float64_retries`` and ``root_fallbacks``."""
        totals = dict.fromkeys(_COUNTERS, 0)
        for state in self.state.values():
            for key in _COUNTERS:
                totals[key] += int(state.get(key, 0))
        return totals

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Take one Shampoo step from the parameters' ``.grad``.

        Args:
            closure: Optional callable that re-evaluates the model and returns the loss; it
                runs under ``torch.enable_grad()``.

        Returns:
            The closure's loss, or ``None`` without a closure.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                direction = self._advance(param, group)
                if direction is None:
                    continue
                if group["weight_decay"] != 0.0:
                    param.mul_(1.0 - group["lr"] * group["weight_decay"])
                param.add_(direction, alpha=-group["lr"])
        return loss

    @torch.no_grad()
    def preconditioned_direction(self) -> list[Tensor]:
        """Shampoo's update direction ``U_t`` for the current ``.grad``, parameters untouched.

        Accumulates the statistics and moments from ``.grad`` and advances every state
        (step count, roots, counters) exactly as :meth:`step` does; ``step()`` would then
        apply ``θ ← θ - lr·λ·θ - lr·U_t``. Learning rate and weight decay are not included.

        Returns:
            One tensor per parameter, in ``param_groups`` order, shaped like the parameter;
            zeros for parameters without a gradient or whose step was skipped because it was
            not finite.
        """
        directions = []
        for group in self.param_groups:
            for param in group["params"]:
                direction = self._advance(param, group)
                directions.append(torch.zeros_like(param) if direction is None else direction)
        return directions

    def _init_state(self, param: Tensor, group: dict[str, Any]) -> None:
        state = self.state[param]
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if group["grafting"] == "adam":
            state["grafting_exp_avg_sq"] = torch.zeros_like(
                param, memory_format=torch.preserve_format
            )
        statistics, inverse_roots = [], []
        dtype, device = param.dtype, param.device
        for size in param.shape if param.ndim > 0 else (1,):
            if param.ndim <= 1 or size > group["max_preconditioner_dim"]:
                statistics.append(torch.zeros(size, dtype=dtype, device=device))
                inverse_roots.append(torch.ones(size, dtype=dtype, device=device))
            else:
                statistics.append(torch.zeros(size, size, dtype=dtype, device=device))
                inverse_roots.append(torch.eye(size, dtype=dtype, device=device))
        state["statistics"] = statistics
        state["inverse_roots"] = inverse_roots
        for key in _COUNTERS:
            state[key] = 0

    def _advance(self, param: Tensor, group: dict[str, Any]) -> Tensor | None:
        """Update ``param``'s state from its gradient and return ``U_t`` (``None``: no step)."""
        grad = param.grad
        if grad is None:
            return None
        if grad.is_sparse:
            raise RuntimeError("Shampoo does not support sparse gradients")
        if torch.is_complex(param):
            raise RuntimeError("Shampoo does not support complex parameters")
        state = self.state[param]
        if not state:
            self._init_state(param, group)
        beta1, beta2 = group["betas"]
        grafting = group["grafting"]

        # Build the new statistics out of place so a non-finite gradient never reaches state.
        axis_view = grad.reshape(-1) if grad.ndim == 0 else grad
        statistics = []
        for axis, old in enumerate(state["statistics"]):
            new = _axis_statistics(axis_view, axis, diagonal=old.ndim == 1)
            statistics.append(old + new if beta2 == 1.0 else torch.lerp(old, new, 1.0 - beta2))
        candidates = [grad, *statistics]
        exp_avg_sq: Tensor | None = None
        if grafting == "adam":
            exp_avg_sq = state["grafting_exp_avg_sq"].mul(group["grafting_beta2"])
            exp_avg_sq.addcmul_(grad, grad, value=1.0 - group["grafting_beta2"])
            candidates.append(exp_avg_sq)
        if not all_finite(candidates):
            state["skipped_nonfinite_steps"] += 1
            return None

        step: int = state["step"] + 1
        state["step"] = step
        state["statistics"] = statistics
        exp_avg: Tensor = state["exp_avg"]
        exp_avg.lerp_(grad, 1.0 - beta1)
        filtered: Tensor = exp_avg / (1.0 - beta1**step)
        grafted: Tensor
        if exp_avg_sq is not None:
            state["grafting_exp_avg_sq"] = exp_avg_sq
            bias_correction2_sqrt = math.sqrt(1.0 - group["grafting_beta2"] ** step)
            denominator = exp_avg_sq.sqrt() / bias_correction2_sqrt
            grafted = filtered / denominator.add_(group["grafting_epsilon"])
        else:
            grafted = filtered

        start = group["start_preconditioning_step"]
        if step < start:
            return grafted
        root = group["exponent_override"] or 2 * len(statistics)
        self._refresh_inverse_roots(
            state, group, root, refresh_matrices=(step - start) % group["precondition_every"] == 0
        )
        shampoo = _precondition(filtered.reshape_as(axis_view), state["inverse_roots"])
        shampoo = shampoo.reshape_as(param)
        if grafting == "none":
            return shampoo
        shampoo_norm = torch.linalg.vector_norm(shampoo)
        scale = torch.where(
            shampoo_norm > 0.0, torch.linalg.vector_norm(grafted) / shampoo_norm, 0.0
        )
        return shampoo * scale

    @staticmethod
    def _refresh_inverse_roots(
        state: dict[str, Any], group: dict[str, Any], root: int, refresh_matrices: bool
    ) -> None:
        beta2 = group["betas"][1]
        bias_correction = 1.0 if beta2 == 1.0 else 1.0 - beta2 ** state["step"]
        epsilon = group["epsilon"]
        relative = group.get("relative_epsilon", False)  # absent in state saved before it existed
        for axis, statistics in enumerate(state["statistics"]):
            if statistics.ndim > 1 and not refresh_matrices:
                continue
            scaled = statistics / bias_correction
            # (S + ε τ I)^(-1/p) = τ^(-1/p) (S/τ + ε I)^(-1/p): the relative ε without a host read of τ.
            tau = _mean_eigenvalue(scaled) if relative else None
            if tau is not None:
                scaled = scaled / tau
            if statistics.ndim == 1:
                inverse_root = _diagonal_inverse_root(scaled, root, epsilon)
            else:
                try:
                    inverse_root, retried = matrix_inverse_root(scaled, root, epsilon)
                except InverseRootError:
                    state["root_fallbacks"] += 1
                    continue
                state["root_float64_retries"] += int(retried)
            if tau is not None:
                inverse_root = inverse_root * tau.pow(-1.0 / root)
            state["inverse_roots"][axis] = inverse_root

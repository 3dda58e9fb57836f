"""Fisher-vector products as Hessian-vector products of the mean KL divergence.

For a policy ``π_θ`` and a fixed ("old") copy ``π_old`` of it, the mean KL
``D(θ) = E_s[KL(π_old(·|s) ‖ π_θ(·|s))]`` has value and gradient zero at
``θ = θ_old`` and Hessian equal to the Fisher information matrix
``F = E_s E_{a~π}[∇ log π(a|s) ∇ log π(a|s)^⊤]`` (Amari, 1998, "Natural
Gradient Works Efficiently in Learning"; Schulman et al., 2015, "Trust Region
Policy Optimization", Appendix C). So ``F v = ∇(∇D · v)`` is computable without
forming ``F``: two backward passes (double backprop, :func:`fisher_vector_product`)
or forward-over-reverse with ``torch.func`` (:func:`fisher_vector_product_func`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from trpo_lab.optim._flat import total_numel, unflatten, validate_damping, validate_params

__all__ = ["FisherLoss", "fisher_vector_product", "fisher_vector_product_func", "flat_grad", "sampled_fisher_loss"]


def flat_grad(
    output: Tensor,
    params: Sequence[Tensor],
    *,
    create_graph: bool = False,
    retain_graph: bool | None = None,
) -> Tensor:
    """Returns ``∂ output / ∂ params`` concatenated into one flat vector.

    Parameters that ``output`` does not depend on contribute zeros, so the
    layout always matches ``flat_params(params)``.

    Args:
        output: A scalar tensor (one element) to differentiate.
        params: The tensors to differentiate with respect to.
        create_graph: Build the graph of the gradient, for a second derivative.
        retain_graph: Keep the graph of ``output`` for another backward pass;
            defaults to ``create_graph``, as in ``torch.autograd.grad``.

    Returns:
        A 1-D tensor of length ``Σ p.numel()``.

    Raises:
        ValueError: If ``output`` has more than one element or ``params`` is empty.
    """
    params = validate_params(params)
    if output.numel() != 1:
        raise ValueError(
            f"Invalid output: got shape {tuple(output.shape)}; expected a scalar (one element) to differentiate"
        )
    grads = torch.autograd.grad(
        output,
        params,
        create_graph=create_graph,
        retain_graph=retain_graph,
        allow_unused=True,
    )
    return torch.cat(
        [
            (torch.zeros_like(param) if grad is None else grad).reshape(-1)
            for grad, param in zip(grads, params)
        ]
    )


def _validate_vector(vector: Tensor, size: int) -> None:
    if vector.dim() != 1 or vector.numel() != size:
        raise ValueError(
            f"Invalid vector: got shape {tuple(vector.shape)}; expected a 1-D tensor of length {size} "
            "(the total number of parameter elements)"
        )


def fisher_vector_product(
    kl_fn: Callable[[], Tensor],
    params: Sequence[Tensor],
    damping: float = 0.1,
) -> Callable[[Tensor], Tensor]:
    r"""Builds ``v ↦ (∇²D + damping·I) v`` for the mean KL ``D`` by double backprop.

    ``kl_fn`` is called once, here; its gradient ``∇D`` is built once with
    ``create_graph=True``; each call of the returned function then costs one
    backward pass through that graph:

    .. math::

        F v = ∇_θ\big(∇_θ D(θ) \cdot v\big) + \text{damping}\, v

    At the current parameters, with the old distribution detached, ``∇²D`` is the
    Fisher information matrix (Amari, 1998; Schulman et al., 2015, Appendix C),
    and ``damping`` is the Tikhonov term sb3-contrib calls ``cg_damping``. The
    graph is retained, so the product can be called as often as conjugate
    gradient needs; drop the returned function to free it.

    Args:
        kl_fn: A closure returning the mean KL ``D`` between a detached old
            distribution and the one at the current ``params``, a scalar tensor.
        params: The parameters ``θ`` (all with ``requires_grad=True``); their
            order defines the flat layout of ``v``.
        damping: The non-negative multiple of the identity added to the Hessian.
            Default 0.1.

    Returns:
        A function mapping a flat vector ``v`` of length ``Σ p.numel()`` (dtype
        and device of the parameters) to ``(∇²D + damping·I) v``, detached.

    Raises:
        ValueError: If ``damping`` is negative or not finite, ``params`` is empty
            or holds a tensor that does not require grad, or ``kl_fn`` does not
            return a scalar. The returned function raises it for a ``v`` of the
            wrong shape.
    """
    validate_damping(damping)
    params = validate_params(params)
    for index, param in enumerate(params):
        if not param.requires_grad:
            raise ValueError(
                f"Invalid params[{index}]: a tensor of shape {tuple(param.shape)} with requires_grad=False; "
                "expected parameters that require grad"
            )
    size = total_numel(params)
    with torch.enable_grad():
        kl = kl_fn()
        if not isinstance(kl, Tensor) or kl.numel() != 1:
            shape = tuple(kl.shape) if isinstance(kl, Tensor) else type(kl).__name__
            raise ValueError(f"Invalid kl_fn: it returned {shape}; expected a scalar tensor (the mean KL)")
        kl_grad = flat_grad(kl, params, create_graph=True) if kl.requires_grad else None

    def fvp(vector: Tensor) -> Tensor:
        _validate_vector(vector, size)
        vector = vector.detach()
        if kl_grad is None or not kl_grad.requires_grad:
            # D does not depend on params (or only linearly): its Hessian is zero.
            return damping * vector
        with torch.enable_grad():
            directional = torch.dot(kl_grad, vector.to(kl_grad.dtype))
            hessian_vector = flat_grad(directional, params, retain_graph=True)
        return hessian_vector.detach() + damping * vector

    return fvp


def fisher_vector_product_func(
    kl_fn_of_params: Callable[[tuple[Tensor, ...]], Tensor],
    params: Sequence[Tensor],
    damping: float = 0.1,
) -> Callable[[Tensor], Tensor]:
    r"""Builds ``v ↦ (∇²D + damping·I) v`` with ``torch.func`` (forward-over-reverse).

    The same operator as :func:`fisher_vector_product`, computed as the
    Jacobian-vector product of the gradient,

    .. math::

        F v = \frac{d}{dε} ∇D(θ + ε v)\Big|_{ε=0} + \text{damping}\, v
            = \texttt{jvp}(\texttt{grad}(D), θ, v) + \text{damping}\, v,

    which composes with ``torch.func.vmap`` and ``torch.compile`` and needs no
    retained graph. Each call runs one forward pass and one backward pass with
    dual numbers (there is no graph built once and reused, unlike double
    backprop).

    Args:
        kl_fn_of_params: A function of a tuple of parameter tensors (shaped like
            ``params``) returning the mean KL ``D`` against a fixed, detached old
            distribution, a scalar tensor. Typically it evaluates the model with
            ``torch.func.functional_call(module, dict(zip(names, params)), inputs)``.
        params: The point ``θ`` at which the Hessian is taken; its tensors are
            detached, so they need not require grad. Their order defines the flat
            layout of ``v``.
        damping: The non-negative multiple of the identity added to the Hessian.
            Default 0.1.

    Returns:
        A function mapping a flat vector ``v`` of length ``Σ p.numel()`` to
        ``(∇²D + damping·I) v``, detached.

    Raises:
        ValueError: If ``damping`` is negative or not finite, or ``params`` is
            empty. The returned function raises it for a ``v`` of the wrong shape.
    """
    validate_damping(damping)
    params = validate_params(params)
    primals = tuple(param.detach() for param in params)
    size = total_numel(params)
    kl_grad_fn = torch.func.grad(kl_fn_of_params)

    def fvp(vector: Tensor) -> Tensor:
        _validate_vector(vector, size)
        vector = vector.detach()
        tangents = tuple(piece.to(primal.dtype) for piece, primal in zip(unflatten(vector, primals), primals))
        hessian_vector = torch.func.jvp(kl_grad_fn, (primals,), (tangents,))[1]  # (grad, H v) without has_aux
        return torch.cat([piece.detach().reshape(-1) for piece in hessian_vector]) + damping * vector

    return fvp


class FisherLoss(NamedTuple):
    """The two terms of the sampled Fisher loss (batch means, with their graphs).

    Attributes:
        policy: ``−mean log π(ã|s)`` for actions ã drawn from the current policy.
        value: ``mean((V − (sg(V) + ε))²)`` for ε ~ N(0, 1) (a zero tensor without values).
    """

    policy: Tensor
    value: Tensor

    def total(self, value_coef: float = 1.0) -> Tensor:
        """``policy + value_coef · value``: what one backward through both networks takes."""
        return self.policy + value_coef * self.value


def sampled_fisher_loss(
    log_prob: Callable[[Tensor], Tensor],
    sampled_actions: Tensor,
    values: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> FisherLoss:
    """The *sampled* Fisher loss whose gradients give K-FAC its statistics (ACKTR, SB3 adapters, TRPO's K-FAC).

    The gradients of this loss at the layer outputs give K-FAC the statistics of the policy's
    true Fisher and of the critic's Gauss–Newton matrix (Wu et al., 2017, section 3.1;
    Martens & Grosse, 2015, section 5):

        policy = −1/N Σ log π(ã|s),                 ã ~ π(·|s)
        value  = 1/N Σ (V(s) − (sg(V(s)) + ε))²,    ε ~ N(0, 1)

    E_ã[∇log π ∇log πᵀ] is the Fisher of π; with a *sampled* target the value term's
    gradient −2ε ∂V/∂w has E[4ε² J Jᵀ] = 4 J Jᵀ, the Fisher of a unit-variance Gaussian on
    V (Gauss–Newton), up to the factor 4 of the squared error (as in the reference code).

    Args:
        log_prob: ``a ↦ log π(a|s)`` per sample, through the policy's graph (e.g.
            ``lambda a: dist.log_prob(dist_params, a)``, or an SB3 distribution's ``log_prob``).
        sampled_actions: ã drawn from π(·|s) by the caller, with the policy's own sampler and
            random stream. Detached here: a reparameterised sample must not carry ∂ã/∂θ.
        values: V(s), one per sample (any shape, flattened), with their graph; or None for a
            policy alone (TRPO's K-FAC curvature).
        generator: Draws ε (the default generator when None). Drawn after ã, so the order
            of a run's random stream is: actions, then value noise.
    """
    policy_term = -log_prob(sampled_actions.detach()).mean()
    if values is None:
        return FisherLoss(policy_term, torch.zeros((), dtype=policy_term.dtype, device=policy_term.device))
    values = values.reshape(-1)
    noise = torch.randn(values.shape, generator=generator, device=values.device, dtype=values.dtype)
    return FisherLoss(policy_term, (values - (values.detach() + noise)).square().mean())

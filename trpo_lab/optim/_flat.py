"""Flat-vector helpers shared by the curvature toolkit.

Trust-region methods treat the parameters of a model as one vector
``θ ∈ R^P`` (Schulman et al., 2015, "Trust Region Policy Optimization",
Appendix C): the conjugate-gradient solver, the Fisher-vector product and the
line search all work on such flat vectors. These helpers convert between a
sequence of parameter tensors and that vector, in the order the sequence is
given, exactly like ``torch.nn.utils.parameters_to_vector`` but without
tying the result to the autograd graph. The argument checks that several
modules share live here too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from trpo_lab.validation import check_number

__all__ = [
    "all_finite",
    "any_nonfinite",
    "assign_flat_",
    "clip_grad_norm_",
    "clip_grads_",
    "flat_params",
    "to_device_async",
    "total_numel",
    "unflatten",
    "validate_damping",
    "validate_params",
]


def validate_params(params: Sequence[Tensor], *, name: str = "params") -> list[Tensor]:
    """Returns ``params`` as a list after checking that it is a non-empty sequence of tensors.

    Args:
        params: The parameter tensors.
        name: The argument name used in error messages.

    Raises:
        ValueError: If ``params`` is empty or holds something other than tensors.
    """
    if isinstance(params, Tensor):
        raise ValueError(
            f"Invalid {name}: got a single Tensor of shape {tuple(params.shape)}; "
            "expected a sequence of parameter tensors (e.g. list(module.parameters()))"
        )
    params = list(params)
    if not params:
        raise ValueError(f"Invalid {name}: got an empty sequence; expected at least one parameter tensor")
    for index, param in enumerate(params):
        if not isinstance(param, Tensor):
            raise ValueError(f"Invalid {name}[{index}]: got {type(param).__name__}; expected a torch.Tensor")
    return params


def validate_damping(damping: float) -> None:
    """Checks that ``damping`` (a multiple of the identity added to a curvature matrix) is finite and ``>= 0``.

    Raises:
        ValueError: If it is not.
    """
    check_number("damping", damping, minimum=0.0)


def total_numel(params: Sequence[Tensor]) -> int:
    """Returns the total number of elements ``P`` of the parameter tensors."""
    return sum(param.numel() for param in params)


def flat_params(params: Sequence[Tensor]) -> Tensor:
    """Concatenates the parameters into one detached flat vector ``θ ∈ R^P``.

    The result is a new tensor (never a view of the parameters), so later
    in-place updates of the parameters do not change it.

    Args:
        params: The parameter tensors, in the order that defines the flat layout.

    Returns:
        A 1-D tensor of length ``P = Σ p.numel()``.
    """
    params = validate_params(params)
    return torch.cat([param.detach().reshape(-1) for param in params])


def unflatten(flat: Tensor, like: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Splits a flat vector into tensors shaped like ``like`` (the inverse of :func:`flat_params`).

    The pieces are views of ``flat`` and keep its autograd graph, so this can be
    used inside a function that is differentiated with respect to ``flat``.

    Args:
        flat: A 1-D tensor of length ``P = Σ p.numel()``.
        like: The tensors whose shapes and order define the layout.

    Returns:
        One tensor per element of ``like``, with the same shape.

    Raises:
        ValueError: If ``flat`` is not 1-D or its length is not ``P``.
    """
    like = validate_params(like, name="like")
    expected = total_numel(like)
    if flat.dim() != 1 or flat.numel() != expected:
        raise ValueError(
            f"Invalid flat: got shape {tuple(flat.shape)}; expected a 1-D tensor of length {expected} "
            "(the total number of parameter elements)"
        )
    pieces = torch.split(flat, [param.numel() for param in like])
    return tuple(piece.view(param.shape) for piece, param in zip(pieces, like))


def assign_flat_(params: Sequence[Tensor], flat: Tensor) -> None:
    """Copies a flat vector into the parameter tensors in place (under ``torch.no_grad``).

    Args:
        params: The parameter tensors to overwrite.
        flat: A 1-D tensor of length ``P = Σ p.numel()``.
    """
    params = validate_params(params)
    with torch.no_grad():
        for param, piece in zip(params, unflatten(flat, params)):
            param.copy_(piece)


def _finite(tensors: list[Tensor]) -> Tensor:
    """A 0-d bool tensor: whether every element of the (non-empty) ``tensors`` is finite.

    Checked through each tensor's minimum and maximum (``torch.aminmax``, which propagates
    NaN): an infinity is an extreme, a NaN makes both NaN. Exact (no sum that could overflow),
    in each tensor's own dtype, and one read of the tensor at memory speed with nothing
    allocated. ``isfinite`` of the concatenation, used before, copied every tensor and wrote
    a bool per element: on ACKTR's Nature-CNN K-FAC state (35M values), which the update
    guard checks after every update, that took about 1 s against 7 ms.
    """
    with torch.no_grad():
        extremes = [extreme for tensor in tensors if tensor.numel() for extreme in torch.aminmax(tensor)]
        if not extremes:
            return torch.ones((), dtype=torch.bool, device=tensors[0].device)
        return torch.isfinite(torch.stack(extremes)).all()


def any_nonfinite(tensors: Sequence[Tensor]) -> Tensor:
    """A one-element tensor (default float dtype) on the tensors' device: 1 if any element of
    ``tensors`` (floating, all on one device) is NaN or ±inf, else 0 — computed without a host
    synchronisation."""
    tensors = list(tensors)
    if not tensors:
        return torch.zeros(1)
    return (~_finite(tensors)).to(torch.get_default_dtype()).reshape(1)


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every element of ``tensors`` (floating, one device) is finite; one host sync."""
    tensors = list(tensors)
    return not tensors or bool(_finite(tensors))


def clip_grad_norm_(params: Sequence[Tensor], max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (2-norm, no error on non-finite norms) without its
    per-call grouping by device and dtype.

    The minibatch loops of PPO and of the TRPO critic clip after each of their many small
    steps, where torch's version (and ``torch.nn.utils.get_total_norm``) spends more time
    grouping the tensors than computing. With ``‖g‖ = ‖(‖g_1‖, …, ‖g_n‖)‖`` (the per-tensor
    norms first, as torch does, so the result is bitwise torch's), every gradient is scaled
    by ``min(1, max_norm / (‖g‖ + 1e-6))``. Gradients of mixed dtypes or devices go to torch's.

    Returns:
        The total norm of the gradients before clipping (a 0-d tensor).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    first = grads[0]
    if any(g.dtype != first.dtype or g.device != first.device or g.is_sparse for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return clip_grads_(grads, max_norm)


def clip_grads_(grads: Sequence[Tensor], max_norm: float) -> Tensor:
    """:func:`clip_grad_norm_` of the gradient tensors themselves (one dtype and device, dense),
    in place; returns their total norm before clipping. Traceable by ``torch.compile``."""
    total: Tensor = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for grad in grads:
        grad.mul_(scale)
    return total


def to_device_async(tensor: Tensor, device: torch.device) -> Tensor:
    """``tensor`` (on the host) on ``device`` without making the host wait for the device.

    A CUDA copy from ordinary (pageable) host memory blocks until the device has run every
    kernel queued before it; from pinned (page-locked) memory with ``non_blocking=True`` it is
    queued like a kernel. Same-device "copies" return ``tensor`` itself.
    """
    if tensor.device == device:
        return tensor
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)

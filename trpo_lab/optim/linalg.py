"""Robust symmetric eigendecomposition and inverse matrix roots, shared by K-FAC and Shampoo.

Both preconditioners decompose a symmetric positive semi-definite statistic,
``A = Q diag(λ) Qᵀ``, and both need that to survive long runs: rounding makes a
PSD matrix slightly asymmetric and gives it slightly negative eigenvalues, and
``torch.linalg.eigh`` in float32 can fail to converge or return NaN on a badly
scaled matrix. This module is the one place that handles it (Shi et al., 2023,
"A Distributed Data-Parallel PyTorch Implementation of the Distributed Shampoo
Optimizer", section on numerical robustness):

1. symmetrise, ``A ← (A + Aᵀ) / 2``;
2. decompose with ``torch.linalg.eigh`` in the *working dtype* (the matrix's own
   dtype; float16 and bfloat16 are promoted to float32, which ``eigh`` needs);
3. if that raises (``torch.linalg.LinAlgError`` is a ``RuntimeError``) or any result
   is not finite once cast back to the matrix's dtype, retry once in float64;
4. clamp the eigenvalues at 0;
5. set the eigenvectors' subnormal entries (below ``torch.finfo(dtype).tiny`` in magnitude)
   to 0 (:func:`flush_subnormal`). A factor with an exactly zero block (inputs that are
   always 0, such as dead ReLU features of a CNN trunk: a third of the Nature CNN's 3136 on
   Pong) gets eigenvectors with subnormal cross terms. A CPU computes with those 10 to 100
   times slower, and every preconditioned step multiplies by them twice: on Pong's 3137-wide
   K-FAC factor a step took 1.2 s instead of 0.17 s. Values that small change no product
   above float32's smallest normal number.

:func:`symmetric_eigh` first *deflates* exactly zero rows (and so columns) of the symmetrised
matrix: each is an eigenvector ``e_i`` with eigenvalue 0, and only the rest is decomposed,
then embedded back. On Pong, 1150 of the Nature CNN's 3137 fc inputs never fired. The full
3137² factor then made float32 ``eigh`` fail to converge ("too many repeated eigenvalues"),
and the float64 retry took 3.6 s. The 1987² rest decomposes in float32 in 0.66 s. The
deflation is exact. It needs the zero rows' indices on the host. The device path
(:func:`symmetric_eigh_on_device`) does it without them: it adds distinct shifts
``c_i > trace`` to the zero rows' diagonal entries. That leaves the same eigenvectors ``e_i``
with eigenvalues ``c_i``, distinct from each other and from the rest. It then sets to 0 the
eigenvalue of every eigenvector whose mass lies on the zero rows (those ``e_i``).

Results come back in the matrix's dtype, together with whether the float64 retry
was needed, so callers can count retries.

The retry decision is a host branch (one finiteness read per attempt). The device-resident
path (``sync_free``, issue 16) uses :func:`symmetric_eigh_on_device` instead: steps 1, 2 and 4
in the working dtype only, with the finiteness check returned as a device tensor, so the
caller falls back with ``torch.where`` (K-FAC keeps the previous eigenbasis) and nothing waits
for the host. A float64 retry there would have to run on every call, masked (float64 is 2x to
64x slower than float32 on GPUs), so it is not made. ``torch.linalg.eigh`` itself still reads
its error code on CUDA (cuSOLVER's ``info``), a sync that no dispatch mode can see.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from trpo_lab.validation import check_int, check_number

__all__ = [
    "EigendecompositionError",
    "deflated_symmetric_eigh",
    "InverseRootError",
    "DeviceEigh",
    "SymmetricEigh",
    "flush_subnormal",
    "matrix_inverse_root",
    "symmetric_eigh",
    "symmetric_eigh_on_device",
    "working_dtype",
]


class EigendecompositionError(RuntimeError):
    """Neither the working-dtype nor the float64 eigendecomposition gave finite results.

    Attributes:
        dtypes: The dtypes that were tried, in order (their number minus one is the number
            of float64 retries made).
    """

    def __init__(self, message: str, dtypes: tuple[torch.dtype, ...]) -> None:
        super().__init__(message)
        self.dtypes = dtypes


class InverseRootError(EigendecompositionError):
    """Neither the working-precision nor the float64 eigendecomposition gave a finite root."""


class SymmetricEigh(NamedTuple):
    """``A = Q diag(λ) Qᵀ`` with ``λ ≥ 0``, in the matrix's dtype."""

    eigenvalues: Tensor
    eigenvectors: Tensor
    retried_in_float64: bool


class DeviceEigh(NamedTuple):
    """``A = Q diag(λ) Qᵀ`` with ``λ ≥ 0`` in the matrix's dtype, and whether it is finite (a
    0-d bool tensor on the matrix's device; where it is False the other two are not usable)."""

    eigenvalues: Tensor
    eigenvectors: Tensor
    finite: Tensor


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a decomposition of a ``dtype`` matrix is first attempted in (float32 or float64)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def flush_subnormal(tensor: Tensor) -> Tensor:
    """``tensor`` with its subnormal entries (``0 < |x| < torch.finfo(dtype).tiny``) set to 0.

    NaN and inf are kept (the finiteness checks still see them)."""
    if not tensor.is_floating_point():
        return tensor
    return torch.where(tensor.abs() < torch.finfo(tensor.dtype).tiny, torch.zeros_like(tensor), tensor)


def _check_square(matrix: Tensor) -> None:
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"Invalid matrix shape: {tuple(matrix.shape)}; expected (n, n)")


def _clamped_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Steps 1, 2 and 4 in ``matrix``'s dtype: eigenvalues (clamped at 0) and eigenvectors."""
    eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (matrix + matrix.mT))
    return eigenvalues.clamp(min=0.0), eigenvectors


def _with_float64_retry(
    matrix: Tensor, compute: Callable[[Tensor], tuple[Tensor, ...]], error: type[EigendecompositionError], what: str
) -> tuple[tuple[Tensor, ...], bool]:
    """Runs ``compute`` on ``matrix`` in its working dtype, then once in float64 if that raised
    or gave a non-finite result; returns the results cast to ``matrix.dtype`` and whether the
    retry was needed. One host synchronisation per attempt (the finiteness check)."""
    first = working_dtype(matrix.dtype)
    dtypes = (first,) if first == torch.float64 else (first, torch.float64)
    failure: RuntimeError | None = None
    for dtype in dtypes:
        try:
            results = tuple(result.to(matrix.dtype) for result in compute(matrix.to(dtype)))
        except RuntimeError as raised:
            failure = raised
            continue
        if bool(torch.stack([torch.isfinite(result).all() for result in results]).all()):
            return results, dtype != first
        failure = None
    raise error(
        f"{what} of a {tuple(matrix.shape)} matrix failed in {', '.join(str(dtype) for dtype in dtypes)}"
        + ("" if failure is None else f": {failure}"),
        dtypes,
    ) from failure


def deflated_symmetric_eigh(matrix: Tensor) -> tuple[SymmetricEigh, Tensor]:
    """:func:`symmetric_eigh` and the indices of the deflated (exactly zero) rows, int64.

    When ``k`` rows were deflated, eigenvector ``j < k`` is the unit vector of row
    ``zero_rows[j]`` (eigenvalue 0), and the other rows' block of eigenvectors ``k:`` holds the
    rest: a caller can rotate by the live rows' ``(n-k)²`` block alone (K-FAC's
    preconditioning does). The indices are empty when nothing was deflated.
    """
    _check_square(matrix)
    zero_rows = ((matrix + matrix.mT) == 0).all(dim=1)
    if bool(zero_rows.any()):  # deflate (see the module docstring); one host read
        zero_index = torch.nonzero(zero_rows).squeeze(1)
        return _deflated_eigh(matrix, zero_index, torch.nonzero(~zero_rows).squeeze(1)), zero_index
    (eigenvalues, eigenvectors), retried = _with_float64_retry(
        matrix, _clamped_eigh, EigendecompositionError, "eigendecomposition"
    )
    empty = torch.zeros(0, dtype=torch.int64, device=matrix.device)
    return SymmetricEigh(eigenvalues, flush_subnormal(eigenvectors), retried), empty


def symmetric_eigh(matrix: Tensor) -> SymmetricEigh:
    """Eigendecomposition of a symmetric PSD matrix: symmetrise, ``eigh``, float64 retry, clamp.

    Args:
        matrix: Square symmetric positive semi-definite matrix, shape ``(n, n)``.

    Returns:
        ``(eigenvalues, eigenvectors, retried_in_float64)``: ascending eigenvalues clamped at
        0 and orthonormal eigenvectors (columns), both in ``matrix.dtype``.

    Raises:
        EigendecompositionError: If the float64 attempt also raises or is not finite.
        ValueError: If ``matrix`` is not square.
    """
    return deflated_symmetric_eigh(matrix)[0]


def _deflated_eigh(matrix: Tensor, zero_index: Tensor, keep: Tensor) -> SymmetricEigh:
    """:func:`symmetric_eigh` of a matrix whose rows ``zero_index`` (and columns) are 0: those
    give the eigenvalues 0 with the unit vectors ``e_i`` (first, as eigenvalues ascend), the
    other rows' (``keep``) principal submatrix the rest."""
    size = matrix.shape[0]
    n_zero = zero_index.numel()
    eigenvalues = matrix.new_zeros(size)
    eigenvectors = matrix.new_zeros(size, size)
    eigenvectors[zero_index, torch.arange(n_zero, device=matrix.device)] = 1.0
    retried = False
    if keep.numel():
        sub_values, sub_vectors, retried = symmetric_eigh(matrix[keep][:, keep])
        columns = torch.arange(n_zero, size, device=matrix.device)
        eigenvalues[n_zero:] = sub_values
        eigenvectors[keep.unsqueeze(1), columns.unsqueeze(0)] = sub_vectors
    return SymmetricEigh(eigenvalues, eigenvectors, retried)


def symmetric_eigh_on_device(matrix: Tensor) -> DeviceEigh:
    """:func:`symmetric_eigh` without a host synchronisation: symmetrise, ``eigh`` in the working
    dtype, clamp; no float64 retry.

    Args:
        matrix: Square symmetric positive semi-definite matrix, shape ``(n, n)``.

    Returns:
        ``(eigenvalues, eigenvectors, finite)``: as :func:`symmetric_eigh`'s in ``matrix.dtype``,
        and a 0-d bool tensor, False when ``eigh`` raised (the CPU's LAPACK reports a failure
        to converge as an exception; the other two are then zeros) or any result is not finite.
        Callers select a fallback with ``torch.where(finite, ...)``.

    Raises:
        ValueError: If ``matrix`` is not square.
    """
    _check_square(matrix)
    working = matrix.to(working_dtype(matrix.dtype))
    working = 0.5 * (working + working.mT)
    zero_rows = (working == 0).all(dim=1)
    # distinct shifts above every eigenvalue on the zero rows' diagonal (see the module docstring)
    size = matrix.shape[0]
    ramp = 1.0 + torch.arange(size, dtype=working.dtype, device=working.device) / size
    shifts = torch.where(zero_rows, ramp * (1.0 + 2.0 * working.diagonal().abs().sum()), torch.zeros_like(ramp))
    try:
        values, vectors = _clamped_eigh(working + torch.diag(shifts))
        # each eigenvector is either some e_i of a zero row (mass 1 there) or has none there
        on_zero_rows = (vectors.square() * zero_rows.unsqueeze(1).to(vectors.dtype)).sum(dim=0)
        values = torch.where(on_zero_rows > 0.5, torch.zeros_like(values), values)
        eigenvalues, eigenvectors = values.to(matrix.dtype), vectors.to(matrix.dtype)
    except RuntimeError:  # torch.linalg.LinAlgError: the kernel's own (host) error check
        zeros = torch.zeros_like(matrix)
        return DeviceEigh(zeros.diagonal().clone(), zeros, torch.zeros((), dtype=torch.bool, device=matrix.device))
    finite = torch.isfinite(eigenvalues).all() & torch.isfinite(eigenvectors).all()
    return DeviceEigh(eigenvalues, flush_subnormal(eigenvectors), finite)


def matrix_inverse_root(matrix: Tensor, root: int, epsilon: float) -> tuple[Tensor, bool]:
    """Inverse ``root``-th root of a symmetric positive semi-definite matrix.

    Computes ``(A + epsilon·I)^(-1/root)`` from the symmetric eigendecomposition
    ``A = Q diag(λ) Qᵀ`` as ``Q diag((max(λ, 0) + epsilon)^(-1/root)) Qᵀ``, so the result is
    finite for any finite PSD input and ``epsilon > 0``. The epsilon is absolute, which
    matches Shampoo's initialisation of the statistics at ``epsilon·I``. The root is formed
    in the dtype the decomposition succeeded in and retried in float64 (see the module
    docstring) if it is not finite in ``matrix.dtype``.

    Args:
        matrix: Square symmetric PSD matrix, shape ``(n, n)``.
        root: The ``p`` in ``A^(-1/p)``; a positive integer.
        epsilon: Regulariser added to every eigenvalue; must be positive.

    Returns:
        ``(inverse_root, retried_in_float64)``: the root in ``matrix.dtype`` and whether the
        float64 retry was needed.

    Raises:
        InverseRootError: If the float64 attempt also raises or is not finite.
        ValueError: If ``matrix`` is not square, ``root < 1`` or ``epsilon <= 0``.
    """
    _check_square(matrix)
    check_int("root", root, minimum=1)
    check_number("epsilon", epsilon, minimum=0.0, strict=True, expected="a finite number > 0")

    def inverse_root(working: Tensor) -> tuple[Tensor]:
        eigenvalues, eigenvectors = _clamped_eigh(working)
        scales = (eigenvalues + epsilon).pow(-1.0 / root)
        return ((eigenvectors * scales) @ eigenvectors.mT,)

    (result,), retried = _with_float64_retry(matrix, inverse_root, InverseRootError, f"inverse {root}-th root")
    return flush_subnormal(result), retried

"""trpo_lab.optim.linalg against exact references: known spectra, float64 retries, inverse roots."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from trpo_lab.optim.linalg import (
    EigendecompositionError,
    InverseRootError,
    matrix_inverse_root,
    symmetric_eigh,
    working_dtype,
)


def matrix_with_spectrum(eigenvalues: list[float], seed: int = 0) -> tuple[Tensor, Tensor]:
    """``Q diag(λ) Qᵀ`` in float64 for a random orthogonal ``Q``, and ``Q``."""
    generator = torch.Generator().manual_seed(seed)
    size = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    spectrum = torch.tensor(eigenvalues, dtype=torch.float64)
    return (q * spectrum) @ q.mT, q


def test_known_eigenvalues_and_eigenvectors_in_float64() -> None:
    eigenvalues = [0.0, 1e-3, 0.5, 2.0, 7.0]
    matrix, q = matrix_with_spectrum(eigenvalues)
    values, vectors, retried = symmetric_eigh(matrix)
    assert not retried and values.dtype == vectors.dtype == torch.float64
    torch.testing.assert_close(values, torch.tensor(eigenvalues, dtype=torch.float64), rtol=0.0, atol=1e-13)
    # Distinct eigenvalues: each eigenvector is ±the column of Q.
    alignment = (vectors.mT @ q).abs()
    torch.testing.assert_close(alignment, torch.eye(5, dtype=torch.float64), rtol=0.0, atol=1e-10)
    torch.testing.assert_close((vectors * values) @ vectors.mT, matrix, rtol=0.0, atol=1e-13)


def test_asymmetric_rounding_is_symmetrised_and_negative_eigenvalues_are_clamped() -> None:
    matrix = torch.diag(torch.tensor([-0.5, 1.0, 3.0], dtype=torch.float64))
    matrix[0, 1] = 1e-3  # an asymmetric pair: eigh sees (A + Aᵀ) / 2, whose (0, 1) entry is 5e-4
    values, vectors, _ = symmetric_eigh(matrix)
    symmetric = 0.5 * (matrix + matrix.mT)
    exact = torch.linalg.eigvalsh(symmetric)
    assert exact[0] < 0
    torch.testing.assert_close(values, exact.clamp(min=0.0), rtol=0.0, atol=1e-15)
    torch.testing.assert_close(vectors, torch.linalg.eigh(symmetric).eigenvectors, rtol=0.0, atol=1e-15)


def test_ill_conditioned_float32_matrix_stays_finite_and_accurate_to_float32() -> None:
    # Condition number 1e9: float32 eigh resolves the small eigenvalues only to ~eps·‖A‖ and
    # may make them negative; they must come back clamped, not NaN, and without a retry.
    eigenvalues = [10.0**-k for k in range(10)]
    matrix, _ = matrix_with_spectrum(eigenvalues, seed=3)
    values, vectors, retried = symmetric_eigh(matrix.float())
    assert not retried and values.dtype == torch.float32
    assert bool((values >= 0).all()) and bool(torch.isfinite(vectors).all())
    exact = torch.tensor(sorted(eigenvalues), dtype=torch.float64)
    scale = 10 * torch.finfo(torch.float32).eps * exact.max()
    assert float((values.double() - exact).abs().max()) <= scale  # Weyl: |Δλ| <= ‖ΔA‖
    reconstruction = (vectors.double() * values.double()) @ vectors.double().mT
    assert float((reconstruction - matrix).abs().max()) <= scale


def test_float32_overflow_is_retried_in_float64() -> None:
    # (A + Aᵀ) / 2 overflows in float32 (A + Aᵀ has entries 4e38 > float32 max), so float32
    # eigh gets inf and returns NaN; float64 has the exact answer λ = ±2e38, which fits.
    big = 2e38
    matrix = torch.tensor([[0.0, big], [big, 0.0]], dtype=torch.float32)
    values, vectors, retried = symmetric_eigh(matrix)
    assert retried and values.dtype == torch.float32
    torch.testing.assert_close(values, torch.tensor([0.0, big]), rtol=1e-6, atol=0.0)  # -2e38 clamped
    half = 2.0**-0.5
    torch.testing.assert_close(vectors[:, 1].abs(), torch.tensor([half, half]))

    inverse_root, retried = matrix_inverse_root(matrix, 2, 1.0)
    assert retried and inverse_root.dtype == torch.float32
    # Eigenvectors (1, ∓1)/√2 with the clamped eigenvalues 0 and 2e38: Q diag(1, (2e38+1)^-½) Qᵀ.
    small = (big + 1.0) ** -0.5
    expected = 0.5 * torch.tensor([[1.0, -1.0], [-1.0, 1.0]]) + 0.5 * small * torch.ones(2, 2)
    torch.testing.assert_close(inverse_root, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_decomposed_in_float32(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    real_eigh = torch.linalg.eigh
    seen: list[torch.dtype] = []

    def recording_eigh(matrix: Tensor) -> Any:
        seen.append(matrix.dtype)
        return real_eigh(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", recording_eigh)
    matrix, _ = matrix_with_spectrum([0.25, 1.0, 4.0])
    values, vectors, retried = symmetric_eigh(matrix.to(dtype))
    assert seen == [torch.float32] and not retried and working_dtype(dtype) == torch.float32
    assert values.dtype == vectors.dtype == dtype
    torch.testing.assert_close(values.double(), torch.tensor([0.25, 1.0, 4.0], dtype=torch.float64), rtol=1e-2, atol=0)


def test_failures_are_retried_in_float64_then_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    real_eigh = torch.linalg.eigh
    seen: list[torch.dtype] = []

    def float32_fails(matrix: Tensor) -> Any:
        seen.append(matrix.dtype)
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("injected failure")
        return real_eigh(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", float32_fails)
    matrix, _ = matrix_with_spectrum([1.0, 2.0, 3.0])
    values, _, retried = symmetric_eigh(matrix.float())
    assert retried and seen == [torch.float32, torch.float64]
    torch.testing.assert_close(values, torch.tensor([1.0, 2.0, 3.0]))

    def always_fails(matrix: Tensor) -> Any:
        raise torch.linalg.LinAlgError("injected failure")

    monkeypatch.setattr(torch.linalg, "eigh", always_fails)
    with pytest.raises(EigendecompositionError, match="injected failure") as raised:
        symmetric_eigh(matrix.float())
    assert raised.value.dtypes == (torch.float32, torch.float64)
    with pytest.raises(EigendecompositionError) as raised:
        symmetric_eigh(matrix)  # already float64: no retry
    assert raised.value.dtypes == (torch.float64,)
    with pytest.raises(InverseRootError):
        matrix_inverse_root(matrix.float(), 2, 1e-6)
    assert issubclass(InverseRootError, EigendecompositionError)


def test_a_nonfinite_matrix_raises_after_the_retry() -> None:
    matrix = torch.eye(3)
    matrix[1, 1] = float("nan")
    with pytest.raises(EigendecompositionError) as raised:
        symmetric_eigh(matrix)
    assert raised.value.dtypes == (torch.float32, torch.float64)


@pytest.mark.parametrize("root", [1, 2, 4, 6])
def test_inverse_root_equals_the_eigendecomposition_formula(root: int) -> None:
    eigenvalues = [0.0, 1e-4, 0.3, 1.0, 12.0]
    epsilon = 1e-6
    matrix, q = matrix_with_spectrum(eigenvalues, seed=root)
    inverse_root, retried = matrix_inverse_root(matrix, root, epsilon)
    assert not retried
    spectrum = (torch.tensor(eigenvalues, dtype=torch.float64) + epsilon) ** (-1.0 / root)
    expected = (q * spectrum) @ q.mT
    torch.testing.assert_close(inverse_root, expected, rtol=1e-9, atol=1e-9)
    # Without any eigendecomposition: R^root (A + εI) = I.
    regularised = matrix + epsilon * torch.eye(5, dtype=torch.float64)
    product = torch.linalg.matrix_power(inverse_root, root) @ regularised
    torch.testing.assert_close(product, torch.eye(5, dtype=torch.float64), rtol=0.0, atol=1e-6)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: symmetric_eigh(torch.ones(2, 3)), r"Invalid matrix shape: \(2, 3\); expected \(n, n\)"),
        (lambda: matrix_inverse_root(torch.eye(2), 0, 1e-6), r"Invalid root: 0; expected an integer >= 1"),
        (lambda: matrix_inverse_root(torch.eye(2), True, 1e-6), r"Invalid root: True"),
        (lambda: matrix_inverse_root(torch.eye(2), 2, 0.0), r"Invalid epsilon: 0.0; expected a finite number > 0"),
    ],
)
def test_invalid_arguments_are_named(call: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()

"""trpo_lab.optim.linalg against exact references: known spectra, float64 retries, inverse roots."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor

from trpo_lab.optim.linalg import (
    EigendecompositionError,
    InverseRootError,
    deflated_symmetric_eigh,
    flush_subnormal,
    matrix_inverse_root,
    symmetric_eigh,
    symmetric_eigh_on_device,
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


def _subnormals(x: torch.Tensor) -> int:
    return int(((x != 0) & (x.abs() < torch.finfo(x.dtype).tiny)).sum())


def test_flush_subnormal_zeroes_only_subnormals() -> None:
    tiny = torch.finfo(torch.float32).tiny
    x = torch.tensor([tiny / 4, -tiny / 1000, tiny, -2.0, 0.0, math.inf, math.nan])
    assert _subnormals(x) == 2
    y = flush_subnormal(x)
    assert y[:2].tolist() == [0.0, 0.0] and y[2].item() == tiny and y[3].item() == -2.0
    assert math.isinf(y[5].item()) and math.isnan(y[6].item())
    ints = torch.arange(3)
    assert flush_subnormal(ints) is ints


@pytest.mark.parametrize("on_device", [False, True])
def test_eigenvectors_of_a_factor_with_a_zero_block_have_no_subnormals(on_device: bool) -> None:
    """A K-FAC input factor whose inputs are partly always 0 (dead ReLU features): the
    decomposition still reconstructs the matrix, and none of its eigenvectors' entries is
    subnormal (a CPU multiplies those 10-100x slower)."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.relu(torch.randn(400, 300, generator=gen))
    rows[:, 100:] = 0.0  # two thirds of the features never fire
    matrix = rows.mT @ rows / 400
    if on_device:
        values, vectors, finite = symmetric_eigh_on_device(matrix)
        assert bool(finite)
    else:
        values, vectors, _ = symmetric_eigh(matrix)
    assert _subnormals(vectors) == 0
    torch.testing.assert_close((vectors * values) @ vectors.mT, matrix, atol=1e-4, rtol=1e-4)
    root, _ = matrix_inverse_root(matrix, 2, 1e-3)
    assert _subnormals(root) == 0


def test_zero_rows_are_deflated_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows that are 0 (inputs that never fire) give eigenvalue 0 with e_i; only the rest is
    decomposed, and the result reconstructs the matrix with an orthonormal basis."""
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(50, 40, generator=gen, dtype=torch.float64)
    dead = torch.tensor([0, 3, 4, 17, 39])
    rows[:, dead] = 0.0
    matrix = rows.mT @ rows / 50
    sizes: list[int] = []
    eigh = torch.linalg.eigh

    def recording(m: Tensor) -> Any:
        sizes.append(m.shape[0])
        return eigh(m)

    monkeypatch.setattr(torch.linalg, "eigh", recording)
    values, vectors, retried = symmetric_eigh(matrix)
    assert sizes == [35] and not retried  # the 35 live rows only
    assert torch.all(values[:5] == 0) and torch.all(values[1:] >= values[:-1])
    assert torch.equal(vectors[dead, :5], torch.eye(5, dtype=torch.float64))
    torch.testing.assert_close(vectors.mT @ vectors, torch.eye(40, dtype=torch.float64))
    torch.testing.assert_close((vectors * values) @ vectors.mT, matrix)
    expected = torch.linalg.eigvalsh(matrix).clamp(min=0)
    torch.testing.assert_close(values, expected, atol=1e-12, rtol=1e-9)
    sizes.clear()
    values, vectors, _ = symmetric_eigh(torch.zeros(4, 4))
    assert sizes == [] and torch.equal(values, torch.zeros(4)) and torch.equal(vectors, torch.eye(4))


def test_the_device_path_deflates_zero_rows_without_their_indices() -> None:
    """Shifted zero rows: the same eigenpairs as the host path's deflation (eigenvalue 0 on e_i)."""
    gen = torch.Generator().manual_seed(2)
    rows = torch.randn(60, 30, generator=gen, dtype=torch.float64)
    dead = torch.tensor([1, 2, 10, 29])
    rows[:, dead] = 0.0
    matrix = rows.mT @ rows / 60
    values, vectors, finite = symmetric_eigh_on_device(matrix)
    assert bool(finite)
    torch.testing.assert_close((vectors * values) @ vectors.mT, matrix)
    torch.testing.assert_close(vectors.mT @ vectors, torch.eye(30, dtype=torch.float64))
    mass_on_dead = vectors[dead].square().sum(dim=0)
    deflated = mass_on_dead > 0.5
    assert int(deflated.sum()) == 4 and torch.all(values[deflated] == 0)
    host_values, _, _ = symmetric_eigh(matrix)
    torch.testing.assert_close(values.sort().values, host_values, atol=1e-12, rtol=1e-9)
    full = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    full = full @ full.mT  # no zero row: no shift
    torch.testing.assert_close(symmetric_eigh_on_device(full).eigenvalues, symmetric_eigh(full).eigenvalues)


def test_deflated_symmetric_eigh_names_the_deflated_rows() -> None:
    """The indices returned are the zero rows, in the order of the leading unit eigenvectors,
    and the live rows' block of the other eigenvectors carries the whole rest."""
    gen = torch.Generator().manual_seed(2)
    rows = torch.randn(60, 12, generator=gen, dtype=torch.float64)
    rows[:, [2, 9, 5]] = 0.0
    matrix = rows.mT @ rows / 60
    (values, vectors, _), zero_rows = deflated_symmetric_eigh(matrix)
    assert zero_rows.dtype == torch.int64 and zero_rows.tolist() == [2, 5, 9]
    assert torch.equal(vectors[zero_rows, :3], torch.eye(3, dtype=torch.float64))
    live = torch.tensor([i for i in range(12) if i not in (2, 5, 9)])
    assert torch.equal(vectors[zero_rows, 3:], torch.zeros(3, 9, dtype=torch.float64))
    block = vectors[live][:, 3:]
    torch.testing.assert_close((block * values[3:]) @ block.mT, matrix[live][:, live])
    full = torch.randn(12, 12, generator=gen, dtype=torch.float64)
    (_, _, _), none_deflated = deflated_symmetric_eigh(full @ full.mT)
    assert none_deflated.numel() == 0 and none_deflated.dtype == torch.int64

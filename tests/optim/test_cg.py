"""Conjugate gradient against torch.linalg.solve and the exact-arithmetic properties of CG."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from trpo_lab.optim.cg import CGResult, conjugate_gradient, solve_cg


def random_spd(n: int, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> Tensor:
    """A well-conditioned random SPD matrix (eigenvalues in [1, 10])."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    eigenvalues = 1.0 + 9.0 * torch.rand(n, generator=generator, dtype=torch.float64)
    return ((q * eigenvalues) @ q.T).to(dtype)


def as_matvec(matrix: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda v: matrix @ v


@pytest.mark.parametrize("n", [5, 17, 64, 200])
def test_matches_linalg_solve_on_random_spd(n: int) -> None:
    generator = torch.Generator().manual_seed(n)
    matrix = random_spd(n, generator)
    b = torch.randn(n, generator=generator, dtype=torch.float64)
    result = solve_cg(as_matvec(matrix), b, max_iter=n, tol=1e-24)
    expected = torch.linalg.solve(matrix, b)
    torch.testing.assert_close(result.x, expected, rtol=1e-9, atol=1e-10)
    assert isinstance(result, CGResult)
    assert result.x.dtype == torch.float64
    assert result.iterations.dtype == torch.int64 and result.iterations.dim() == 0
    assert result.residual_norm.dim() == 0
    torch.testing.assert_close(
        result.residual_norm, torch.linalg.vector_norm(b - matrix @ result.x), rtol=0, atol=1e-9
    )


def test_float32_matches_linalg_solve() -> None:
    generator = torch.Generator().manual_seed(0)
    matrix = random_spd(20, generator, torch.float32)
    b = torch.randn(20, generator=generator)
    x = conjugate_gradient(as_matvec(matrix), b, max_iter=40, tol=1e-12)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, torch.linalg.solve(matrix, b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("distinct", [1, 2, 3, 5])
def test_k_distinct_eigenvalues_solved_in_k_iterations(distinct: int) -> None:
    generator = torch.Generator().manual_seed(distinct)
    n = 30
    levels = torch.arange(1, distinct + 1, dtype=torch.float64)
    diagonal = levels[torch.randint(distinct, (n,), generator=generator)]
    diagonal[:distinct] = levels  # every level present
    b = torch.randn(n, generator=generator, dtype=torch.float64)
    result = solve_cg(lambda v: diagonal * v, b, max_iter=n, tol=1e-20)
    assert int(result.iterations) == distinct
    torch.testing.assert_close(result.x, b / diagonal, rtol=1e-10, atol=1e-12)


def test_zero_right_hand_side_gives_zero_without_nan() -> None:
    matrix = random_spd(8, torch.Generator().manual_seed(1))
    for tol in (0.0, 1e-10):
        result = solve_cg(as_matvec(matrix), torch.zeros(8, dtype=torch.float64), max_iter=5, tol=tol)
        assert torch.equal(result.x, torch.zeros(8, dtype=torch.float64))
        assert int(result.iterations) == 0
        assert float(result.residual_norm) == 0.0


def test_zero_curvature_never_produces_nan() -> None:
    """A singular operator (the undamped Fisher along a direction it ignores) freezes instead of dividing by 0."""
    b = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    result = solve_cg(lambda v: torch.zeros_like(v), b, max_iter=4, tol=0.0)
    assert torch.isfinite(result.x).all() and torch.isfinite(result.residual_norm)
    assert int(result.iterations) == 0
    assert torch.equal(result.x, torch.zeros(3, dtype=torch.float64))


def test_converged_x0_stays_put() -> None:
    generator = torch.Generator().manual_seed(2)
    matrix = random_spd(10, generator)
    x_star = torch.randn(10, generator=generator, dtype=torch.float64)
    b = matrix @ x_star
    result = solve_cg(as_matvec(matrix), b, max_iter=10, tol=1e-20, x0=x_star)
    assert int(result.iterations) == 0
    assert torch.equal(result.x, x_star)


def test_x0_warm_start_converges() -> None:
    generator = torch.Generator().manual_seed(3)
    matrix = random_spd(12, generator)
    b = torch.randn(12, generator=generator, dtype=torch.float64)
    x0 = torch.randn(12, generator=generator, dtype=torch.float64)
    x = conjugate_gradient(as_matvec(matrix), b, max_iter=12, tol=1e-24, x0=x0)
    torch.testing.assert_close(x, torch.linalg.solve(matrix, b), rtol=1e-9, atol=1e-10)


def test_frozen_after_convergence() -> None:
    generator = torch.Generator().manual_seed(4)
    n = 12
    matrix = random_spd(n, generator)
    b = torch.randn(n, generator=generator, dtype=torch.float64)
    short = solve_cg(as_matvec(matrix), b, max_iter=n, tol=1e-12)
    long = solve_cg(as_matvec(matrix), b, max_iter=3 * n, tol=1e-12)
    assert int(short.iterations) < n
    assert torch.equal(short.x, long.x)
    assert torch.equal(short.iterations, long.iterations)
    assert torch.equal(short.residual_norm, long.residual_norm)
    assert float(long.residual_norm) ** 2 < 1e-12


def test_max_iter_limits_the_work() -> None:
    matrix = random_spd(20, torch.Generator().manual_seed(5))
    calls = []

    def counted(v: Tensor) -> Tensor:
        calls.append(1)
        return matrix @ v

    result = solve_cg(counted, torch.ones(20, dtype=torch.float64), max_iter=3, tol=0.0)
    assert len(calls) == 3
    assert int(result.iterations) == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_iter": 0}, "Invalid max_iter: 0"),
        ({"max_iter": 2.5}, "Invalid max_iter: 2.5"),
        ({"tol": -1.0}, "Invalid tol: -1.0"),
        ({"tol": float("nan")}, "Invalid tol: nan"),
        ({"x0": torch.zeros(3)}, "Invalid x0"),
    ],
)
def test_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        solve_cg(lambda v: v, torch.ones(4), **kwargs)  # type: ignore[arg-type]


def test_b_must_be_a_flat_float_vector() -> None:
    with pytest.raises(ValueError, match=r"Invalid b: got \(2, 2\); expected a 1-D tensor"):
        solve_cg(lambda v: v, torch.ones(2, 2))
    with pytest.raises(ValueError, match="Invalid b: got dtype torch.int64"):
        conjugate_gradient(lambda v: v, torch.ones(3, dtype=torch.int64))


def _forbid_host_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a tensor value was read on the host")

    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


def test_no_python_reads_of_tensor_values(monkeypatch: pytest.MonkeyPatch) -> None:
    matrix = random_spd(15, torch.Generator().manual_seed(6))
    matvec = as_matvec(matrix)
    b = torch.ones(15, dtype=torch.float64)
    with monkeypatch.context() as patch:
        _forbid_host_reads(patch)
        with pytest.raises(AssertionError, match="read on the host"):
            bool(b[0] > 0)  # the patch is active
        result = solve_cg(matvec, b, max_iter=30, tol=1e-24, x0=torch.zeros(15, dtype=torch.float64))
    torch.testing.assert_close(result.x, torch.linalg.solve(matrix, b), rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_host_sync_on_cuda(dtype: torch.dtype) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    matrix = random_spd(50, torch.Generator().manual_seed(7), dtype).cuda()
    b = torch.ones(50, dtype=dtype, device="cuda")
    matvec = as_matvec(matrix)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation now raises
    try:
        result = solve_cg(matvec, b, max_iter=60, tol=1e-10)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.testing.assert_close(result.x, torch.linalg.solve(matrix, b), rtol=1e-3, atol=1e-4)


def test_stop_early_gives_the_same_result_with_fewer_products() -> None:
    torch.manual_seed(5)
    diagonal = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64).repeat_interleave(4)
    b = torch.randn(12, dtype=torch.float64)
    calls = {"n": 0}

    def matvec(v: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return diagonal * v

    full = solve_cg(matvec, b, max_iter=10, tol=1e-20)
    assert calls["n"] == 10
    calls["n"] = 0
    early = solve_cg(matvec, b, max_iter=10, tol=1e-20, stop_early=True)
    assert calls["n"] <= 4  # 3 distinct eigenvalues: converged after 3 products, the 4th sees it
    torch.testing.assert_close(early.x, full.x, rtol=0, atol=1e-12)
    assert int(early.iterations) == int(full.iterations) == 3


def test_residual_vector_gives_the_matrix_product_of_the_solution() -> None:
    torch.manual_seed(6)
    m = torch.randn(6, 6, dtype=torch.float64)
    matrix = m @ m.T + 6 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    result = solve_cg(lambda v: matrix @ v, b, max_iter=3, tol=0.0)
    torch.testing.assert_close(b - result.residual, matrix @ result.x)

"""The natural step: direction from a solver, sᵀFs, scaling to the KL radius, line search or full step."""

from __future__ import annotations

import pytest
import torch

from trpo_lab.optim.trust_region import (
    Direction,
    NaturalStep,
    cg_solve,
    natural_step,
    scale_to_kl_radius,
    take_full_step,
    trust_region_line_search,
)


def test_step_reaches_the_quadratic_kl_boundary() -> None:
    torch.manual_seed(0)
    m = torch.randn(5, 5, dtype=torch.float64)
    fisher = m @ m.T + torch.eye(5, dtype=torch.float64)
    s = torch.randn(5, dtype=torch.float64)
    step = scale_to_kl_radius(s, s @ fisher @ s, kl_limit=0.01)
    assert 0.5 * step @ fisher @ step == pytest.approx(0.01)
    assert torch.allclose(step / step.norm(), s / s.norm())


@pytest.mark.parametrize("curvature", [0.0, -1.0, float("nan"), float("inf")])
def test_degenerate_curvature_gives_no_step(curvature: float) -> None:
    step = scale_to_kl_radius(torch.ones(3), torch.tensor(curvature), kl_limit=0.01)
    assert torch.equal(step, torch.zeros(3))


def test_invalid_kl_limit() -> None:
    with pytest.raises(ValueError, match="Invalid kl_limit: 0"):
        scale_to_kl_radius(torch.ones(3), torch.tensor(1.0), kl_limit=0)


# ---------------------------------------------------------------------------------- natural_step
def _quadratic_problem(size: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    m = torch.randn(size, size, dtype=torch.float64)
    return m @ m.T + 0.5 * torch.eye(size, dtype=torch.float64), torch.randn(size, dtype=torch.float64)


class CountingFVP:
    def __init__(self, fisher: torch.Tensor) -> None:
        self.fisher, self.calls = fisher, 0

    def __call__(self, vector: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fisher @ vector


def test_natural_step_with_cg_equals_the_scaled_exact_natural_gradient() -> None:
    fisher, grad = _quadratic_problem()
    fvp = CountingFVP(fisher)
    step = natural_step(grad, fvp, 0.01, solve=cg_solve(max_iter=50, tol=0.0))
    exact = torch.linalg.solve(fisher, grad)
    torch.testing.assert_close(step.direction, exact)
    torch.testing.assert_close(step.full_step, scale_to_kl_radius(exact, exact @ fisher @ exact, 0.01))
    assert 0.5 * step.full_step @ fisher @ step.full_step == pytest.approx(0.01)
    torch.testing.assert_close(step.curvature, exact @ fisher @ exact)
    torch.testing.assert_close(step.expected_improvement, grad @ step.full_step)
    # sᵀFs from CG's residual: the products are CG's own (at most one per iteration), none after.
    assert fvp.calls == int(step.metrics["cg_iterations"]) <= 50
    assert float(step.metrics["cg_residual"]) < 1e-8


def test_natural_step_spends_one_product_when_the_solver_has_none() -> None:
    fisher, grad = _quadratic_problem()
    fvp = CountingFVP(fisher)
    exact = torch.linalg.solve(fisher, grad)
    step = natural_step(grad, fvp, 0.02, solve=lambda g, f: Direction(torch.linalg.solve(fisher, g)))
    assert fvp.calls == 1
    torch.testing.assert_close(step.full_step, scale_to_kl_radius(exact, exact @ fisher @ exact, 0.02))
    assert dict(step.metrics) == {}


def test_natural_step_default_solver_is_cg() -> None:
    fisher, grad = _quadratic_problem()
    default = natural_step(grad, CountingFVP(fisher), 0.01)
    explicit = natural_step(grad, CountingFVP(fisher), 0.01, solve=cg_solve())
    assert torch.equal(default.full_step, explicit.full_step)


def test_natural_step_of_a_zero_gradient_is_zero() -> None:
    fisher, _ = _quadratic_problem()
    step = natural_step(torch.zeros(6, dtype=torch.float64), CountingFVP(fisher), 0.01)
    assert torch.equal(step.full_step, torch.zeros(6, dtype=torch.float64))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"kl_limit": 0.0}, "Invalid kl_limit: 0.0"), ({"grad": torch.ones(2, 3)}, r"Invalid grad: got \(2, 3\)")],
)
def test_natural_step_rejects_bad_inputs(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"grad": torch.ones(3), "fvp": lambda v: v, "kl_limit": 0.01, **kwargs}
    with pytest.raises(ValueError, match=message):
        natural_step(**arguments)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- applying it
def _quadratic_step(kl_limit: float) -> tuple[list[torch.Tensor], NaturalStep, torch.Tensor]:
    """Loss ½θᵀAθ − bᵀθ, KL ½(θ − θ₀)ᵀF(θ − θ₀): a problem whose candidates can be judged by hand."""
    fisher, grad = _quadratic_problem()
    theta0 = torch.zeros(6, dtype=torch.float64)
    params = [theta0.clone()[:4].clone(), theta0.clone()[4:].clone()]
    hessian = fisher * 3.0

    def evaluate(candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        losses = 0.5 * torch.einsum("ki,ij,kj->k", candidates, hessian, candidates) - candidates @ grad
        kls = 0.5 * torch.einsum("ki,ij,kj->k", candidates, fisher, candidates)
        return losses, kls

    result = natural_step(grad, lambda v: fisher @ v, kl_limit)
    step = NaturalStep(result.full_step, result.expected_improvement, torch.zeros((), dtype=torch.float64), evaluate, {})
    return params, step, fisher


@pytest.mark.parametrize("batched", [False, True])
def test_line_search_accepts_the_first_candidate_that_improves_within_the_radius(batched: bool) -> None:
    params, step, fisher = _quadratic_step(kl_limit=0.5)
    result = trust_region_line_search(params, step, kl_limit=0.5, batched=batched)
    kept = torch.cat(params)
    assert bool(result.success)
    fraction = 0.8 ** int(result.backtracks)
    torch.testing.assert_close(kept, fraction * step.full_step)
    losses, kls = step.evaluate(torch.stack([kept]))
    torch.testing.assert_close(result.kl, kls[0])
    torch.testing.assert_close(result.loss, losses[0])
    if int(result.backtracks) > 0:  # the previous, longer candidate was rejected
        longer = (fraction / 0.8) * step.full_step
        loss_l, kl_l = step.evaluate(longer.unsqueeze(0))
        assert not (float(loss_l[0]) < 0 and float(kl_l[0]) <= 0.5)


def test_sequential_and_batched_line_search_agree() -> None:
    kept = []
    for batched in (False, True):
        params, step, _ = _quadratic_step(kl_limit=0.3)
        result = trust_region_line_search(params, step, kl_limit=0.3, shrinking_factor=0.5, batched=batched)
        kept.append((torch.cat(params), result.backtracks))
    assert torch.equal(kept[0][0], kept[1][0]) and torch.equal(kept[0][1], kept[1][1])


def test_failed_line_search_restores_the_parameters() -> None:
    params, step, _ = _quadratic_step(kl_limit=0.3)
    result = trust_region_line_search(params, step, kl_limit=1e-12, max_iter=2)
    assert not bool(result.success)
    assert torch.equal(torch.cat(params), torch.zeros(6, dtype=torch.float64))


def test_take_full_step_writes_the_whole_step_and_reports_its_loss_and_kl() -> None:
    params, step, fisher = _quadratic_step(kl_limit=0.01)
    loss, kl = take_full_step(params, step)
    torch.testing.assert_close(torch.cat(params), step.full_step)
    losses, kls = step.evaluate(step.full_step.unsqueeze(0))
    assert torch.equal(loss, losses[0]) and torch.equal(kl, kls[0])
    torch.testing.assert_close(kl, torch.tensor(0.01, dtype=torch.float64))  # the KL is exactly quadratic here

"""Exact curvature references: Newton on quadratics, natural gradient vs CG, the Fisher in closed form."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from trpo_lab.optim.cg import solve_cg
from trpo_lab.optim.exact import (
    cosine_similarity,
    explicit_fisher,
    explicit_hessian,
    flat_params,
    natural_gradient_step,
    newton_step,
    solve_damped,
    unflatten,
)
from trpo_lab.optim.fisher import fisher_vector_product

MakeProblem = Callable[..., Any]


def random_spd(n: int, generator: torch.Generator) -> Tensor:
    factor = torch.randn(n, n, generator=generator, dtype=torch.float64)
    return factor @ factor.T + 0.5 * torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("n", [1, 4, 9])
def test_newton_solves_a_quadratic_in_one_step(n: int) -> None:
    generator = torch.Generator().manual_seed(n)
    matrix = random_spd(n, generator)
    linear = torch.randn(n, generator=generator, dtype=torch.float64)
    theta = torch.randn(n, generator=generator, dtype=torch.float64)

    def loss(x: Tensor) -> Tensor:
        return 0.5 * x @ matrix @ x - linear @ x + 3.0

    minimiser = torch.linalg.solve(matrix, linear)
    torch.testing.assert_close(theta - newton_step(loss, theta), minimiser, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(explicit_hessian(loss, theta), matrix, rtol=1e-12, atol=1e-12)
    damped = newton_step(loss, theta, damping=0.7)
    expected = torch.linalg.solve(matrix + 0.7 * torch.eye(n, dtype=torch.float64), matrix @ theta - linear)
    torch.testing.assert_close(damped, expected, rtol=1e-10, atol=1e-10)


def policy_gradient(problem: Any, seed: int) -> Tensor:
    """The gradient of a random linear functional of the policy's outputs (a stand-in surrogate)."""
    theta = flat_params(problem.params).requires_grad_(True)
    outputs = problem.outputs_of_params(unflatten(theta, problem.params))
    generator = torch.Generator().manual_seed(seed)
    surrogate = sum((torch.randn(o.shape, generator=generator, dtype=o.dtype) * o).sum() for o in outputs)
    (gradient,) = torch.autograd.grad(surrogate, theta)
    return gradient


@pytest.mark.parametrize("damping", [0.1, 1e-3])
@pytest.mark.parametrize("kind", ["categorical", "gaussian"])
def test_natural_gradient_equals_cg_on_fisher_vector_products(
    kind: str, damping: float, make_problem: MakeProblem
) -> None:
    problem = make_problem(kind)
    gradient = policy_gradient(problem, seed=1)
    theta = flat_params(problem.params)
    exact = natural_gradient_step(problem.kl_fn_of_flat, gradient, theta, damping=damping)
    fvp = fisher_vector_product(problem.kl_fn, problem.params, damping=damping)
    approximate = solve_cg(fvp, gradient, max_iter=problem.size, tol=1e-26)
    assert float(cosine_similarity(exact, approximate.x)) > 0.9999
    torch.testing.assert_close(approximate.x, exact, rtol=1e-4, atol=1e-6 * float(exact.norm()))
    # Natural and plain gradient differ, so the check above is not comparing g with itself.
    assert float(cosine_similarity(exact, gradient)) < 0.99


def test_explicit_fisher_is_the_expected_outer_product_of_scores() -> None:
    """Linear softmax π(a|s) = softmax(W x_s)_a over a few states, with the exact expectation over actions.

    ∇_W log π(a|s) = (e_a - π(·|s)) x_sᵀ, so F = (1/S) Σ_s Σ_a π(a|s) vec(∇_W log π(a|s)) vec(∇_W log π(a|s))ᵀ.
    """
    torch.manual_seed(0)
    num_states, num_actions, obs_dim = 4, 3, 2
    obs = torch.randn(num_states, obs_dim, dtype=torch.float64)
    weight = torch.randn(num_actions, obs_dim, dtype=torch.float64)
    old_probs = torch.softmax(obs @ weight.T, -1)

    def kl_of_flat(flat: Tensor) -> Tensor:
        log_probs = torch.log_softmax(obs @ flat.view(num_actions, obs_dim).T, -1)
        return (old_probs * (old_probs.log() - log_probs)).sum(-1).mean()

    expected = torch.zeros(num_actions * obs_dim, num_actions * obs_dim, dtype=torch.float64)
    for state in range(num_states):
        for action in range(num_actions):
            score = torch.outer(torch.eye(num_actions, dtype=torch.float64)[action] - old_probs[state], obs[state])
            expected += old_probs[state, action] * torch.outer(score.reshape(-1), score.reshape(-1)) / num_states
    fisher = explicit_fisher(kl_of_flat, weight.reshape(-1))
    torch.testing.assert_close(fisher, expected, rtol=1e-12, atol=1e-14)
    # The same matrix by the Kronecker identity F_s = (diag π - ππᵀ) ⊗ x xᵀ.
    kronecker = sum(
        torch.kron(torch.diag(p) - torch.outer(p, p), torch.outer(x, x)) for p, x in zip(old_probs, obs)
    ) / num_states
    torch.testing.assert_close(fisher, kronecker, rtol=1e-12, atol=1e-14)


def test_singular_fisher_gives_the_minimum_norm_natural_gradient() -> None:
    """Tabular softmax at one state: F = diag π - ππᵀ is singular (shifting all logits changes nothing).

    For L(θ) = -Σ_a π_θ(a) A(a), ∇L = -π ⊙ (A - πᵀA) and F (-(A - c·1)) = ∇L for every c; the
    minimum-norm solution is orthogonal to 1, i.e. -(A - mean(A)).
    """
    logits = torch.tensor([0.3, -1.2, 0.8, 0.0], dtype=torch.float64)
    advantages = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    probs = torch.softmax(logits, -1)

    def kl_of_flat(flat: Tensor) -> Tensor:
        return (probs * (probs.log() - torch.log_softmax(flat, -1))).sum()

    gradient = -probs * (advantages - probs @ advantages)
    step = natural_gradient_step(kl_of_flat, gradient, logits, damping=0.0)
    assert torch.isfinite(step).all()
    torch.testing.assert_close(step, -(advantages - advantages.mean()), rtol=1e-10, atol=1e-10)
    # With damping the system is regular and solved directly; it approaches the same step as damping → 0.
    damped = natural_gradient_step(kl_of_flat, gradient, logits, damping=1e-8)
    torch.testing.assert_close(damped, step, rtol=1e-5, atol=1e-5)


def test_solve_damped_uses_the_regular_solve_when_possible() -> None:
    generator = torch.Generator().manual_seed(3)
    matrix = random_spd(5, generator)
    vector = torch.randn(5, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(solve_damped(matrix, vector), torch.linalg.solve(matrix, vector), rtol=1e-12, atol=1e-12)
    singular = torch.diag(torch.tensor([2.0, 0.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(
        solve_damped(singular, torch.tensor([2.0, 5.0, 4.0], dtype=torch.float64)),
        torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64),
    )


def test_cosine_similarity() -> None:
    a = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)
    assert float(cosine_similarity(a, 3 * a)) == pytest.approx(1.0, abs=1e-15)
    assert float(cosine_similarity(a, -a)) == pytest.approx(-1.0, abs=1e-15)
    assert float(cosine_similarity(a, torch.tensor([2.0, -1.0, 0.0], dtype=torch.float64))) == 0.0
    assert float(cosine_similarity(a, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))) == pytest.approx(1 / 3)
    zero = torch.zeros(3, dtype=torch.float64)
    assert float(cosine_similarity(zero, a)) == 0.0 and float(cosine_similarity(zero, zero)) == 0.0
    with pytest.raises(ValueError, match=r"Invalid a/b: got shapes \(3,\) and \(2,\)"):
        cosine_similarity(a, torch.ones(2))


def test_flat_params_round_trip_and_detached_copy() -> None:
    layer = nn.Linear(3, 2).double()
    params = list(layer.parameters())
    flat = flat_params(params)
    assert flat.shape == (8,) and not flat.requires_grad
    torch.testing.assert_close(flat, torch.cat([layer.weight.reshape(-1), layer.bias]).detach(), rtol=0, atol=0)
    pieces = unflatten(flat, params)
    assert all(torch.equal(piece, param) for piece, param in zip(pieces, params))
    with torch.no_grad():
        layer.weight.add_(1.0)
    assert not torch.equal(flat[:6], layer.weight.detach().reshape(-1))  # a copy, not a view
    with pytest.raises(ValueError, match=r"Invalid flat: got shape \(7,\); expected a 1-D tensor of length 8"):
        unflatten(torch.zeros(7), params)


def test_validation() -> None:
    def loss(x: Tensor) -> Tensor:
        return (x**2).sum()

    with pytest.raises(ValueError, match=r"Invalid theta: got shape \(2, 2\), dtype torch.float32; expected a 1-D"):
        explicit_hessian(loss, torch.ones(2, 2))
    with pytest.raises(ValueError, match="Invalid damping: -1.0; expected a finite number >= 0"):
        newton_step(loss, torch.ones(2), damping=-1.0)
    with pytest.raises(ValueError, match="Invalid damping: nan"):
        natural_gradient_step(loss, torch.ones(2), torch.ones(2), damping=float("nan"))
    with pytest.raises(ValueError, match=r"Invalid matrix/vector: got shapes \(2, 2\) and \(3,\)"):
        solve_damped(torch.eye(2), torch.ones(3))

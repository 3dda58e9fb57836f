"""Fisher-vector products against the explicit Hessian of the analytic mean KL (DESIGN principle 4)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from trpo_lab.optim.fisher import fisher_vector_product, fisher_vector_product_func, flat_grad

# torch.func.jvp loads torch's own jvp decompositions on first use, which call the deprecated torch.jit.script.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

KINDS = ["categorical", "gaussian", "multidiscrete"]
BACKENDS = ["double_backprop", "torch_func"]
MakeProblem = Callable[..., Any]


def make_fvp(problem: Any, backend: str, damping: float) -> Callable[[Tensor], Tensor]:
    if backend == "double_backprop":
        return fisher_vector_product(problem.kl_fn, problem.params, damping=damping)
    return fisher_vector_product_func(problem.kl_fn_of_params, problem.params, damping=damping)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("damping", [0.0, 0.1])
@pytest.mark.parametrize("kind", KINDS)
def test_fvp_equals_explicit_hessian_of_the_kl(
    kind: str, damping: float, backend: str, make_problem: MakeProblem
) -> None:
    problem = make_problem(kind)
    damping_matrix = damping * torch.eye(problem.size, dtype=torch.float64)
    matrix = problem.explicit_hessian() + damping_matrix
    # The Hessian of a KL at its minimum is not trivially zero or the identity.
    assert matrix.abs().max() > 1e-3 and not torch.allclose(matrix, damping_matrix)
    fvp = make_fvp(problem, backend, damping)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        vector = torch.randn(problem.size, generator=generator, dtype=torch.float64)
        torch.testing.assert_close(fvp(vector), matrix @ vector, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_both_backends_agree(kind: str, make_problem: MakeProblem) -> None:
    problem = make_problem(kind, seed=3)
    vector = torch.randn(problem.size, dtype=torch.float64)
    double_backprop = make_fvp(problem, "double_backprop", 0.05)(vector)
    torch_func = make_fvp(problem, "torch_func", 0.05)(vector)
    torch.testing.assert_close(double_backprop, torch_func, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_fisher_is_symmetric_psd_and_linear(kind: str, backend: str, make_problem: MakeProblem) -> None:
    problem = make_problem(kind, seed=5)
    fvp = make_fvp(problem, backend, 0.0)
    generator = torch.Generator().manual_seed(2)
    u, w = torch.randn(2, problem.size, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(torch.dot(u, fvp(w)), torch.dot(w, fvp(u)), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fvp(2.5 * u - 0.75 * w), 2.5 * fvp(u) - 0.75 * fvp(w), rtol=1e-10, atol=1e-12)
    for vector in torch.randn(8, problem.size, generator=generator, dtype=torch.float64):
        assert float(torch.dot(vector, fvp(vector))) >= -1e-12


def test_kl_fn_is_evaluated_once_and_fvp_is_reusable(make_problem: MakeProblem) -> None:
    problem = make_problem("gaussian")
    calls = []

    def counted_kl() -> Tensor:
        calls.append(1)
        return problem.kl_fn()

    fvp = fisher_vector_product(counted_kl, problem.params, damping=0.1)
    vector = torch.randn(problem.size, dtype=torch.float64)
    first = fvp(vector)
    for _ in range(5):  # as many calls as CG makes; the graph must be retained
        assert torch.equal(fvp(vector), first)
    assert len(calls) == 1


def test_float32_parameters(make_problem: MakeProblem) -> None:
    problem = make_problem("categorical", dtype=torch.float32)
    vector = torch.randn(problem.size)
    for backend in BACKENDS:
        product = make_fvp(problem, backend, 0.1)(vector)
        assert product.dtype == torch.float32 and product.shape == (problem.size,)
        expected = problem.explicit_hessian() @ vector + 0.1 * vector
        torch.testing.assert_close(product, expected, rtol=1e-4, atol=1e-5)


def test_parameters_outside_the_kl_get_only_damping(make_problem: MakeProblem) -> None:
    problem = make_problem("categorical")
    unused = nn.Parameter(torch.ones(2, dtype=torch.float64))
    params = [*problem.params, unused]
    vector = torch.randn(problem.size + 2, dtype=torch.float64)
    product = fisher_vector_product(problem.kl_fn, params, damping=0.3)(vector)
    torch.testing.assert_close(product[-2:], 0.3 * vector[-2:], rtol=0, atol=0)
    expected = problem.explicit_hessian() @ vector[:-2] + 0.3 * vector[:-2]
    torch.testing.assert_close(product[:-2], expected, rtol=1e-10, atol=1e-12)


def test_kl_independent_of_params_gives_damping_times_v() -> None:
    param = nn.Parameter(torch.ones(3, dtype=torch.float64))
    fvp = fisher_vector_product(lambda: torch.zeros((), dtype=torch.float64), [param], damping=0.2)
    vector = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(fvp(vector), 0.2 * vector, rtol=0, atol=0)


def test_flat_grad_layout_unused_params_and_create_graph() -> None:
    weight = nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64))
    unused = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    bias = nn.Parameter(torch.tensor([0.5, -1.0], dtype=torch.float64))
    output = (weight**3).sum() + (bias**2).sum()
    gradient = flat_grad(output, [weight, unused, bias], create_graph=True)
    expected = torch.cat([(3 * weight**2).reshape(-1), torch.zeros(3, dtype=torch.float64), 2 * bias])
    torch.testing.assert_close(gradient, expected.detach(), rtol=0, atol=0)
    # create_graph=True allows the second derivative: d/dw Σ 3w² = 6w.
    second = flat_grad(gradient[:4].sum(), [weight])
    torch.testing.assert_close(second, (6 * weight).detach().reshape(-1), rtol=0, atol=0)


def test_flat_grad_validation() -> None:
    param = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=r"Invalid output: got shape \(2,\); expected a scalar"):
        flat_grad(param * 2, [param])
    with pytest.raises(ValueError, match="Invalid params: got an empty sequence"):
        flat_grad(param.sum(), [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("damping", [-0.1, float("nan"), float("inf")])
def test_damping_validation(backend: str, damping: float, make_problem: MakeProblem) -> None:
    problem = make_problem("categorical")
    with pytest.raises(ValueError, match=f"Invalid damping: {damping!r}; expected a finite number >= 0"):
        make_fvp(problem, backend, damping)


def test_params_validation(make_problem: MakeProblem) -> None:
    problem = make_problem("categorical")
    with pytest.raises(ValueError, match="Invalid params: got an empty sequence"):
        fisher_vector_product(problem.kl_fn, [])
    with pytest.raises(ValueError, match="Invalid params: got an empty sequence"):
        fisher_vector_product_func(problem.kl_fn_of_params, [])
    frozen = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"Invalid params\[1\]: a tensor of shape \(3,\) with requires_grad=False"):
        fisher_vector_product(problem.kl_fn, [problem.params[0], frozen])
    with pytest.raises(ValueError, match="Invalid kl_fn: it returned .*expected a scalar tensor"):
        fisher_vector_product(lambda: problem.policy.kl(problem.old, problem.policy(problem.obs)), problem.params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vector_shape_validation(backend: str, make_problem: MakeProblem) -> None:
    problem = make_problem("gaussian")
    fvp = make_fvp(problem, backend, 0.1)
    message = f"Invalid vector: got shape \\(3,\\); expected a 1-D tensor of length {problem.size}"
    with pytest.raises(ValueError, match=message):
        fvp(torch.ones(3, dtype=torch.float64))

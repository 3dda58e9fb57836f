"""Tests for trpo_lab.optim.shampoo: exact references for the roots and the per-axis
preconditioning, degenerate configurations equal to Adam/AdamW/SGD, robustness counters and
state_dict round trips."""

from __future__ import annotations

import io
import math
import string
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from trpo_lab.optim.shampoo import InverseRootError, Shampoo, matrix_inverse_root

NEVER = 10**9  # a start_preconditioning_step that is never reached
NO_EVENTS = dict(skipped_nonfinite_steps=0, root_float64_retries=0, root_fallbacks=0)


def eager_shampoo(params: Any, **overrides: Any) -> Shampoo:
    """Shampoo that preconditions from the first step and recomputes roots every step."""
    kwargs: dict[str, Any] = dict(lr=0.01, start_preconditioning_step=1, precondition_every=1)
    return Shampoo(params, **{**kwargs, **overrides})


@pytest.fixture(autouse=True, scope="module")
def single_intra_op_thread() -> Iterator[None]:
    """The tensors here are tiny: intra-op threads only add contention on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def random_spd(size: int, condition: float, generator: torch.Generator) -> Tensor:
    """Random float64 SPD matrix with eigenvalues log-spaced in [1/condition, 1]."""
    basis, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    eigenvalues = torch.logspace(0.0, -math.log10(condition), size, dtype=torch.float64)
    return (basis * eigenvalues) @ basis.T


def reference_inverse_root(matrix: Tensor, root: int, epsilon: float) -> Tensor:
    """(A + εI)^(-1/root) from a float64 eigendecomposition."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix.double())
    return (eigenvectors * (eigenvalues + epsilon).pow(-1.0 / root)) @ eigenvectors.T


def mode_product_reference(tensor: Tensor, factors: list[Tensor]) -> Tensor:
    """tensor ×₁ F₁ ×₂ F₂ ⋯ ×ₖ Fₖ as a single einsum, e.g. "abcd,ae,bf,cg,dh->efgh"."""
    letters = string.ascii_lowercase
    order = tensor.ndim
    inputs, outputs = letters[:order], letters[order : 2 * order]
    spec = ",".join([inputs, *(inputs[i] + outputs[i] for i in range(order))]) + "->" + outputs
    return torch.einsum(spec, tensor, *factors)


def relative_error(actual: Tensor, expected: Tensor) -> float:
    return float(torch.linalg.norm(actual.double() - expected) / torch.linalg.norm(expected))


def small_mlp(seed: int, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def batches(count: int, dtype: torch.dtype = torch.float64) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(123)
    return [
        (
            torch.randn(16, 4, generator=generator, dtype=dtype),
            torch.randn(16, 3, generator=generator, dtype=dtype),
        )
        for _ in range(count)
    ]


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[Tensor, Tensor]
) -> None:
    inputs, targets = batch
    optimizer.zero_grad()
    nn.functional.mse_loss(model(inputs), targets).backward()
    optimizer.step()


def state_tensors(optimizer: Shampoo) -> Iterator[Tensor]:
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, Tensor):
                yield value
            elif isinstance(value, list):
                yield from value


# --- matrix_inverse_root ------------------------------------------------------------------


@pytest.mark.parametrize("root", [2, 4, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matrix_inverse_root_matches_float64_eigendecomposition(root: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    epsilon = 1e-6
    matrix = random_spd(7 + seed, condition=10.0 ** (1 + seed), generator=generator)
    expected = reference_inverse_root(matrix, root, epsilon)

    actual, retried = matrix_inverse_root(matrix, root, epsilon)
    assert actual.dtype == torch.float64 and not retried
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
    # Independent of any eigendecomposition: R^root (A + εI) = I.
    regularised = matrix + epsilon * torch.eye(matrix.shape[0], dtype=torch.float64)
    identity = torch.linalg.matrix_power(actual, root) @ regularised
    expected_identity = torch.eye(matrix.shape[0], dtype=torch.float64)
    torch.testing.assert_close(identity, expected_identity, rtol=0.0, atol=1e-8)

    actual32, retried32 = matrix_inverse_root(matrix.float(), root, epsilon)
    assert actual32.dtype == torch.float32 and not retried32
    assert relative_error(actual32, expected) < 1e-4


def test_matrix_inverse_root_of_rank_deficient_float32_matrix_is_finite_without_retry() -> None:
    # Rounding gives a rank-one matrix slightly negative eigenvalues; they must be clamped,
    # not turned into NaN (which would force a float64 retry).
    vector = torch.randn(12, generator=torch.Generator().manual_seed(0))
    matrix = torch.outer(vector, vector) * 1e3
    inverse_root, retried = matrix_inverse_root(matrix, 4, 1e-6)
    assert not retried
    assert torch.isfinite(inverse_root).all()
    # Along the range of the matrix, v ↦ (1e3·|v|² + ε)^(-1/4) v.
    eigenvalue = 1e3 * float(vector.double().square().sum())
    expected = (eigenvalue + 1e-6) ** -0.25 * vector.double()
    actual = inverse_root.double() @ vector.double()
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=0.0)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(matrix=torch.ones(2, 3), root=2, epsilon=1e-6), "matrix shape"),
        (dict(matrix=torch.eye(2), root=0, epsilon=1e-6), "root"),
        (dict(matrix=torch.eye(2), root=2, epsilon=0.0), "epsilon"),
    ],
)
def test_matrix_inverse_root_rejects_invalid_arguments(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        matrix_inverse_root(**kwargs)


def test_matrix_inverse_root_retries_in_float64_then_raises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_eigh = torch.linalg.eigh
    dtypes: list[torch.dtype] = []

    def fail_in_float32(matrix: Tensor) -> Any:
        dtypes.append(matrix.dtype)
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("injected failure")
        return real_eigh(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", fail_in_float32)
    matrix = random_spd(5, 10.0, torch.Generator().manual_seed(0))
    inverse_root, retried = matrix_inverse_root(matrix.float(), 2, 1e-6)
    assert retried and dtypes == [torch.float32, torch.float64]
    assert inverse_root.dtype == torch.float32
    assert relative_error(inverse_root, reference_inverse_root(matrix, 2, 1e-6)) < 1e-6

    def always_fail(matrix: Tensor) -> Any:
        raise torch.linalg.LinAlgError("injected failure")

    monkeypatch.setattr(torch.linalg, "eigh", always_fail)
    with pytest.raises(InverseRootError):
        matrix_inverse_root(matrix.float(), 2, 1e-6)


# --- degenerate configurations equal plain optimizers ---------------------------------------


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_without_preconditioning_adam_grafting_equals_adam(weight_decay: float) -> None:
    shampoo_model, adam_model = small_mlp(0), small_mlp(0)
    shampoo = Shampoo(
        shampoo_model.parameters(),
        lr=0.02,
        betas=(0.9, 1.0),
        weight_decay=weight_decay,
        start_preconditioning_step=NEVER,
        grafting="adam",
        grafting_beta2=0.999,
        grafting_epsilon=1e-8,
    )
    # Shampoo's weight decay is decoupled, so the reference is AdamW (Adam when it is zero).
    adam = torch.optim.AdamW(
        adam_model.parameters(), lr=0.02, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay
    )
    for batch in batches(20):
        train_step(shampoo_model, shampoo, batch)
        train_step(adam_model, adam, batch)
        for actual, expected in zip(shampoo_model.parameters(), adam_model.parameters()):
            torch.testing.assert_close(actual, expected, rtol=0.0, atol=1e-12)
    initial = small_mlp(0)
    for trained, untrained in zip(shampoo_model.parameters(), initial.parameters()):
        assert not torch.allclose(trained, untrained)


def test_preconditioning_starts_exactly_at_start_preconditioning_step() -> None:
    shampoo_model, adam_model = small_mlp(6), small_mlp(6)
    shampoo = Shampoo(
        shampoo_model.parameters(), lr=0.02, start_preconditioning_step=4, precondition_every=100
    )
    adam = torch.optim.Adam(adam_model.parameters(), lr=0.02)
    for step, batch in enumerate(batches(4), start=1):
        train_step(shampoo_model, shampoo, batch)
        train_step(adam_model, adam, batch)
        same = all(
            torch.allclose(p, q, rtol=0.0, atol=1e-12)
            for p, q in zip(shampoo_model.parameters(), adam_model.parameters())
        )
        assert same == (step < 4), step
    # The roots used at step 4 were computed at step 4, not left at the identity.
    weight_roots = shampoo.state[shampoo_model[0].weight]["inverse_roots"]
    assert not torch.allclose(weight_roots[0], torch.eye(6, dtype=torch.float64))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_without_preconditioning_sgd_grafting_equals_sgd(weight_decay: float) -> None:
    shampoo_model, sgd_model = small_mlp(1), small_mlp(1)
    shampoo = Shampoo(
        shampoo_model.parameters(),
        lr=0.05,
        betas=(0.0, 1.0),
        weight_decay=weight_decay,
        start_preconditioning_step=NEVER,
        grafting="sgd",
    )
    # Without momentum, SGD's L2 penalty and decoupled decay give the same step.
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.05, weight_decay=weight_decay)
    for batch in batches(20):
        train_step(shampoo_model, shampoo, batch)
        train_step(sgd_model, sgd, batch)
        for actual, expected in zip(shampoo_model.parameters(), sgd_model.parameters()):
            torch.testing.assert_close(actual, expected, rtol=0.0, atol=1e-12)


# --- the Shampoo direction --------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 4), (4, 3, 3, 3)])
def test_per_axis_statistics_and_direction_match_reference(shape: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(len(shape))
    param = nn.Parameter(torch.randn(*shape, generator=generator, dtype=torch.float64))
    lr, epsilon, order = 0.1, 1e-8, len(shape)
    optimizer = Shampoo(
        [param], lr=lr, betas=(0.0, 1.0), epsilon=epsilon, grafting="none",
        start_preconditioning_step=1, precondition_every=1,
    )
    statistics = [torch.zeros(size, size, dtype=torch.float64) for size in shape]
    for _ in range(3):
        grad = torch.randn(*shape, generator=generator, dtype=torch.float64)
        for axis in range(order):
            others = [a for a in range(order) if a != axis]
            statistics[axis] += torch.tensordot(grad, grad, dims=(others, others))
        roots = [reference_inverse_root(s, 2 * order, epsilon) for s in statistics]
        expected = param.detach() - lr * mode_product_reference(grad, roots)
        param.grad = grad
        optimizer.step()
        torch.testing.assert_close(param.detach(), expected, rtol=1e-9, atol=1e-12)

    state = optimizer.state[param]
    assert [tuple(s.shape) for s in state["statistics"]] == [(size, size) for size in shape]
    assert [tuple(r.shape) for r in state["inverse_roots"]] == [(size, size) for size in shape]
    for actual, expected_statistics in zip(state["statistics"], statistics):
        torch.testing.assert_close(actual, expected_statistics)


def test_conv2d_weight_trains_with_per_axis_statistics() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, kernel_size=3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    optimizer = Shampoo(
        model.parameters(), lr=0.01, start_preconditioning_step=2, precondition_every=2
    )
    inputs, targets = torch.randn(16, 3, 6, 6), torch.randn(16, 2)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    conv_state = optimizer.state[model[0].weight]
    assert [tuple(s.shape) for s in conv_state["statistics"]] == [(4, 4), (3, 3), (3, 3), (3, 3)]
    assert optimizer.stats == NO_EVENTS


def test_vectors_and_oversized_axes_use_the_diagonal_fallback() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.randn(4, 5, generator=generator, dtype=torch.float64))
    bias = nn.Parameter(torch.randn(4, generator=generator, dtype=torch.float64))
    scalar = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
    lr, epsilon = 0.1, 1e-8
    optimizer = Shampoo(
        [weight, bias, scalar], lr=lr, betas=(0.0, 1.0), epsilon=epsilon, grafting="none",
        start_preconditioning_step=1, precondition_every=1, max_preconditioner_dim=4,
    )
    weight_grad = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    bias_grad = torch.randn(4, generator=generator, dtype=torch.float64)
    before = [p.detach().clone() for p in (weight, bias, scalar)]
    weight.grad, bias.grad = weight_grad, bias_grad
    scalar.grad = torch.tensor(-2.0, dtype=torch.float64)
    optimizer.step()

    # Axis 0 (4 <= 4) gets a full 4x4 statistic; axis 1 (5 > 4) only the diagonal.
    assert [tuple(s.shape) for s in optimizer.state[weight]["statistics"]] == [(4, 4), (5,)]
    assert [tuple(r.shape) for r in optimizer.state[weight]["inverse_roots"]] == [(4, 4), (5,)]
    assert [tuple(s.shape) for s in optimizer.state[bias]["statistics"]] == [(4,)]
    assert [tuple(s.shape) for s in optimizer.state[scalar]["statistics"]] == [(1,)]

    left = reference_inverse_root(weight_grad @ weight_grad.T, 4, epsilon)
    right_diagonal = (weight_grad.square().sum(dim=0) + epsilon).pow(-0.25)
    expected_weight = before[0] - lr * left @ weight_grad * right_diagonal
    torch.testing.assert_close(weight.detach(), expected_weight)
    # Vectors: AdaGrad, g / sqrt(Σg² + ε).
    expected_bias = before[1] - lr * bias_grad / (bias_grad.square() + epsilon).sqrt()
    torch.testing.assert_close(bias.detach(), expected_bias)
    torch.testing.assert_close(scalar.detach(), before[2] + lr * 2.0 / (4.0 + epsilon) ** 0.5)


@pytest.mark.parametrize("grafting", ["sgd", "adam"])
def test_grafting_gives_shampoo_direction_the_grafted_step_norm(grafting: str) -> None:
    generator = torch.Generator().manual_seed(0)
    param = nn.Parameter(torch.randn(5, 4, generator=generator, dtype=torch.float64))
    before = param.detach().clone()
    lr, epsilon = 0.1, 1e-8
    optimizer = eager_shampoo([param], lr=lr, epsilon=epsilon, grafting=grafting)
    grad = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    param.grad = grad
    optimizer.step()

    left = reference_inverse_root(grad @ grad.T, 4, epsilon)
    right = reference_inverse_root(grad.T @ grad, 4, epsilon)
    shampoo = left @ grad @ right
    # First step: m̂ = g, and Adam's step is g / (|g| + ε_g).
    grafted = grad if grafting == "sgd" else grad / (grad.abs() + 1e-8)
    expected = before - lr * shampoo * grafted.norm() / shampoo.norm()
    torch.testing.assert_close(param.detach(), expected, rtol=1e-9, atol=1e-12)


def test_matrix_roots_are_recomputed_on_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    real_eigh = torch.linalg.eigh
    calls: list[int] = []

    def counting_eigh(matrix: Tensor) -> Any:
        calls.append(matrix.shape[0])
        return real_eigh(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", counting_eigh)
    torch.manual_seed(0)
    layer = nn.Linear(4, 3, bias=False)
    optimizer = Shampoo(
        layer.parameters(), lr=0.01, start_preconditioning_step=3, precondition_every=4
    )
    steps_with_calls = []
    for step in range(1, 13):
        before = len(calls)
        layer.weight.grad = torch.randn(3, 4)
        optimizer.step()
        if len(calls) > before:
            steps_with_calls.append(step)
            assert sorted(calls[before:]) == [3, 4]
    assert steps_with_calls == [3, 7, 11]


def test_preconditioned_direction_is_the_step_without_moving_parameters() -> None:
    kwargs: dict[str, Any] = dict(lr=0.05, start_preconditioning_step=2, precondition_every=2)
    direction_model, step_model = small_mlp(2), small_mlp(2)
    frozen = nn.Parameter(torch.zeros(2, dtype=torch.float64))  # never receives a gradient
    direction_optimizer = Shampoo([*direction_model.parameters(), frozen], **kwargs)
    step_optimizer = Shampoo(step_model.parameters(), **kwargs)
    for inputs, targets in batches(5):
        for model in (direction_model, step_model):
            model.zero_grad()
            nn.functional.mse_loss(model(inputs), targets).backward()
        before = [p.detach().clone() for p in direction_model.parameters()]
        directions = direction_optimizer.preconditioned_direction()
        step_optimizer.step()

        assert len(directions) == len(before) + 1
        assert torch.equal(directions[-1], torch.zeros(2, dtype=torch.float64))
        for param, previous in zip(direction_model.parameters(), before):
            assert torch.equal(param, previous)
        with torch.no_grad():
            for param, direction in zip(direction_model.parameters(), directions):
                param.add_(direction, alpha=-kwargs["lr"])
        for actual, expected in zip(direction_model.parameters(), step_model.parameters()):
            torch.testing.assert_close(actual, expected, rtol=0.0, atol=1e-14)


def test_shampoo_beats_tuned_adam_on_ill_conditioned_matrix_least_squares() -> None:
    # loss(W) = ½ tr((W - W*)ᵀ H_L (W - W*) H_R), each factor with condition number 1e3 in a
    # random basis, so a diagonal method cannot exploit axis alignment.
    generator = torch.Generator().manual_seed(0)
    left, right = random_spd(10, 1e3, generator), random_spd(8, 1e3, generator)
    target = torch.randn(10, 8, generator=generator, dtype=torch.float64)

    def loss_fn(weight: Tensor) -> Tensor:
        error = weight - target
        return 0.5 * torch.sum(error * (left @ error @ right))

    def final_loss(
        make_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer], steps: int = 100
    ) -> float:
        weight = torch.zeros(10, 8, dtype=torch.float64, requires_grad=True)
        optimizer = make_optimizer([weight])
        for _ in range(steps):
            optimizer.zero_grad()
            loss_fn(weight).backward()
            optimizer.step()
        return float(loss_fn(weight.detach()))

    learning_rates = [0.01, 0.03, 0.1, 0.3, 1.0]
    adam_best = min(final_loss(lambda p, lr=lr: torch.optim.Adam(p, lr=lr)) for lr in learning_rates)
    shampoo_best = min(
        final_loss(lambda p, lr=lr: Shampoo(p, lr=lr, start_preconditioning_step=1, precondition_every=1))
        for lr in [0.1, 0.3, 1.0]
    )
    assert shampoo_best < 0.1 * adam_best, (shampoo_best, adam_best)


# --- robustness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), 1e30])
def test_non_finite_statistics_skip_the_step_and_are_counted(bad_value: float) -> None:
    # 1e30 is a finite float32 gradient whose square (the statistics) overflows.
    kwargs: dict[str, Any] = dict(
        lr=0.05, betas=(0.9, 0.99), start_preconditioning_step=2, precondition_every=2
    )
    data = batches(6, dtype=torch.float32)
    poisoned_model, clean_model = small_mlp(3, torch.float32), small_mlp(3, torch.float32)
    poisoned = Shampoo(poisoned_model.parameters(), **kwargs)
    clean = Shampoo(clean_model.parameters(), **kwargs)
    for index, batch in enumerate(data):
        if index == 3:
            for param in poisoned_model.parameters():
                param.grad = torch.full_like(param, 0.1)
                param.grad.view(-1)[0] = bad_value
            before = [p.detach().clone() for p in poisoned_model.parameters()]
            poisoned.step()
            for param, previous in zip(poisoned_model.parameters(), before):
                assert torch.equal(param, previous)
        train_step(poisoned_model, poisoned, batch)
        train_step(clean_model, clean, batch)

    assert poisoned.stats["skipped_nonfinite_steps"] == 4  # every parameter skipped once
    assert clean.stats["skipped_nonfinite_steps"] == 0
    # Skipping left no trace: the poisoned run continues exactly like the clean one.
    for actual, expected in zip(poisoned_model.parameters(), clean_model.parameters()):
        assert torch.isfinite(actual).all()
        assert torch.equal(actual, expected)
    for actual, expected in zip(state_tensors(poisoned), state_tensors(clean)):
        assert torch.equal(actual, expected)


def test_eigh_failure_is_retried_in_float64_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    real_eigh = torch.linalg.eigh
    failures = [1]

    def fail_once(matrix: Tensor) -> Any:
        if failures:
            failures.pop()
            raise torch.linalg.LinAlgError("injected failure")
        return real_eigh(matrix)

    torch.manual_seed(0)
    layer = nn.Linear(4, 3, bias=False)
    # Three gradients before the first root, so both statistics are full rank.
    optimizer = Shampoo(
        layer.parameters(), lr=0.01, start_preconditioning_step=3, precondition_every=10
    )
    monkeypatch.setattr(torch.linalg, "eigh", fail_once)
    for _ in range(3):
        layer.weight.grad = torch.randn(3, 4)
        optimizer.step()

    assert optimizer.stats == {**NO_EVENTS, "root_float64_retries": 1}
    state = optimizer.state[layer.weight]
    for statistics, inverse_root in zip(state["statistics"], state["inverse_roots"]):
        expected = reference_inverse_root(statistics, 4, 1e-12)
        assert relative_error(inverse_root, expected) < 1e-4
    assert torch.isfinite(layer.weight).all()


def test_eigh_returning_nan_is_retried_in_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    real_eigh = torch.linalg.eigh

    def nan_in_float32(matrix: Tensor) -> Any:
        eigenvalues, eigenvectors = real_eigh(matrix)
        if matrix.dtype == torch.float32:
            eigenvalues = torch.full_like(eigenvalues, float("nan"))
        return eigenvalues, eigenvectors

    torch.manual_seed(0)
    layer = nn.Linear(4, 3, bias=False)
    optimizer = eager_shampoo(layer.parameters())
    layer.weight.grad = torch.randn(3, 4)
    monkeypatch.setattr(torch.linalg, "eigh", nan_in_float32)
    optimizer.step()
    assert optimizer.stats["root_float64_retries"] == 2  # both axes
    assert torch.isfinite(layer.weight).all()


def test_persistent_eigh_failure_keeps_the_last_good_root(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(4, 3, bias=False)
    optimizer = eager_shampoo(layer.parameters())
    for _ in range(3):
        layer.weight.grad = torch.randn(3, 4)
        optimizer.step()
    state = optimizer.state[layer.weight]
    good_roots = [root.clone() for root in state["inverse_roots"]]

    def always_fail(matrix: Tensor) -> Any:
        raise torch.linalg.LinAlgError("injected failure")

    monkeypatch.setattr(torch.linalg, "eigh", always_fail)
    for _ in range(2):
        layer.weight.grad = torch.randn(3, 4)
        optimizer.step()

    assert optimizer.stats == {**NO_EVENTS, "root_fallbacks": 4}  # 2 axes x 2 steps
    for root, good in zip(state["inverse_roots"], good_roots):
        assert torch.equal(root, good)
    assert torch.isfinite(layer.weight).all()


# --- API ------------------------------------------------------------------------------------------


def test_state_dict_round_trip_continues_bit_identically() -> None:
    kwargs: dict[str, Any] = dict(
        lr=0.03,
        betas=(0.9, 0.99),
        weight_decay=0.01,
        start_preconditioning_step=3,
        precondition_every=4,
    )
    data = batches(16, dtype=torch.float32)
    model = small_mlp(4, torch.float32)
    optimizer = Shampoo(model.parameters(), **kwargs)
    for batch in data[:7]:
        train_step(model, optimizer, batch)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    for batch in data[7:]:
        train_step(model, optimizer, batch)

    buffer.seek(0)
    checkpoint = torch.load(buffer)
    restored_model = small_mlp(99, torch.float32)
    restored_model.load_state_dict(checkpoint["model"])
    restored = Shampoo(restored_model.parameters())  # hyperparameters come from the checkpoint
    restored.load_state_dict(checkpoint["optimizer"])
    for batch in data[7:]:
        train_step(restored_model, restored, batch)

    assert restored.param_groups[0]["start_preconditioning_step"] == 3
    for actual, expected in zip(restored_model.parameters(), model.parameters()):
        assert torch.equal(actual, expected)
    for actual, expected in zip(state_tensors(restored), state_tensors(optimizer)):
        assert torch.equal(actual, expected)
    assert [s["step"] for s in restored.state.values()] == [16] * 4


def test_step_runs_the_closure_with_gradients_enabled() -> None:
    model = small_mlp(5)
    optimizer = Shampoo(model.parameters(), lr=0.01)
    inputs, targets = batches(1)[0]

    def closure() -> float:
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        return loss.item()

    with torch.no_grad():
        loss = optimizer.step(closure)
    assert isinstance(loss, float)
    assert all(optimizer.state[p]["step"] == 1 for p in model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(lr=-1.0), "lr"),
        (dict(betas=(1.0, 1.0)), "betas\\[0\\]"),
        (dict(betas=(0.9, 0.0)), "betas\\[1\\]"),
        (dict(epsilon=0.0), "epsilon"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(precondition_every=0), "precondition_every"),
        (dict(start_preconditioning_step=2.5), "start_preconditioning_step"),
        (dict(max_preconditioner_dim=0), "max_preconditioner_dim"),
        (dict(exponent_override=0), "exponent_override"),
        (dict(grafting="adagrad"), "grafting"),
        (dict(relative_epsilon=1), "relative_epsilon"),
        (dict(grafting_beta2=1.0), "grafting_beta2"),
        (dict(grafting_epsilon=-1.0), "grafting_epsilon"),
    ],
)
def test_invalid_hyperparameters_are_rejected_by_name(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=f"Invalid {name}: "):
        Shampoo([nn.Parameter(torch.zeros(2))], **kwargs)


def test_exponent_override_sets_the_root() -> None:
    generator = torch.Generator().manual_seed(0)
    param = nn.Parameter(torch.zeros(3, 4, dtype=torch.float64))
    optimizer = Shampoo(
        [param], lr=1.0, betas=(0.0, 1.0), epsilon=1e-8, grafting="none",
        start_preconditioning_step=1, exponent_override=2,
    )
    grad = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    param.grad = grad
    optimizer.step()
    left = reference_inverse_root(grad @ grad.T, 2, 1e-8)
    right = reference_inverse_root(grad.T @ grad, 2, 1e-8)
    torch.testing.assert_close(param.detach(), -(left @ grad @ right))


def test_works_as_stable_baselines3_policy_optimizer() -> None:
    stable_baselines3 = pytest.importorskip("stable_baselines3")
    model = stable_baselines3.PPO(
        "MlpPolicy",
        "CartPole-v1",
        n_steps=32,
        batch_size=32,
        n_epochs=2,
        learning_rate=lambda progress_remaining: 1e-3 * (0.5 + progress_remaining),
        policy_kwargs=dict(
            optimizer_class=Shampoo,
            optimizer_kwargs=dict(start_preconditioning_step=2, precondition_every=2),
        ),
        device="cpu",
        seed=0,
    )
    model.learn(total_timesteps=64)
    optimizer = model.policy.optimizer
    assert isinstance(optimizer, Shampoo)
    # SB3 builds the optimizer with lr=1.5e-3 and writes the schedule's value into
    # param_groups before each update: 5e-4 at the last one (no progress remaining).
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)
    assert optimizer.stats["skipped_nonfinite_steps"] == 0
    assert all(torch.isfinite(p).all() for p in model.policy.parameters())
    assert max(state["step"] for state in optimizer.state.values()) == 4


def test_relative_epsilon_makes_the_direction_independent_of_the_gradient_scale() -> None:
    """(S + ε τ I)^(-1/4) with τ = tr(S)/d: scaling every gradient by c scales D_t by c^0 for
    a matrix (c · c^(-1/2) · c^(-1/2)); with an absolute ε the tiny-gradient run differs."""
    torch.manual_seed(0)
    grads = [torch.randn(6, 4) for _ in range(3)]

    def last_direction(scale: float, relative: bool) -> Tensor:
        param = nn.Parameter(torch.zeros(6, 4))
        optimizer = Shampoo(
            [param], betas=(0.0, 0.99), epsilon=1e-4, relative_epsilon=relative,
            precondition_every=1, start_preconditioning_step=1, grafting="none",
        )
        for grad in grads:
            param.grad = grad * scale
            (direction,) = optimizer.preconditioned_direction()
        return direction

    torch.testing.assert_close(last_direction(1e-4, True), last_direction(1.0, True), rtol=1e-3, atol=1e-5)
    assert not torch.allclose(last_direction(1e-4, False), last_direction(1.0, False), rtol=1e-2)

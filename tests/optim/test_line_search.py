"""The KL-constrained backtracking line search: acceptance rules, restoration, and batched == sequential."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call, vmap

from trpo_lab.optim._flat import flat_params, unflatten
from trpo_lab.optim.line_search import LineSearchResult, kl_line_search

Evaluate = Callable[[Tensor], tuple[Tensor, Tensor]]
NAN, INF = float("nan"), float("inf")


def table_evaluate(shrinking_factor: float, losses: list[float], kls: list[float], calls: list[int]) -> Evaluate:
    """A one-parameter problem (θ0 = 0, full step 1) whose candidate i gets losses[i], kls[i] from a table."""
    count = len(losses)
    fractions = torch.tensor([shrinking_factor**i for i in range(count)], dtype=torch.float64)

    def evaluate(candidates: Tensor) -> tuple[Tensor, Tensor]:
        calls.append(candidates.shape[0])
        indices = (candidates[:, :1] - fractions).abs().argmin(dim=1)
        return torch.tensor(losses, dtype=torch.float64)[indices], torch.tensor(kls, dtype=torch.float64)[indices]

    return evaluate


def run_table(
    losses: list[float], kls: list[float], *, batched: bool, accept_ratio: float = 0.0, expected: float = 1.0
) -> tuple[LineSearchResult, Tensor, list[int]]:
    param = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    calls: list[int] = []
    result = kl_line_search(
        [param],
        torch.ones(1, dtype=torch.float64),
        table_evaluate(0.5, losses, kls, calls),
        loss0=torch.tensor(1.0, dtype=torch.float64),
        expected_improvement=torch.tensor(expected, dtype=torch.float64),
        kl_limit=0.01,
        shrinking_factor=0.5,
        max_iter=len(losses),
        accept_ratio=accept_ratio,
        batched=batched,
    )
    return result, param.detach().clone(), calls


CASES = {
    # name: (losses, kls, expected backtracks or None for failure)
    "full step accepted": ([0.5, 0.2, 0.1], [0.001, 0.001, 0.001], 0),
    "every rejection rule, then success": (
        [NAN, -INF, INF, 0.5, 0.5, 0.5, 1.0, 1.2, 0.9, 0.8],
        [0.001, 0.001, 0.001, NAN, INF, 0.02, 0.001, 0.001, 0.001, 0.001],
        8,
    ),
    "kl exactly at the limit is allowed": ([0.5, 0.4], [0.02, 0.01], 1),
    "nothing acceptable": ([NAN, 0.5, 1.0, 2.0], [0.0, 0.5, 0.001, 0.001], None),
}


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_first_acceptable_candidate_is_chosen(case: str, batched: bool) -> None:
    losses, kls, expected = CASES[case]
    result, param, calls = run_table(losses, kls, batched=batched)
    if expected is None:
        assert not bool(result.success)
        assert int(result.backtracks) == len(losses)
        assert torch.equal(param, torch.zeros(1, dtype=torch.float64))
        assert float(result.step_fraction) == 0.0 and float(result.kl) == 0.0
        assert float(result.loss) == 1.0
        assert float(result.expected_improvement) == 0.0 and float(result.actual_improvement) == 0.0
    else:
        assert bool(result.success)
        assert int(result.backtracks) == expected
        assert float(result.step_fraction) == 0.5**expected
        assert torch.equal(param, torch.tensor([0.5**expected], dtype=torch.float64))
        assert float(result.loss) == losses[expected] and float(result.kl) == kls[expected]
        assert float(result.expected_improvement) == 0.5**expected
        assert float(result.actual_improvement) == 1.0 - losses[expected]
    evaluated = len(losses) if expected is None else expected + 1
    assert calls == ([len(losses)] if batched else [1] * evaluated)


@pytest.mark.parametrize("batched", [False, True])
def test_accept_ratio_requires_a_fraction_of_the_predicted_improvement(batched: bool) -> None:
    # Predicted improvement of candidate i: 0.5**i * 2.0; required: 0.3 * that = 0.6, 0.3, 0.15.
    losses = [0.5, 0.75, 0.8]  # improvements 0.5 (< 0.6), 0.25 (< 0.3), 0.2 (> 0.15)
    result, _, _ = run_table(losses, [0.0, 0.0, 0.0], batched=batched, accept_ratio=0.3, expected=2.0)
    assert int(result.backtracks) == 2
    without_ratio, _, _ = run_table(losses, [0.0, 0.0, 0.0], batched=batched, accept_ratio=0.0, expected=2.0)
    assert int(without_ratio.backtracks) == 0


def test_result_types() -> None:
    result, _, _ = run_table([0.5], [0.0], batched=True)
    assert isinstance(result, LineSearchResult)
    assert all(field.dim() == 0 for field in result)
    assert result.success.dtype == torch.bool and result.backtracks.dtype == torch.int64


class SoftmaxProblem:
    """A linear softmax policy over a few states; loss = -E_s Σ_a π(a|s) A(s, a), KL = mean KL(π_old ‖ π)."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.policy = nn.Linear(3, 2).double()
        self.obs = torch.randn(5, 3, dtype=torch.float64)
        self.advantages = torch.randn(5, 2, dtype=torch.float64)
        self.names = [name for name, _ in self.policy.named_parameters()]
        self.params = list(self.policy.parameters())
        self.old_log_probs = torch.log_softmax(self.policy(self.obs), -1).detach()

    def loss_and_kl(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        logits = functional_call(self.policy, dict(zip(self.names, unflatten(flat, self.params))), (self.obs,))
        log_probs = torch.log_softmax(logits, -1)
        loss = -(log_probs.exp() * self.advantages).sum(-1).mean()
        kl = (self.old_log_probs.exp() * (self.old_log_probs - log_probs)).sum(-1).mean()
        return loss, kl

    def evaluate(self, candidates: Tensor) -> tuple[Tensor, Tensor]:
        return vmap(self.loss_and_kl)(candidates)

    def descent_step(self, step_scale: float) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (loss0, full step -step_scale·∇L, its predicted improvement step_scale·‖∇L‖²)."""
        theta0 = flat_params(self.params).requires_grad_(True)
        loss0, _ = self.loss_and_kl(theta0)
        (gradient,) = torch.autograd.grad(loss0, theta0)
        full_step = -step_scale * gradient
        return loss0.detach(), full_step, -(gradient @ full_step)

    def search(self, step_scale: float, batched: bool, kl_limit: float = 0.01) -> LineSearchResult:
        loss0, full_step, expected = self.descent_step(step_scale)
        return kl_line_search(
            self.params,
            full_step,
            self.evaluate,
            loss0=loss0,
            expected_improvement=expected,
            kl_limit=kl_limit,
            batched=batched,
        )


@pytest.mark.parametrize("batched", [False, True])
def test_softmax_policy_step_stays_in_the_trust_region(batched: bool) -> None:
    problem = SoftmaxProblem()
    theta0 = flat_params(problem.params)
    loss0, full_step, _ = problem.descent_step(2.0)
    result = problem.search(step_scale=2.0, batched=batched)
    assert bool(result.success) and int(result.backtracks) > 0  # the full step is too large
    kept = flat_params(problem.params)
    assert torch.equal(kept, theta0 + result.step_fraction * full_step)
    torch.testing.assert_close(result.step_fraction, torch.tensor(0.8, dtype=torch.float64) ** result.backtracks)
    loss, kl = problem.loss_and_kl(kept)
    assert float(kl) <= 0.01 and float(loss) < float(loss0)
    # Re-evaluated outside vmap: equal to float64 rounding (a batched matmul may round differently).
    torch.testing.assert_close(kl, result.kl, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(loss, result.loss, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(result.actual_improvement, loss0 - loss, rtol=1e-12, atol=1e-15)
    # The candidate before the accepted one broke a rule: the search backtracks only when it must.
    previous_loss, previous_kl = problem.loss_and_kl(theta0 + 0.8 ** (int(result.backtracks) - 1) * full_step)
    assert float(previous_kl) > 0.01 or not float(previous_loss) < float(loss0)


@pytest.mark.parametrize(("step_scale", "succeeds"), [(1.0, True), (3.0, False)])
def test_softmax_policy_modes_agree(step_scale: float, succeeds: bool) -> None:
    results, params = [], []
    for batched in (False, True):
        problem = SoftmaxProblem(seed=1)
        results.append(problem.search(step_scale=step_scale, batched=batched))
        params.append(flat_params(problem.params))
    sequential, batched_result = results
    assert bool(sequential.success) == succeeds
    assert torch.equal(sequential.success, batched_result.success)
    assert torch.equal(sequential.backtracks, batched_result.backtracks)
    assert torch.equal(sequential.step_fraction, batched_result.step_fraction)
    assert torch.equal(params[0], params[1])
    for field in ("loss", "kl", "expected_improvement", "actual_improvement"):
        torch.testing.assert_close(getattr(sequential, field), getattr(batched_result, field), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("batched", [False, True])
def test_failure_restores_params_bitwise_in_place(batched: bool) -> None:
    weight = nn.Parameter(torch.tensor([[0.1, 1e-300], [-3.7e12, 5e-324]], dtype=torch.float64))
    bias = nn.Parameter(torch.tensor([-0.0, 1.0 / 3.0], dtype=torch.float64))
    before = [weight.detach().clone(), bias.detach().clone()]
    pointers = [weight.data_ptr(), bias.data_ptr()]

    def evaluate(candidates: Tensor) -> tuple[Tensor, Tensor]:
        assert torch.equal(weight, before[0]) and torch.equal(bias, before[1])  # params untouched while searching
        return torch.zeros(candidates.shape[0], dtype=torch.float64), torch.full((candidates.shape[0],), INF)

    result = kl_line_search(
        [weight, bias],
        torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=torch.float64),
        evaluate,
        loss0=torch.tensor(1.0, dtype=torch.float64),
        expected_improvement=torch.tensor(1.0, dtype=torch.float64),
        kl_limit=0.01,
        max_iter=4,
        batched=batched,
    )
    assert not bool(result.success)
    for param, original, pointer in zip((weight, bias), before, pointers):
        assert param.data_ptr() == pointer
        assert torch.equal(param.detach().view(torch.int64), original.view(torch.int64))  # bitwise, -0.0 included
    assert weight.requires_grad and bias.requires_grad


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    step_scale=st.floats(0.0, 3.0),
    kl_limit=st.floats(1e-4, 1.0),
    shrinking_factor=st.floats(0.1, 0.95),
    max_iter=st.integers(1, 8),
    accept_ratio=st.sampled_from([0.0, 0.1, 0.5]),
    nan_fraction=st.floats(0.0, 2.0),
    noise=st.floats(0.0, 2.0),
)
def test_invariants_on_random_quadratics(
    size: int,
    seed: int,
    step_scale: float,
    kl_limit: float,
    shrinking_factor: float,
    max_iter: int,
    accept_ratio: float,
    nan_fraction: float,
    noise: float,
) -> None:
    """L(θ) = ½θᵀAθ - bᵀθ and D(θ) = ½(θ-θ0)ᵀM(θ-θ0); the loss is NaN beyond nan_fraction · ‖full_step‖.

    The step direction is the normalised negative gradient plus ``noise`` times a random unit vector, so
    it ranges from steepest descent to (often) ascent; its length is ``step_scale`` times the distance
    to the edge of the trust region D = kl_limit along it.
    """
    generator = torch.Generator().manual_seed(seed)

    def spd() -> Tensor:
        factor = torch.randn(size, size, generator=generator, dtype=torch.float64)
        return factor @ factor.T + 0.1 * torch.eye(size, dtype=torch.float64)

    hessian, metric = spd(), spd()
    linear = torch.randn(size, generator=generator, dtype=torch.float64)
    theta0 = torch.randn(size, generator=generator, dtype=torch.float64)
    gradient = hessian @ theta0 - linear
    perturbation = torch.randn(size, generator=generator, dtype=torch.float64)
    direction = -gradient / gradient.norm() + noise * perturbation / perturbation.norm()
    direction = direction / direction.norm().clamp_min(1e-12)
    full_step = step_scale * torch.sqrt(2 * kl_limit / (direction @ metric @ direction)) * direction
    nan_above = nan_fraction * float(full_step.norm())

    def loss_and_kl(theta: Tensor) -> tuple[Tensor, Tensor]:
        delta = theta - theta0
        loss = 0.5 * (theta * (hessian * theta).sum(-1)).sum(-1) - (linear * theta).sum(-1)
        loss = torch.where(delta.norm(dim=-1) > nan_above, NAN, loss)
        return loss, 0.5 * (delta * (metric * delta).sum(-1)).sum(-1)

    def evaluate(candidates: Tensor) -> tuple[Tensor, Tensor]:
        return vmap(loss_and_kl)(candidates)

    loss0, _ = loss_and_kl(theta0)
    expected = -(gradient @ full_step)
    outcomes = []
    for batched in (False, True):
        param = nn.Parameter(theta0.clone())
        result = kl_line_search(
            [param],
            full_step,
            evaluate,
            loss0=loss0,
            expected_improvement=expected,
            kl_limit=kl_limit,
            shrinking_factor=shrinking_factor,
            max_iter=max_iter,
            accept_ratio=accept_ratio,
            batched=batched,
        )
        outcomes.append((result, param.detach().clone()))

    def acceptable(index: int) -> bool:
        fraction = shrinking_factor**index
        loss, kl = loss_and_kl(theta0 + fraction * full_step)
        improvement = float(loss0 - loss)
        return (
            math.isfinite(float(loss))
            and float(kl) <= kl_limit
            and improvement > accept_ratio * fraction * float(expected)
        )

    reference = next((index for index in range(max_iter) if acceptable(index)), None)
    event("failed" if reference is None else "full step" if reference == 0 else "backtracked")
    for result, kept in outcomes:
        if reference is None:
            assert not bool(result.success) and int(result.backtracks) == max_iter
            assert torch.equal(kept, theta0)
        else:
            assert bool(result.success) and int(result.backtracks) == reference
            assert float(result.kl) <= kl_limit and math.isfinite(float(result.loss))
            kept_loss, kept_kl = loss_and_kl(kept)  # outside vmap: equal to float64 rounding
            torch.testing.assert_close(kept_loss, result.loss, rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(kept_kl, result.kl, rtol=1e-12, atol=1e-15)
            assert float(result.actual_improvement) > accept_ratio * float(result.expected_improvement)
            torch.testing.assert_close(kept, theta0 + shrinking_factor**reference * full_step, rtol=1e-15, atol=1e-15)
    (sequential, kept_sequential), (batched_result, kept_batched) = outcomes
    assert torch.equal(kept_sequential, kept_batched)
    for left, right in zip(sequential, batched_result):
        torch.testing.assert_close(left, right, rtol=1e-13, atol=1e-13, equal_nan=True)


def _forbid_host_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a tensor value was read on the host")

    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


@pytest.mark.parametrize("succeeds", [True, False])
def test_batched_mode_reads_no_tensor_values(monkeypatch: pytest.MonkeyPatch, succeeds: bool) -> None:
    problem = SoftmaxProblem(seed=2)
    loss0, full_step, _ = problem.descent_step(1.0)
    with monkeypatch.context() as patch:
        _forbid_host_reads(patch)
        result = kl_line_search(
            problem.params,
            full_step,
            problem.evaluate,
            loss0=loss0 if succeeds else loss0 - 100.0,
            expected_improvement=torch.tensor(0.0, dtype=torch.float64),
            kl_limit=1.0,
            batched=True,
        )
        with pytest.raises(AssertionError, match="read on the host"):
            bool(result.success)  # the patch was active
    assert bool(result.success) == succeeds


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_mode_has_no_host_sync_on_cuda(dtype: torch.dtype) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    device = torch.device("cuda")
    policy = nn.Linear(3, 2).to(device, dtype)
    obs = torch.randn(64, 3, device=device, dtype=dtype)
    names = [name for name, _ in policy.named_parameters()]
    params = list(policy.parameters())
    old_log_probs = torch.log_softmax(policy(obs), -1).detach()

    def loss_and_kl(flat: Tensor) -> tuple[Tensor, Tensor]:
        logits = functional_call(policy, dict(zip(names, unflatten(flat, params))), (obs,))
        log_probs = torch.log_softmax(logits, -1)
        return -log_probs[:, 0].mean(), (old_log_probs.exp() * (old_log_probs - log_probs)).sum(-1).mean()

    theta0 = flat_params(params)
    loss0, _ = loss_and_kl(theta0)
    full_step = torch.randn(theta0.numel(), device=device, dtype=dtype)
    expected = torch.tensor(0.0, device=device, dtype=dtype)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation now raises
    try:
        result = kl_line_search(
            params,
            full_step,
            vmap(loss_and_kl),
            loss0=loss0,
            expected_improvement=expected,
            kl_limit=0.05,
            batched=True,
        )
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert result.success.device.type == "cuda"
    if bool(result.success):
        assert float(loss_and_kl(flat_params(params))[1]) <= 0.05 + 1e-6


def _search(**overrides: object) -> LineSearchResult:
    param = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    arguments: dict[str, object] = {
        "params": [param],
        "full_step": torch.ones(3, dtype=torch.float64),
        "evaluate": lambda c: (torch.zeros(c.shape[0]), torch.zeros(c.shape[0])),
        "loss0": torch.tensor(1.0),
        "expected_improvement": torch.tensor(1.0),
        "kl_limit": 0.01,
    }
    arguments.update(overrides)
    return kl_line_search(**arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kl_limit": 0.0}, r"Invalid kl_limit: 0.0; expected a finite number > 0"),
        ({"kl_limit": -1.0}, r"Invalid kl_limit: -1.0"),
        ({"kl_limit": NAN}, r"Invalid kl_limit: nan"),
        ({"shrinking_factor": 0.0}, r"Invalid shrinking_factor: 0.0; expected a number in the open interval \(0, 1\)"),
        ({"shrinking_factor": 1.0}, r"Invalid shrinking_factor: 1.0"),
        ({"max_iter": 0}, r"Invalid max_iter: 0; expected an integer >= 1"),
        ({"accept_ratio": -0.1}, r"Invalid accept_ratio: -0.1; expected a finite number >= 0"),
        ({"full_step": torch.ones(4)}, r"Invalid full_step: got \(4,\); expected a 1-D tensor of length 3"),
        ({"full_step": torch.ones(3, 1)}, r"Invalid full_step: got \(3, 1\)"),
        ({"loss0": torch.ones(2)}, r"Invalid loss0: got \(2,\); expected a scalar tensor"),
        ({"expected_improvement": 1.0}, r"Invalid expected_improvement: got float; expected a scalar tensor"),
        ({"params": []}, r"Invalid params: got an empty sequence"),
        (
            {"evaluate": lambda c: (torch.zeros(2), torch.zeros(c.shape[0]))},
            r"Invalid evaluate: it returned losses of shape \(2,\) for 1 candidate\(s\)",
        ),
    ],
)
def test_validation(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _search(**overrides)

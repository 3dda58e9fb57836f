"""lbfgs_fixed: the exact minimiser of a quadratic, no host sync, masked rejections, bad arguments."""

from __future__ import annotations

import pytest
import torch

from trpo_lab.optim.lbfgs import lbfgs_fixed
from trpo_lab.testing import HostSyncCounter


def _least_squares(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(64, 6, generator=gen, dtype=torch.float64)
    noise = 0.1 * torch.randn(64, generator=gen, dtype=torch.float64)
    targets = features @ torch.randn(6, generator=gen, dtype=torch.float64) + noise
    weights = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    return features, targets, weights


def _closure(features: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor):  # type: ignore[no-untyped-def]
    def loss_and_grad() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            loss = ((features @ weights - targets) ** 2).mean()
            (grad,) = torch.autograd.grad(loss, [weights])
        return loss.detach(), grad

    return loss_and_grad


def test_reaches_the_least_squares_solution() -> None:
    features, targets, weights = _least_squares()
    result = lbfgs_fixed([weights], _closure(features, targets, weights), max_iter=30, history_size=10)
    exact = torch.linalg.lstsq(features, targets.unsqueeze(-1)).solution.squeeze(-1)
    torch.testing.assert_close(weights.detach(), exact, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(result.loss, ((features @ exact - targets) ** 2).mean())
    assert 0 < int(result.accepted) <= 30


def test_makes_no_host_sync() -> None:
    features, targets, weights = _least_squares(1)
    with HostSyncCounter() as counter:
        lbfgs_fixed([weights], _closure(features, targets, weights), max_iter=5, history_size=3)
    assert counter.count == 0 and not counter.host_data, counter.report()


def test_rejected_steps_are_undone() -> None:
    """A loss that is infinite beyond |w| > 0.5: every trial out there is rejected, the kept point stays finite."""
    weights = torch.zeros(1, dtype=torch.float64, requires_grad=True)

    def loss_and_grad() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            loss = (weights - 2.0).pow(2).sum()
            (grad,) = torch.autograd.grad(loss, [weights])
        out = torch.where(weights.detach().abs() > 0.5, torch.inf, loss.detach()).reshape(())
        return out, grad

    result = lbfgs_fixed([weights], loss_and_grad, max_iter=20)
    assert torch.isfinite(result.loss) and float(weights.detach().abs()) <= 0.5
    assert float(weights.detach()) > 0.25  # it still moved towards the minimum


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_iter": 0}, "Invalid max_iter: 0"),
        ({"history_size": 0}, "Invalid history_size: 0"),
        ({"armijo": 1.0}, r"Invalid armijo: 1.0; expected a number in \[0, 1\)"),
        ({"curvature_eps": -1.0}, "Invalid curvature_eps: -1.0"),
    ],
)
def test_bad_arguments(kwargs: dict[str, float], message: str) -> None:
    features, targets, weights = _least_squares()
    with pytest.raises(ValueError, match=message):
        lbfgs_fixed([weights], _closure(features, targets, weights), **kwargs)  # type: ignore[arg-type]

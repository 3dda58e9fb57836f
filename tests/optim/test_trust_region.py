from __future__ import annotations

import pytest
import torch

from trpo_lab.optim.trust_region import scale_to_kl_radius


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

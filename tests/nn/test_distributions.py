"""Action distributions against torch.distributions, and their noise-driven sampling."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import distributions as D

from trpo_lab.nn.distributions import (
    ActionDistribution,
    Categorical,
    DiagGaussian,
    MultiCategorical,
    make_distribution,
)


@pytest.mark.parametrize(
    "space",
    [
        gym.spaces.Dict({"a": gym.spaces.Discrete(2)}),
        gym.spaces.Tuple((gym.spaces.Discrete(2),)),
        gym.spaces.MultiBinary(3),
        gym.spaces.Box(-1, 1, (2, 2)),
        gym.spaces.Text(5),
        gym.spaces.Discrete(3, start=1),
    ],
)
def test_unsupported_action_spaces_raise(space: gym.Space) -> None:
    with pytest.raises(ValueError, match="Unsupported action space"):
        make_distribution(space)


def test_categorical_matches_torch_distributions() -> None:
    torch.manual_seed(0)
    old, new = torch.randn(6, 4), torch.randn(6, 4)
    actions = torch.randint(0, 4, (6,))
    dist = Categorical(4)
    ref_old, ref_new = D.Categorical(logits=old), D.Categorical(logits=new)
    torch.testing.assert_close(dist.log_prob(new, actions), ref_new.log_prob(actions))
    torch.testing.assert_close(dist.entropy(new), ref_new.entropy())
    torch.testing.assert_close(dist.kl(old, new), D.kl_divergence(ref_old, ref_new))


def test_gaussian_matches_torch_distributions() -> None:
    torch.manual_seed(0)
    mean0, mean1, log0, log1 = (torch.randn(5, 2) for _ in range(4))
    dist = DiagGaussian(2)
    actions = torch.randn(5, 2)
    ref0 = D.Independent(D.Normal(mean0, log0.exp()), 1)
    ref1 = D.Independent(D.Normal(mean1, log1.exp()), 1)
    p0, p1 = torch.cat([mean0, log0], -1), torch.cat([mean1, log1], -1)
    torch.testing.assert_close(dist.log_prob(p1, actions), ref1.log_prob(actions))
    torch.testing.assert_close(dist.entropy(p1), ref1.entropy())
    torch.testing.assert_close(dist.kl(p0, p1), D.kl_divergence(ref0, ref1))


def test_multicategorical_is_sum_of_independent_categoricals() -> None:
    torch.manual_seed(0)
    dist = MultiCategorical([2, 3])
    old, new = torch.randn(4, 5), torch.randn(4, 5)
    actions = torch.stack([torch.randint(0, 2, (4,)), torch.randint(0, 3, (4,))], -1)
    parts = [(slice(0, 2), 0), (slice(2, 5), 1)]
    lp = sum(D.Categorical(logits=new[:, s]).log_prob(actions[:, i]) for s, i in parts)
    kl = sum(D.kl_divergence(D.Categorical(logits=old[:, s]), D.Categorical(logits=new[:, s])) for s, _ in parts)
    torch.testing.assert_close(dist.log_prob(new, actions), lp)
    torch.testing.assert_close(dist.kl(old, new), kl)
    sample = dist.sample(new, torch.Generator().manual_seed(0))
    assert sample.shape == (4, 2) and (sample[:, 0] < 2).all() and (sample[:, 1] < 3).all()


DISTRIBUTIONS = [Categorical(3), MultiCategorical([2, 4]), DiagGaussian(2)]


@pytest.mark.parametrize("dist", DISTRIBUTIONS, ids=lambda d: type(d).__name__)
def test_sample_from_noise_returns_the_log_prob_of_its_actions(dist: ActionDistribution) -> None:
    params = torch.randn(7, dist.param_dim, generator=torch.Generator().manual_seed(0))
    noise = dist.draw_noise((7,), torch.Generator().manual_seed(1))
    assert noise.shape == (7, dist.noise_dim) and noise.dtype == torch.float32
    actions, log_probs = dist.sample_from_noise(params, noise)
    torch.testing.assert_close(log_probs, dist.log_prob(params, actions), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dist", DISTRIBUTIONS, ids=lambda d: type(d).__name__)
def test_numpy_sampling_formula_equals_the_torch_one(dist: ActionDistribution) -> None:
    params = torch.randn(50, dist.param_dim, generator=torch.Generator().manual_seed(0))
    noise = dist.draw_noise((50,), torch.Generator().manual_seed(1))
    actions, log_probs = dist.sample_from_noise(params, noise)
    actions_np, log_probs_np = dist.sample_from_noise_numpy(params.numpy().copy(), noise.numpy())
    if isinstance(dist, DiagGaussian):
        np.testing.assert_allclose(actions_np, actions.numpy(), rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_array_equal(actions_np, actions.numpy())
    np.testing.assert_allclose(log_probs_np, log_probs.numpy(), rtol=1e-5, atol=1e-5)
    assert log_probs_np.dtype == np.float32


@pytest.mark.parametrize("dist", DISTRIBUTIONS, ids=lambda d: type(d).__name__)
def test_sample_is_draw_noise_then_sample_from_noise(dist: ActionDistribution) -> None:
    params = torch.randn(5, dist.param_dim)
    sampled = dist.sample(params, torch.Generator().manual_seed(3))
    expected, _ = dist.sample_from_noise(params, dist.draw_noise((5,), torch.Generator().manual_seed(3)))
    assert torch.equal(sampled, expected)


def test_gumbel_max_sampling_frequencies() -> None:
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]])).expand(20000, 3)
    samples = Categorical(3).sample(logits, torch.Generator().manual_seed(0))
    freq = torch.bincount(samples, minlength=3).float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.2, 0.5, 0.3]), atol=0.015, rtol=0)


def test_gaussian_sampling_moments() -> None:
    params = torch.tensor([[0.5, -2.0, -1.0, -1.0]]).expand(50_000, 4)
    actions = DiagGaussian(2).sample(params, torch.Generator().manual_seed(0))
    torch.testing.assert_close(actions.mean(0), torch.tensor([0.5, -2.0]), atol=0.01, rtol=0)
    torch.testing.assert_close(actions.std(0), torch.full((2,), float(np.exp(-1.0))), rtol=0.02, atol=0)


def test_noise_is_drawn_on_the_generators_device_and_follows_the_parameters() -> None:
    """A CPU generator gives the same actions for parameters on any device (here: float64)."""
    dist = DiagGaussian(2)
    params = torch.randn(4, 4)
    a32 = dist.sample(params, torch.Generator().manual_seed(0))
    a64 = dist.sample(params.double(), torch.Generator().manual_seed(0))
    torch.testing.assert_close(a64.float(), a32)


def test_gaussian_numpy_sampler_with_state_independent_log_std_equals_the_torch_formula() -> None:
    dist = DiagGaussian(3)
    means, log_std = torch.randn(6, 3), torch.randn(3)
    noise = dist.draw_noise((6,), torch.Generator().manual_seed(2))
    actions, log_probs = dist.sample_from_noise(torch.cat([means, log_std.expand(6, 3)], -1), noise)
    actions_np, log_probs_np = dist.numpy_sampler(log_std.numpy())(means.numpy(), noise.numpy())
    np.testing.assert_allclose(actions_np, actions.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(log_probs_np, log_probs.numpy(), rtol=1e-5, atol=1e-5)
    assert log_probs_np.dtype == np.float32


@pytest.mark.parametrize("dist", [Categorical(5), DiagGaussian(3)], ids=["categorical", "gaussian"])
def test_log_prob_entropy_by_hand_and_its_vjp_equal_autograds(dist: ActionDistribution) -> None:
    """PPO's written-out derivatives of log π(a) and H[π] with respect to the distribution's
    parameters (a Gaussian's log std away from 0, per-row cotangents of both terms)."""
    gen = torch.Generator().manual_seed(4)
    params = torch.randn(23, dist.param_dim, generator=gen, dtype=torch.float64)
    actions = dist.sample(params, gen)
    grad_log_probs = torch.randn(23, generator=gen, dtype=torch.float64)
    grad_entropy = torch.randn(23, generator=gen, dtype=torch.float64)
    written = dist.log_prob_entropy_by_hand(params, actions)
    assert written is not None
    log_probs, entropy, vjp = written
    leaf = params.clone().requires_grad_()
    expected_log_probs, expected_entropy = dist.log_prob(leaf, actions), dist.entropy(leaf)
    torch.testing.assert_close(log_probs, expected_log_probs.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(entropy, expected_entropy.detach(), rtol=1e-12, atol=1e-12)
    (expected,) = torch.autograd.grad(
        (expected_log_probs * grad_log_probs).sum() + (expected_entropy * grad_entropy).sum(), leaf
    )
    ours = vjp(grad_log_probs, grad_entropy)
    assert ours.shape == params.shape and not ours.requires_grad
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


def test_log_prob_entropy_by_hand_is_left_to_autograd_for_multicategoricals() -> None:
    dist = MultiCategorical([2, 3])
    assert dist.log_prob_entropy_by_hand(torch.zeros(4, 5), torch.zeros(4, 2)) is None

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import distributions as D

from trpo_lab.policies import ActorCritic, Categorical, DiagGaussian, MultiCategorical, make_distribution

BOX_OBS = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)


@pytest.mark.parametrize(
    "space",
    [
        gym.spaces.Dict({"a": gym.spaces.Discrete(2)}),
        gym.spaces.Tuple((gym.spaces.Discrete(2),)),
        gym.spaces.MultiBinary(3),
        gym.spaces.Box(-1, 1, (2, 2)),
        gym.spaces.Text(5),
    ],
)
def test_unsupported_action_spaces_raise(space: gym.Space) -> None:
    with pytest.raises(ValueError, match="Unsupported action space"):
        make_distribution(space)


def test_unsupported_observation_space_raises() -> None:
    with pytest.raises(ValueError, match="Unsupported observation space"):
        ActorCritic(gym.spaces.Dict({"a": BOX_OBS}), gym.spaces.Discrete(2))


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


def test_categorical_sampling_frequencies() -> None:
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]])).expand(20000, 3)
    samples = Categorical(3).sample(logits, torch.Generator().manual_seed(0))
    freq = torch.bincount(samples, minlength=3).float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.2, 0.5, 0.3]), atol=0.015, rtol=0)


@pytest.mark.parametrize(
    "action_space",
    [gym.spaces.Discrete(3), gym.spaces.Box(-1, 1, (2,), np.float32), gym.spaces.MultiDiscrete([2, 4])],
)
def test_actor_critic_parameter_groups_and_shapes(action_space: gym.Space) -> None:
    policy = ActorCritic(BOX_OBS, action_space, net_arch=dict(pi=[8], vf=[16, 16]))
    actor, critic = policy.actor_parameters(), policy.critic_parameters()
    ids = {id(p) for p in actor} | {id(p) for p in critic}
    assert len(ids) == len(actor) + len(critic) == len(list(policy.parameters()))
    obs = torch.randn(5, 3)
    actions, log_probs, values = policy.act(obs, torch.Generator().manual_seed(0))
    assert actions.shape[0] == log_probs.shape[0] == values.shape[0] == 5
    flat = torch.nn.utils.parameters_to_vector(actor)
    torch.testing.assert_close(policy.dist_params_from_flat(flat, obs), policy.dist_params(obs))


def test_orthogonal_init_and_activation_options() -> None:
    policy = ActorCritic(BOX_OBS, gym.spaces.Discrete(2), activation_fn="relu")
    assert isinstance(policy.actor[1], torch.nn.ReLU)
    w = policy.actor[0].weight.detach()
    torch.testing.assert_close(w.T @ w, 2.0 * torch.eye(3), atol=1e-5, rtol=0)  # gain sqrt(2): orthogonal columns
    with pytest.raises(ValueError, match="activation_fn"):
        ActorCritic(BOX_OBS, gym.spaces.Discrete(2), activation_fn="swish2")
    with pytest.raises(ValueError, match="net_arch"):
        ActorCritic(BOX_OBS, gym.spaces.Discrete(2), net_arch=[0])


def test_discrete_observations_are_one_hot() -> None:
    policy = ActorCritic(gym.spaces.Discrete(5), gym.spaces.Discrete(2))
    x = policy.preprocess(torch.tensor([0, 4]))
    torch.testing.assert_close(x, torch.eye(5)[[0, 4]])


@pytest.mark.parametrize(
    "action_space",
    [gym.spaces.Discrete(3), gym.spaces.Box(-1, 1, (2,), np.float32), gym.spaces.MultiDiscrete([2, 4])],
)
def test_fused_rollout_forward_equals_separate_networks(action_space: gym.Space) -> None:
    policy = ActorCritic(BOX_OBS, action_space, activation_fn="relu")
    fused = policy.fused()
    obs = torch.randn(9, 3)
    params, values = fused(obs)
    torch.testing.assert_close(params, policy.dist_params(obs))
    torch.testing.assert_close(values, policy.value(obs))
    for a, b in zip(fused.act(obs, torch.Generator().manual_seed(1)), policy.act(obs, torch.Generator().manual_seed(1))):
        torch.testing.assert_close(a, b)


def test_fused_view_falls_back_when_depths_differ() -> None:
    policy = ActorCritic(BOX_OBS, gym.spaces.Discrete(2), net_arch=dict(pi=[8], vf=[8, 8]))
    assert policy.fused() is policy


def test_fused_view_without_hidden_layers() -> None:
    policy = ActorCritic(BOX_OBS, gym.spaces.Discrete(2), net_arch=[])
    obs = torch.randn(4, 3)
    params, values = policy.fused()(obs)
    torch.testing.assert_close(params, policy.dist_params(obs))
    torch.testing.assert_close(values, policy.value(obs))

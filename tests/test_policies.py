from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import distributions as D

from trpo_lab.policies import (
    ActorCritic,
    Categorical,
    DiagGaussian,
    MultiCategorical,
    NumpyRolloutPolicy,
    make_distribution,
)

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


# ---------------------------------------------------------------- numpy rollout policy


def _numpy_policy(policy: ActorCritic, n_envs: int, n_steps: int = 4, seed: int = 0) -> NumpyRolloutPolicy | None:
    return policy.numpy_policy(torch.Generator().manual_seed(seed), n_envs, n_steps)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("action_space", [gym.spaces.Discrete(3), gym.spaces.Box(-1, 1, (2,), np.float32)])
@pytest.mark.parametrize("net_arch", [[16, 16], [], {"pi": [8], "vf": [5]}])
def test_numpy_rollout_policy_matches_the_torch_pass(
    activation: str, action_space: gym.Space, net_arch: object
) -> None:
    """Values and the log-probabilities of the sampled actions equal torch's, to float32 rounding."""
    torch.manual_seed(0)
    policy = ActorCritic(BOX_OBS, action_space, net_arch=net_arch, activation_fn=activation, log_std_init=-0.3)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.3 * torch.randn_like(p))  # away from the init's zero biases and 0.01 head
    acting = _numpy_policy(policy, n_envs=9)
    assert acting is not None
    obs = np.random.default_rng(1).standard_normal((9, 3)).astype(np.float32)
    actions, log_probs, values = acting.act(obs)
    obs_t = torch.from_numpy(obs)
    with torch.no_grad():
        params = policy.dist_params(obs_t)
        expected_log_probs = policy.distribution.log_prob(params, torch.from_numpy(np.asarray(actions)))
        torch.testing.assert_close(torch.from_numpy(values.copy()), policy.value(obs_t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(np.asarray(log_probs)), expected_log_probs, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(acting.values(obs), values)
    assert actions.shape == ((9,) if isinstance(action_space, gym.spaces.Discrete) else (9, 2))
    assert actions.dtype == (np.int64 if isinstance(action_space, gym.spaces.Discrete) else np.float32)


def test_numpy_rollout_categorical_frequencies() -> None:
    """Gumbel-max sampling draws each action with its softmax probability."""
    policy = ActorCritic(BOX_OBS, gym.spaces.Discrete(4), net_arch=[])
    with torch.no_grad():
        policy.actor[0].weight.zero_()
        policy.actor[0].bias.copy_(torch.tensor([0.0, 1.0, -1.0, 0.5]))
    n = 20_000
    acting = _numpy_policy(policy, n_envs=n, n_steps=3)
    obs = np.zeros((n, 3), np.float32)
    counts = sum(np.bincount(acting.act(obs)[0], minlength=4) for _ in range(3))
    probs = torch.softmax(policy.actor[0].bias.detach(), -1).numpy()
    np.testing.assert_allclose(counts / (3 * n), probs, atol=0.01)


def test_numpy_rollout_gaussian_moments() -> None:
    policy = ActorCritic(BOX_OBS, gym.spaces.Box(-1, 1, (2,), np.float32), net_arch=[], log_std_init=-1.0)
    with torch.no_grad():
        policy.actor[0].weight.zero_()
        policy.actor[0].bias.copy_(torch.tensor([0.5, -2.0]))
    n = 50_000
    actions = _numpy_policy(policy, n_envs=n, n_steps=1).act(np.zeros((n, 3), np.float32))[0]
    np.testing.assert_allclose(actions.mean(0), [0.5, -2.0], atol=0.01)
    np.testing.assert_allclose(actions.std(0), [np.exp(-1.0)] * 2, rtol=0.02)


def test_numpy_rollout_noise_comes_from_the_torch_generator() -> None:
    """Same torch generator state, same actions; one draw of the generator per rollout, and
    the noise of a rollout longer than one refill continues instead of repeating."""
    policy = ActorCritic(BOX_OBS, gym.spaces.Box(-1, 1, (2,), np.float32), net_arch=[4])
    obs = np.ones((2, 3), np.float32)
    runs = []
    for _ in range(2):
        generator = torch.Generator().manual_seed(7)
        acting = policy.numpy_policy(generator, 2, 5)
        acting._CHUNK_ELEMENTS = 8  # refill every 2 steps
        runs.append(np.stack([acting.act(obs)[0] for _ in range(5)]))
        after = torch.randint(0, 2**62, (), generator=generator)
    np.testing.assert_array_equal(runs[0], runs[1])
    assert len({row.tobytes() for row in runs[0]}) == 5
    reference = torch.Generator().manual_seed(7)
    torch.randint(0, 2**62, (), generator=reference)
    assert after == torch.randint(0, 2**62, (), generator=reference)
    other = policy.numpy_policy(torch.Generator().manual_seed(8), 2, 5).act(obs)[0]
    assert not np.array_equal(other, runs[0][0])


@pytest.mark.parametrize(
    ("obs_space", "action_space", "kwargs"),
    [
        (gym.spaces.Discrete(5), gym.spaces.Discrete(2), {}),  # one-hot observations
        (BOX_OBS, gym.spaces.MultiDiscrete([2, 3]), {}),
        (BOX_OBS, gym.spaces.Discrete(2), {"activation_fn": "elu"}),
        (BOX_OBS, gym.spaces.Discrete(2), {"net_arch": {"pi": [8], "vf": [8, 8]}}),
    ],
)
def test_numpy_rollout_policy_declines_what_it_does_not_cover(
    obs_space: gym.Space, action_space: gym.Space, kwargs: dict
) -> None:
    policy = ActorCritic(obs_space, action_space, **kwargs)
    assert policy.numpy_policy(torch.Generator(), 2, 4) is None


def test_numpy_rollout_policy_declines_half_precision() -> None:
    policy = ActorCritic(BOX_OBS, gym.spaces.Discrete(2)).to(torch.bfloat16)
    assert policy.numpy_policy(torch.Generator(), 2, 4) is None


@pytest.mark.parametrize("action_space", [gym.spaces.Discrete(3), gym.spaces.Box(-1, 1, (2,), np.float32)])
def test_traced_forward_is_dist_params_and_value_with_each_linear_layer(action_space: gym.Space) -> None:
    policy = ActorCritic(BOX_OBS, action_space, net_arch={"pi": [8, 8], "vf": [5]})
    obs = torch.randn(6, 3)
    params, values, trace = policy.traced_forward(obs)
    assert torch.equal(params, policy.dist_params(obs))
    assert torch.equal(values, policy.value(obs))
    linears = [m for net in (policy.actor, policy.critic) for m in net if isinstance(m, torch.nn.Linear)]
    assert [layer for layer, _, _ in trace] == linears
    for layer, inputs, outputs in trace:
        assert torch.equal(layer(inputs), outputs)
    assert trace[0][1] is obs and trace[3][1] is obs  # both networks start from the observations

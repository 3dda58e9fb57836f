"""ActorCritic: the one definition of the networks, and every forward derived from it."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn

from trpo_lab.nn.policy import (
    ActorCritic,
    mlp_forward,
    mlp_forward_cached,
    mlp_jvp,
    mlp_mse_gradients,
    validate_policy_kwargs,
)
from trpo_lab.optim import fisher_vector_product

BOX_OBS = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
ACTION_SPACES = [gym.spaces.Discrete(3), gym.spaces.Box(-1, 1, (2,), np.float32), gym.spaces.MultiDiscrete([2, 4])]


def _perturbed(policy: ActorCritic) -> ActorCritic:
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.3 * torch.randn_like(p, generator=None))  # away from the init's zero biases and 0.01 head
    return policy


def test_unsupported_observation_space_raises() -> None:
    with pytest.raises(ValueError, match="Unsupported observation space"):
        ActorCritic(gym.spaces.Dict({"a": gym.spaces.Dict({"b": BOX_OBS})}), gym.spaces.Discrete(2))


@pytest.mark.parametrize("action_space", ACTION_SPACES)
def test_actor_critic_parameter_groups_and_shapes(action_space: gym.Space) -> None:
    policy = ActorCritic(BOX_OBS, action_space, net_arch=dict(pi=[8], vf=[16, 16]))
    actor, critic = policy.actor_parameters(), policy.critic_parameters()
    ids = {id(p) for p in actor} | {id(p) for p in critic}
    assert len(ids) == len(actor) + len(critic) == len(list(policy.parameters()))
    obs = torch.randn(5, 3)
    actions, log_probs, values = policy.act(obs, torch.Generator().manual_seed(0))
    assert actions.shape[0] == log_probs.shape[0] == values.shape[0] == 5
    assert policy.actor_shapes() == [p.shape for p in actor]


def test_state_dict_names_are_the_checkpoint_format() -> None:
    """Checkpoints of earlier versions load: the parameters keep their names."""
    policy = ActorCritic(BOX_OBS, gym.spaces.Box(-1, 1, (2,), np.float32), net_arch=[8])
    assert list(policy.state_dict()) == ["log_std", "actor.0.weight", "actor.0.bias", "actor.2.weight", "actor.2.bias",
                                         "critic.0.weight", "critic.0.bias", "critic.2.weight", "critic.2.bias"]


@pytest.mark.parametrize("activation", ["tanh", "relu", "elu"])
@pytest.mark.parametrize("action_space", ACTION_SPACES)
def test_reference_forward_is_the_modules_forward(action_space: gym.Space, activation: str) -> None:
    """mlp_forward over the layers computes exactly what the nn.Sequential modules compute."""
    torch.manual_seed(0)
    policy = _perturbed(ActorCritic(BOX_OBS, action_space, net_arch={"pi": [8, 8], "vf": [5]}, activation_fn=activation))
    obs = torch.randn(6, 3)
    out = policy.actor(obs)
    expected = out if policy.log_std is None else torch.cat([out, policy.log_std.expand_as(out)], -1)
    assert torch.equal(policy.dist_params(obs), expected)
    assert torch.equal(policy.value(obs), policy.critic(obs).squeeze(-1))
    params, values = policy(obs)
    assert torch.equal(params, expected) and torch.equal(values, policy.value(obs))


@pytest.mark.parametrize("action_space", ACTION_SPACES)
def test_dist_params_from_flat_is_dist_params_and_vmaps(action_space: gym.Space) -> None:
    torch.manual_seed(0)
    policy = _perturbed(ActorCritic(BOX_OBS, action_space, net_arch=[8, 8]))
    obs = torch.randn(5, 3)
    flat = torch.nn.utils.parameters_to_vector(policy.actor_parameters())
    torch.testing.assert_close(policy.dist_params_from_flat(flat, obs), policy.dist_params(obs), rtol=0, atol=0)
    candidates = torch.stack([flat, 0.5 * flat, torch.zeros_like(flat)])
    batched = torch.func.vmap(policy.dist_params_from_flat, in_dims=(0, None))(candidates, obs)
    for k in range(3):
        torch.testing.assert_close(batched[k], policy.dist_params_from_flat(candidates[k], obs))


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


def test_mlp_forward_without_hidden_layers_is_one_affine_map() -> None:
    weight, bias = torch.randn(2, 3), torch.randn(2)
    x = torch.randn(4, 3)
    torch.testing.assert_close(mlp_forward([(weight, bias)], [], x), x @ weight.T + bias)


def test_orthogonal_init_and_activation_options() -> None:
    policy = ActorCritic(BOX_OBS, gym.spaces.Discrete(2), activation_fn="relu")
    assert all(isinstance(m, torch.nn.ReLU) for m in policy.actor if not isinstance(m, torch.nn.Linear))
    w = policy.actor_linears[0].weight.detach()
    torch.testing.assert_close(w.T @ w, 2.0 * torch.eye(3), atol=1e-5, rtol=0)  # gain sqrt(2): orthogonal columns
    with pytest.raises(ValueError, match="activation_fn"):
        ActorCritic(BOX_OBS, gym.spaces.Discrete(2), activation_fn="swish2")
    with pytest.raises(ValueError, match="net_arch"):
        ActorCritic(BOX_OBS, gym.spaces.Discrete(2), net_arch=[0])


def test_discrete_observations_are_one_hot() -> None:
    policy = ActorCritic(gym.spaces.Discrete(5), gym.spaces.Discrete(2))
    torch.testing.assert_close(policy.preprocess(torch.tensor([0, 4])), torch.eye(5)[[0, 4]])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"colour": 1}, "policy_kwargs key"),
        ({"log_std_init": float("nan")}, "log_std_init"),
        ({"log_std_init": True}, "log_std_init"),
        ({"ortho_init": 1}, "ortho_init"),
        ({"net_arch": {"pi": [4], "qf": [4]}}, "net_arch key"),
        ({"activation_fn": 3}, "activation_fn"),
    ],
)
def test_validate_policy_kwargs_names_the_bad_key(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate_policy_kwargs(kwargs)


# ---------------------------------------------------------------------- image and Dict observations

IMAGE_OBS = gym.spaces.Box(0, 255, (1, 36, 36), np.uint8)
SMALL_CNN = {"features_extractor_kwargs": {"features_dim": 16}, "net_arch": [8]}


def _frames(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 36, 36), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_flat_policies_have_no_extractor_parameters_and_keep_their_seeded_init() -> None:
    torch.manual_seed(3)
    default = ActorCritic(BOX_OBS, gym.spaces.Discrete(2))
    torch.manual_seed(3)
    explicit = ActorCritic(BOX_OBS, gym.spaces.Discrete(2), features_extractor="mlp", share_features_extractor=True)
    assert default.state_dict().keys() == explicit.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), explicit.state_dict().values()))
    assert default.flat_features and not explicit.share_features_extractor and default.trunk_parameters() == []


@pytest.mark.parametrize("action_space", [gym.spaces.Discrete(3), gym.spaces.Box(-1, 1, (2,), np.float32)])
def test_image_policy_separate_extractors_in_each_group_and_flat_forward(action_space: gym.Space) -> None:
    torch.manual_seed(0)
    policy = _perturbed(ActorCritic(IMAGE_OBS, action_space, **SMALL_CNN))
    assert policy.pi_features_extractor is not None and policy.vf_features_extractor is not None
    actor_ids = {id(p) for p in policy.actor_parameters()}
    assert {id(p) for p in policy.pi_features_extractor.parameters()} <= actor_ids
    assert {id(p) for p in policy.vf_features_extractor.parameters()} <= {id(p) for p in policy.critic_parameters()}
    assert len(actor_ids) + len(policy.critic_parameters()) == len(list(policy.parameters()))
    obs = policy.preprocess(_frames(4))
    assert obs.dtype == torch.uint8  # the networks scale the frames, the batch stays uint8
    flat = torch.nn.utils.parameters_to_vector(policy.actor_parameters())
    torch.testing.assert_close(policy.dist_params_from_flat(flat, obs), policy.dist_params(obs), rtol=0, atol=0)
    batched = torch.func.vmap(policy.dist_params_from_flat, in_dims=(0, None))(torch.stack([flat, 0.5 * flat]), obs)
    torch.testing.assert_close(batched[1], policy.dist_params_from_flat(0.5 * flat, obs))


@pytest.mark.parametrize("share", [False, True])
def test_image_traced_forward_records_every_conv_and_linear_layer(share: bool) -> None:
    policy = ActorCritic(IMAGE_OBS, gym.spaces.Discrete(3), share_features_extractor=share, **SMALL_CNN)
    obs = _frames(3)
    params, values, trace = policy.traced_forward(obs)
    reference_params, reference_values = policy.dist_params_and_value(obs)
    torch.testing.assert_close(params, reference_params, rtol=0, atol=0)
    torch.testing.assert_close(values, reference_values, rtol=0, atol=0)
    torch.testing.assert_close(params, policy.dist_params(obs), rtol=0, atol=0)
    layers = [m for m in policy.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert sorted(id(layer) for layer, _, _ in trace) == sorted(id(m) for m in layers)
    assert len(layers) == (4 if share else 8) + 4
    for layer, inputs, outputs in trace:
        torch.testing.assert_close(layer(inputs), outputs, rtol=0, atol=0)
    assert policy.trunk_parameters() == (list(policy.features_extractor.parameters()) if share else [])


def test_dict_policy_reads_every_key() -> None:
    space = gym.spaces.Dict({"image": IMAGE_OBS, "x": gym.spaces.Box(-1, 1, (2,), np.float32)})
    policy = ActorCritic(space, gym.spaces.Discrete(2), features_extractor_kwargs={"cnn_output_dim": 8}, net_arch=[4])
    obs = {"image": _frames(5), "x": torch.randn(5, 2)}
    params, values = policy(obs)
    assert params.shape == (5, 2) and values.shape == (5,)
    changed = {"image": obs["image"], "x": obs["x"] + 1.0}
    assert not torch.equal(policy(changed)[1], values)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"features_extractor": "vit"},
         r"Invalid policy_kwargs.features_extractor: 'vit'; expected one of \['auto', 'mlp', 'nature_cnn'\]"),
        ({"features_extractor_kwargs": [1]}, r"Invalid policy_kwargs.features_extractor_kwargs: \[1\]; expected a dict"),
        ({"share_features_extractor": "yes"}, r"Invalid policy_kwargs.share_features_extractor: 'yes'; expected true or false"),
        ({"normalize_images": 1}, r"Invalid policy_kwargs.normalize_images: 1; expected true or false"),
    ],
)
def test_extractor_policy_kwargs_are_validated(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate_policy_kwargs(kwargs)


def test_extractor_kwargs_the_extractor_does_not_take_are_named() -> None:
    with pytest.raises(ValueError, match=r"Invalid policy_kwargs.features_extractor_kwargs \{'width': 3\}: .*'width'"):
        ActorCritic(IMAGE_OBS, gym.spaces.Discrete(2), features_extractor_kwargs={"width": 3})


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hidden", [[], [7], [64, 64], [5, 9, 3]])
def test_mlp_mse_gradients_by_hand_equal_autograds(activation: str, dtype: torch.dtype, hidden: list[int]) -> None:
    """The critic fit's hand-written chain rule (every layer count, both activations) gives
    autograd's loss and gradients of mean((V(x) − y)²), ReLU's kink at 0 included."""
    torch.manual_seed(0)
    policy = ActorCritic(
        gym.spaces.Box(-1, 1, (6,)), gym.spaces.Discrete(2), net_arch={"pi": [4], "vf": hidden},
        activation_fn=activation,
    ).to(dtype)
    x = torch.randn(33, 6, dtype=dtype)
    x[0] = 0.0  # with zero biases, ReLU inputs exactly at the kink
    targets = torch.randn(33, dtype=dtype)
    loss = nn.functional.mse_loss(policy.value(x), targets)
    expected = torch.autograd.grad(loss, policy.critic_parameters())
    result = mlp_mse_gradients(policy.critic_layers(), policy.critic_activations, x, targets)
    assert result is not None
    ours, grads = result
    tolerance = {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-7}
    torch.testing.assert_close(ours, loss.detach(), **tolerance)
    assert len(grads) == len(expected)
    for mine, theirs in zip(grads, expected, strict=True):
        assert mine.shape == theirs.shape and mine.dtype == dtype and not mine.requires_grad
        torch.testing.assert_close(mine, theirs, **tolerance)


def test_mlp_mse_gradients_leave_other_activations_and_outputs_to_autograd() -> None:
    layers = [(torch.randn(3, 2), torch.randn(3)), (torch.randn(1, 3), torch.randn(1))]
    x, y = torch.randn(4, 2), torch.randn(4)
    assert mlp_mse_gradients(layers, [nn.functional.elu], x, y) is None
    assert mlp_mse_gradients([(torch.randn(2, 2), torch.randn(2))], [], x, y) is None  # two outputs
    assert mlp_mse_gradients(layers, [torch.tanh], x, y) is not None


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("hidden", [[], [7], [5, 9, 3]])
def test_mlp_jvp_by_hand_equals_autograds(activation: str, hidden: list[int]) -> None:
    """Forward-mode through the MLP, written out, is torch.func.jvp of mlp_forward."""
    torch.manual_seed(1)
    policy = _perturbed(ActorCritic(gym.spaces.Box(-1, 1, (6,)), gym.spaces.Box(-1, 1, (2,)),
                                    net_arch={"pi": hidden, "vf": [4]}, activation_fn=activation).double())
    x = torch.randn(17, 6, dtype=torch.float64)
    x[0] = 0.0
    layers, activations = policy.actor_layers(), policy.actor_activations
    flat = [t.detach() for layer in layers for t in layer]
    tangents = [torch.randn_like(t) for t in flat]

    def forward(*tensors: torch.Tensor) -> torch.Tensor:
        return mlp_forward(list(zip(tensors[::2], tensors[1::2], strict=True)), activations, x)

    _, expected = torch.func.jvp(forward, tuple(flat), tuple(tangents))
    forward_cached = mlp_forward_cached(layers, activations, x)
    assert forward_cached is not None
    ours = mlp_jvp(layers, activations, forward_cached[1], list(zip(tangents[::2], tangents[1::2], strict=True)))
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("action_space", [gym.spaces.Box(-1, 1, (3,), np.float32), gym.spaces.Discrete(4)],
                         ids=["gaussian", "categorical"])
@pytest.mark.parametrize("hidden", [[], [8], [16, 16]])
def test_actor_fisher_product_by_hand_equals_autograds(
    activation: str, dtype: torch.dtype, action_space: gym.Space, hidden: list[int]
) -> None:
    """F v by hand equals the double backward of the mean KL at θ_old, for several v, with a
    log_std away from 0 (its Fisher block and the mean's precision both depend on it)."""
    torch.manual_seed(2)
    policy = _perturbed(ActorCritic(gym.spaces.Box(-1, 1, (5,)), action_space,
                                    net_arch={"pi": hidden, "vf": [4]}, activation_fn=activation)).to(dtype)
    obs = torch.randn(41, 5, dtype=dtype)
    obs[0] = 0.0
    params = policy.actor_parameters()
    old = policy.dist_params(obs).detach()
    autograd = fisher_vector_product(lambda: policy.distribution.kl(old, policy.dist_params(obs)).mean(), params,
                                     damping=0.0)
    by_hand = policy.actor_fisher_product(obs)
    assert by_hand is not None
    size = sum(p.numel() for p in params)
    tolerance = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-6}
    for _ in range(3):
        vector = torch.randn(size, dtype=dtype)
        expected = autograd(vector)
        ours = by_hand(vector)
        assert ours.shape == (size,) and ours.dtype == dtype and not ours.requires_grad
        torch.testing.assert_close(ours, expected, **tolerance)
        assert vector @ ours > 0  # a Fisher is positive semi-definite; these v are not in its null space


def test_actor_fisher_product_leaves_other_actors_to_autograd() -> None:
    box = gym.spaces.Box(-1, 1, (5,))
    assert ActorCritic(box, gym.spaces.Discrete(2), activation_fn="elu").actor_fisher_product(torch.randn(3, 5)) is None
    assert ActorCritic(box, gym.spaces.MultiDiscrete([2, 3])).actor_fisher_product(torch.randn(3, 5)) is None
    image = gym.spaces.Box(0, 255, (40, 40, 1), np.uint8)
    assert ActorCritic(image, gym.spaces.Discrete(2)).actor_fisher_product(torch.zeros(2, 40, 40, 1)) is None
    assert ActorCritic(box, gym.spaces.Discrete(2)).actor_fisher_product(torch.randn(3, 5)) is not None


def test_forward_by_hand_is_left_to_autograd_beyond_plain_mlps_on_flat_features() -> None:
    """PPO's graph-free forward needs tanh or ReLU MLPs on flat features; elsewhere it says so
    (None) and the minibatch step takes autograd."""
    box = gym.spaces.Box(-1, 1, (5,))
    assert ActorCritic(box, gym.spaces.Discrete(2), activation_fn="elu").dist_params_and_value_by_hand(torch.randn(3, 5)) is None
    image = gym.spaces.Box(0, 255, (40, 40, 1), np.uint8)
    assert ActorCritic(image, gym.spaces.Discrete(2)).dist_params_and_value_by_hand(torch.zeros(2, 40, 40, 1)) is None
    policy = ActorCritic(box, gym.spaces.Box(-1, 1, (2,)), log_std_init=-0.5)
    obs = torch.randn(3, 5)
    forward = policy.dist_params_and_value_by_hand(obs)
    assert forward is not None
    params, values, _ = forward
    expected_params, expected_values = policy.dist_params_and_value(obs)
    assert torch.equal(params, expected_params.detach()) and torch.equal(values, expected_values.detach())
    assert not params.requires_grad and not values.requires_grad

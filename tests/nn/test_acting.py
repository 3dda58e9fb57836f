"""The rollout's acting paths equal the reference definition: same noise, same actions."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

from trpo_lab.nn.acting import NoiseStream, NumpyActor, TorchActor, make_actor, numpy_support
from trpo_lab.nn.policy import ActorCritic

BOX_OBS = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
ACTION_SPACES = [gym.spaces.Discrete(3), gym.spaces.Box(-1, 1, (2,), np.float32), gym.spaces.MultiDiscrete([2, 4])]
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def _policy(obs_space: gym.Space, action_space: gym.Space, **kwargs: Any) -> ActorCritic:
    torch.manual_seed(0)
    policy = ActorCritic(obs_space, action_space, log_std_init=-0.3, **kwargs)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.3 * torch.randn_like(p))  # away from the init's zero biases and 0.01 head
    return policy


def _noise(policy: ActorCritic, n_envs: int, n_steps: int = 4, seed: int = 5) -> NoiseStream:
    return NoiseStream(policy.distribution, torch.Generator().manual_seed(seed), n_envs, n_steps)


def _reference(policy: ActorCritic, obs: np.ndarray, noise: torch.Tensor) -> tuple[np.ndarray, ...]:
    """Actions, log-probabilities and values by the reference methods, from the same noise."""
    with torch.no_grad():
        x = policy.preprocess(torch.as_tensor(obs))
        actions, log_probs = policy.distribution.sample_from_noise(policy.dist_params(x), noise)
        return actions.numpy(), log_probs.numpy(), policy.value(x).numpy()


def _host(x: Any) -> np.ndarray:
    return np.asarray(x.cpu()) if isinstance(x, torch.Tensor) else np.asarray(x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("action_space", ACTION_SPACES, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("net_arch", [[16, 16], [], {"pi": [8], "vf": [5, 5]}], ids=["stacked", "linear", "unstacked"])
def test_acting_paths_equal_the_reference(
    action_space: gym.Space, activation: str, backend: str, net_arch: Any, device: str
) -> None:
    """Same actions for the same noise; log-probabilities and values to float32 rounding."""
    if backend == "numpy" and device != "cpu":
        pytest.skip("numpy acts on the CPU")
    policy = _policy(BOX_OBS, action_space, net_arch=net_arch, activation_fn=activation)
    obs = np.random.default_rng(1).standard_normal((3, 9, 3)).astype(np.float32)
    reference_noise = _noise(policy, 9)
    policy.to(device)
    actor = policy.rollout_actor(_noise(policy, 9), backend)
    assert isinstance(actor, NumpyActor if backend == "numpy" else TorchActor)
    policy.cpu()
    for step in range(3):  # one noise row per step
        actions, log_probs, values = (_host(x) for x in actor.act(obs[step]))
        ref_actions, ref_log_probs, ref_values = _reference(policy, obs[step], reference_noise.next_tensor(torch.device("cpu")))
        if isinstance(action_space, gym.spaces.Box):
            np.testing.assert_allclose(actions, ref_actions, rtol=1e-5, atol=1e-5)
        else:
            np.testing.assert_array_equal(actions, ref_actions)
        np.testing.assert_allclose(log_probs, ref_log_probs, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(values, ref_values, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(_host(actor.values(obs[step])), values)
    assert actions.shape == (9, *action_space.shape)
    assert actions.dtype == (np.float32 if isinstance(action_space, gym.spaces.Box) else np.int64)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_one_hot_observations_act_like_the_reference(backend: str) -> None:
    policy = _policy(gym.spaces.Discrete(5), gym.spaces.Discrete(2))
    obs = np.array([0, 4, 2, 2])
    actions, log_probs, values = (_host(x) for x in policy.rollout_actor(_noise(policy, 4), backend).act(obs))
    ref = _reference(policy, obs, _noise(policy, 4).next_tensor(torch.device("cpu")))
    np.testing.assert_array_equal(actions, ref[0])
    np.testing.assert_allclose(log_probs, ref[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(values, ref[2], rtol=1e-5, atol=1e-5)


def test_the_actor_is_a_snapshot_of_the_weights() -> None:
    """An update after the actor is built does not change it (build one per rollout)."""
    policy = _policy(BOX_OBS, gym.spaces.Discrete(3))
    obs = np.ones((2, 3), np.float32)
    for backend in ("numpy", "torch"):
        actor = policy.rollout_actor(_noise(policy, 2), backend)
        before = _host(actor.values(obs))
        with torch.no_grad():
            policy.critic_linears[-1].bias.add_(1.0)
        np.testing.assert_array_equal(_host(actor.values(obs)), before)


def test_noise_stream_is_one_stream_of_the_generator() -> None:
    """Same generator state, same noise; a rollout longer than one chunk continues the
    stream instead of repeating it; another seed gives other noise."""
    policy = _policy(BOX_OBS, gym.spaces.Box(-1, 1, (2,), np.float32))
    runs = []
    for _ in range(2):
        stream = _noise(policy, 2, n_steps=5, seed=7)
        stream.chunk_steps = 2  # refill every 2 steps
        runs.append(np.stack([stream.next_array().copy() for _ in range(5)]))
    np.testing.assert_array_equal(runs[0], runs[1])
    assert len({row.tobytes() for row in runs[0]}) == 5
    assert not np.array_equal(_noise(policy, 2, n_steps=5, seed=8).next_array(), runs[0][0])
    arrays, tensors = _noise(policy, 2, n_steps=5), _noise(policy, 2, n_steps=5)
    for _ in range(5):
        np.testing.assert_array_equal(arrays.next_array(), tensors.next_tensor(torch.device("cpu")).numpy())


def test_noise_stream_refuses_a_device_generator() -> None:
    policy = _policy(BOX_OBS, gym.spaces.Discrete(2))
    with pytest.raises(ValueError, match="Invalid generator"):
        NoiseStream(policy.distribution, np.random.default_rng(0), 2, 4)  # type: ignore[arg-type]
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="CPU torch.Generator"):
            NoiseStream(policy.distribution, torch.Generator(device="cuda"), 2, 4)
    with pytest.raises(ValueError, match="Invalid n_envs"):
        NoiseStream(policy.distribution, torch.Generator(), 0, 4)


@pytest.mark.parametrize("seed", [0, 1])
def test_numpy_and_torch_paths_draw_the_same_actions_for_a_seed(seed: int) -> None:
    """The point of one noise stream: the acting path (activation, device) does not change the actions."""
    policy = _policy(BOX_OBS, gym.spaces.Discrete(4))
    obs = np.random.default_rng(seed).standard_normal((50, 3)).astype(np.float32)
    numpy_actor = policy.rollout_actor(_noise(policy, 50, seed=seed), "numpy")
    torch_actor = policy.rollout_actor(_noise(policy, 50, seed=seed), "torch")
    np.testing.assert_array_equal(_host(numpy_actor.act(obs)[0]), _host(torch_actor.act(obs)[0]))


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"activation_fn": "elu"}, "activation"),
        ({"activation_fn": "gelu"}, "activation"),
    ],
)
def test_numpy_declines_what_it_does_not_cover(kwargs: dict, reason: str) -> None:
    policy = ActorCritic(BOX_OBS, gym.spaces.Discrete(2), **kwargs)
    assert reason in str(numpy_support(policy))
    assert isinstance(make_actor(policy, _noise(policy, 2)), TorchActor)
    with pytest.raises(ValueError, match="Invalid backend: 'numpy'"):
        make_actor(policy, _noise(policy, 2), "numpy")


def test_numpy_declines_half_precision() -> None:
    policy = ActorCritic(BOX_OBS, gym.spaces.Discrete(2)).to(torch.bfloat16)
    assert numpy_support(policy) is not None
    assert isinstance(make_actor(policy, _noise(policy, 2)), TorchActor)


def test_auto_picks_numpy_on_the_cpu_and_refuses_unknown_backends() -> None:
    policy = ActorCritic(BOX_OBS, gym.spaces.MultiDiscrete([2, 3]))
    assert isinstance(make_actor(policy, _noise(policy, 2)), NumpyActor)
    with pytest.raises(ValueError, match="Invalid backend: 'jax'"):
        make_actor(policy, _noise(policy, 2), "jax")

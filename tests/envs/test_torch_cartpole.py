"""TorchCartPole: the same dynamics as Gymnasium's CartPole-v1, Gymnasium's NEXT_STEP autoreset, tensors only."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from trpo_lab.envs.torch_cartpole import TorchCartPole
from trpo_lab.envs.torch_vec import TorchVectorEnv, is_torch_vector_env
from trpo_lab.testing import HostSyncCounter


def test_dynamics_equal_gymnasium_cartpole() -> None:
    reference = gym.make("CartPole-v1").unwrapped
    rng = np.random.default_rng(0)
    for episode in range(5):
        reference.reset(seed=episode)
        env = TorchCartPole(1)
        env.reset(seed=episode)
        start = np.asarray(reference.state, dtype=np.float32)
        env._state = torch.as_tensor(start).reshape(1, 4).clone()
        reference.state = start.astype(np.float64)
        for _ in range(200):
            action = int(rng.integers(2))
            obs_ref, reward_ref, terminated_ref, _, _ = reference.step(action)
            obs, reward, terminated, truncated, _ = env.step(torch.tensor([action]))
            np.testing.assert_allclose(obs[0].numpy(), obs_ref, rtol=1e-4, atol=1e-5)
            assert float(reward[0]) == reward_ref
            assert bool(terminated[0]) == terminated_ref and not bool(truncated[0])
            if terminated_ref:
                break
        else:
            pytest.fail("no episode terminated under random actions")


def test_next_step_autoreset_and_truncation() -> None:
    env = TorchCartPole(3, max_episode_steps=4)
    obs, _ = env.reset(seed=1)
    assert obs.shape == (3, 4) and obs.dtype == torch.float32 and float(obs.abs().max()) <= 0.05
    actions = torch.tensor([0, 1, 0])
    for _ in range(4):
        obs, rewards, terminated, truncated, info = env.step(actions)
        assert torch.equal(rewards, torch.ones(3))
    assert bool(truncated.all()) and not bool(terminated.any())
    assert torch.equal(info["episode_done"], torch.ones(3, dtype=torch.bool))
    assert torch.equal(info["episode_return"], torch.full((3,), 4.0))
    assert torch.equal(info["episode_length"], torch.full((3,), 4.0))
    obs, rewards, terminated, truncated, info = env.step(actions)  # the reset step: action ignored
    assert torch.equal(rewards, torch.zeros(3)) and not bool((terminated | truncated).any())
    assert float(obs.abs().max()) <= 0.05 and not bool(info["episode_done"].any())


def test_seeded_resets_repeat() -> None:
    a, b = TorchCartPole(8), TorchCartPole(8)
    assert torch.equal(a.reset(seed=3)[0], b.reset(seed=3)[0])
    assert not torch.equal(a.reset(seed=3)[0], a.reset(seed=4)[0])


def test_is_a_torch_vector_env_and_steps_without_host_sync() -> None:
    env = TorchCartPole(16)
    assert isinstance(env, TorchVectorEnv) and is_torch_vector_env(env)
    assert not is_torch_vector_env(gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1")]))
    env.reset(seed=0)
    actions = torch.zeros(16, dtype=torch.long)
    with HostSyncCounter() as counter:
        for _ in range(50):
            env.step(actions)
    assert counter.count == 0 and not counter.host_data, counter.report()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_envs": 0}, "Invalid num_envs: 0"),
        ({"num_envs": 2, "device": "tpu"}, "Invalid device: 'tpu'"),
        ({"num_envs": 2, "max_episode_steps": 0}, "Invalid max_episode_steps: 0"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TorchCartPole(**kwargs)  # type: ignore[arg-type]

"""The collector: what it stores, where it bootstraps, and one random stream whatever acts."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

from trpo_lab.agents.ppo import PPO
from trpo_lab.agents.trpo import TRPO
from trpo_lab.nn.acting import NumpyActor, TorchActor


class _Counter(gym.Env):  # type: ignore[type-arg]
    """obs = step index within the episode; reward 1; truncated by TimeLimit after 3 steps."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed: int | None = None, options: Any = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0], np.float32), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.t += 1
        return np.array([float(self.t)], np.float32), 1.0, False, False, {}


class _Terminating(_Counter):
    """Like _Counter, but the episode terminates (no bootstrap) at step 3."""

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        obs, reward, _, _, info = super().step(action)
        return obs, reward, self.t == 3, False, info


def test_rollout_bootstraps_truncation_with_final_observation() -> None:
    agent = TRPO(lambda: gym.wrappers.TimeLimit(_Counter(), 3), n_envs=2, seed=0, n_steps=8, gamma=0.9, gae_lambda=1.0)
    agent.collect_rollout()
    buf = agent.buffer
    # slots 0,1,2 are the first episode, slot 3 is the autoreset slot holding the final obs (3.0)
    assert buf.valid[:, 0].tolist() == [True, True, True, False, True, True, True, False]
    assert buf.truncated[2, 0] and not buf.terminated[2, 0]
    assert buf.observations[3, 0, 0] == 3.0
    with torch.no_grad():
        v = agent.policy.value(torch.tensor([[2.0], [3.0]]))
    torch.testing.assert_close(buf.advantages[2, 0], 1.0 + 0.9 * v[1] - v[0])
    assert agent.buffer.batch().size == 12


def test_rollout_never_bootstraps_a_termination() -> None:
    agent = TRPO(_Terminating, n_envs=1, seed=0, n_steps=8, gamma=0.9, gae_lambda=1.0)
    agent.collect_rollout()
    buf = agent.buffer
    assert buf.terminated[2, 0] and not buf.valid[3, 0]
    with torch.no_grad():
        v = agent.policy.value(torch.tensor([[2.0]]))
    torch.testing.assert_close(buf.advantages[2, 0], 1.0 - v[0])


def test_rollout_records_finished_episodes() -> None:
    agent = TRPO(lambda: gym.wrappers.TimeLimit(_Counter(), 3), n_envs=2, seed=0, n_steps=8)
    agent.collect_rollout()
    assert agent.num_episodes == 4  # two per env: steps 0-2 and 4-6
    assert list(agent.episode_returns) == [3.0] * 4 and list(agent.episode_lengths) == [3.0] * 4


def _rollout(env_id: str, backend: str, **kwargs: Any) -> tuple[PPO, torch.Tensor]:
    agent = PPO(env_id, n_envs=3, seed=0, n_steps=32, **kwargs)
    agent.collector.backend = backend
    agent.collect_rollout()
    agent.collect_rollout()  # the second rollout continues the first's environments and stream
    return agent, agent.generator.get_state()


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1", "FrozenLake-v1"])
def test_numpy_and_torch_acting_collect_the_same_rollout(env_id: str) -> None:
    """One random stream per seed: which path acts does not change the actions taken."""
    (numpy_agent, numpy_rng), (torch_agent, torch_rng) = (_rollout(env_id, b) for b in ("numpy", "torch"))
    a, b = numpy_agent.buffer, torch_agent.buffer
    assert torch.equal(numpy_rng, torch_rng)
    assert torch.equal(a.valid, b.valid)
    if env_id == "Pendulum-v1":
        torch.testing.assert_close(a.actions, b.actions, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(a.actions, b.actions)
    torch.testing.assert_close(a.observations, b.observations, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.log_probs, b.log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.advantages, b.advantages, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("activation", ["tanh", "elu"])
@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_rollout_stores_what_the_policy_computes(env_id: str, activation: str) -> None:
    """Each slot's log-probability and value are the reference policy's, so PPO's ratio starts
    at 1: through the numpy path (tanh) and the torch path (ELU has no numpy version)."""
    agent = PPO(env_id, n_envs=3, seed=0, n_steps=64, normalize_obs=True, policy_kwargs={"activation_fn": activation})
    agent.learn(192)  # one update, so the policy is no longer the initial one
    agent.collect_rollout()
    buffer, policy = agent.buffer, agent.policy
    valid = buffer.valid
    with torch.no_grad():
        log_probs = policy.distribution.log_prob(policy.dist_params(policy.preprocess(buffer.observations[valid])),
                                                 buffer.actions[valid])
        values = policy.value(policy.preprocess(buffer.observations.reshape(-1, *buffer.observations.shape[2:])))
    torch.testing.assert_close(buffer.log_probs[valid], log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(buffer.values.reshape(-1), values, rtol=1e-5, atol=1e-5)
    assert int(valid.sum()) > 0


@pytest.mark.parametrize(("activation", "kind"), [("tanh", NumpyActor), ("relu", NumpyActor), ("elu", TorchActor)])
def test_auto_acts_in_numpy_where_it_can(activation: str, kind: type) -> None:
    agent = PPO("CartPole-v1", n_envs=2, seed=0, n_steps=8, policy_kwargs={"activation_fn": activation})
    assert isinstance(agent.collector.actor(), kind)


def test_same_seed_same_rollout_and_the_generator_is_the_only_source() -> None:
    first, second = (_rollout("Pendulum-v1", "auto")[0] for _ in range(2))
    assert torch.equal(first.buffer.actions, second.buffer.actions)
    torch.manual_seed(123)
    np.random.seed(123)  # global generators play no part
    third = _rollout("Pendulum-v1", "auto")[0]
    assert torch.equal(first.buffer.actions, third.buffer.actions)

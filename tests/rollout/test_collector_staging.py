"""A numpy environment feeding a buffer on another device: one host-to-device copy per step.

The staged path (:class:`~trpo_lab.rollout.collector.StepStaging`) is what a GPU runs; it is
forced on here on the CPU, where it must store exactly what the direct path stores.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

from trpo_lab.agents.ppo import PPO
from trpo_lab.agents.trpo import TRPO
from trpo_lab.envs.visual import DictChoiceEnv, VisualChoiceEnv
from trpo_lab.rollout.buffer import RolloutBuffer
from trpo_lab.rollout.collector import RolloutCollector, StepStaging
from trpo_lab.testing import HostSyncCounter

ENVS: dict[str, Any] = {
    "CartPole-v1": "CartPole-v1",
    "Pendulum-v1": "Pendulum-v1",
    "visual": VisualChoiceEnv,
    "dict": DictChoiceEnv,
}


def _agent(env: str, staged: bool, n_steps: int = 16) -> PPO:
    agent = PPO(ENVS[env], n_envs=3, seed=0, n_steps=n_steps, normalize_obs=env == "Pendulum-v1")
    agent.collector = RolloutCollector(agent, backend="torch", staged=staged)
    return agent


def _fields(buffer: RolloutBuffer) -> dict[str, torch.Tensor]:
    obs = buffer.observations
    fields = {f"obs/{k}": v for k, v in obs.items()} if isinstance(obs, dict) else {"obs": obs}
    for name in ("actions", "log_probs", "values", "rewards", "terminated", "truncated", "valid", "advantages", "returns"):
        fields[name] = getattr(buffer, name)
    return fields


@pytest.mark.parametrize("env", list(ENVS))
def test_staged_rollout_stores_what_the_direct_one_stores(env: str) -> None:
    direct, staged = _agent(env, staged=False), _agent(env, staged=True)
    for _ in range(3):  # later rollouts start from the previous one's last observation
        direct.collect_rollout()
        staged.collect_rollout()
        for name, value in _fields(direct.buffer).items():
            assert torch.equal(value, _fields(staged.buffer)[name]), name
    assert list(direct.episode_returns) == list(staged.episode_returns)
    assert direct.num_timesteps == staged.num_timesteps
    np.testing.assert_array_equal(np.asarray(direct._autoreset), np.asarray(staged._autoreset))


def test_one_transfer_per_step_and_no_host_array_reaches_the_buffer() -> None:
    agent = _agent("Pendulum-v1", staged=True, n_steps=16)
    staging = agent.collector.staging
    assert staging is not None
    added: list[Any] = []
    original_add = agent.buffer.add

    def spy(*args: Any) -> None:
        added.extend(args)
        original_add(*args)

    agent.buffer.add = spy  # type: ignore[method-assign]
    agent.collect_rollout()
    assert staging.transfers == 16 + 1  # each step's, and the rollout's first observation
    assert not any(isinstance(a, np.ndarray) for a in added)


@pytest.mark.parametrize("env", ["Pendulum-v1", "dict"])
def test_no_host_value_enters_as_a_new_tensor_per_step(env: str) -> None:
    """On a GPU each ``lift_fresh`` is a pageable host-to-device copy. A rollout makes a fixed
    number of them (GAE's result on the host), however many steps it has."""
    counts = []
    for n_steps in (8, 32):
        agent = _agent(env, staged=True, n_steps=n_steps)
        agent.collect_rollout()  # first reset outside the count
        with HostSyncCounter(count_host_reads=False) as counter:
            agent.collect_rollout()
        counts.append(len(counter.host_data))
    assert counts[0] == counts[1], counts


def test_staging_is_the_default_for_a_buffer_off_the_cpu() -> None:
    env = gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1")] * 2)
    space = env.single_observation_space
    for device, expected in (("cpu", False), ("meta", True)):
        buffer = RolloutBuffer.for_spaces(space, env.single_action_space, 4, 2, device)
        agent = SimpleNamespace(env=env, buffer=buffer, action_space=env.single_action_space)
        collector = RolloutCollector(agent)  # type: ignore[arg-type]
        assert (collector.staging is not None) is expected
        if expected:
            assert collector.backend == "torch"
            assert collector.staging is not None and not collector.staging.pinned  # pinning is for CUDA


def test_staging_layout_packs_every_field_of_a_dict_space() -> None:
    space = gym.spaces.Dict({
        "image": gym.spaces.Box(0, 255, (8, 8, 1), np.uint8),
        "vector": gym.spaces.Box(-1, 1, (3,), np.float32),
        "index": gym.spaces.Discrete(5),
    })
    buffer = RolloutBuffer.for_spaces(space, gym.spaces.Discrete(2), 4, 2)
    staging = StepStaging(buffer)
    rng = np.random.default_rng(0)
    obs = {"image": rng.integers(0, 256, (2, 8, 8, 1), dtype=np.uint8),
           "vector": rng.standard_normal((2, 3)).astype(np.float32), "index": np.array([4, 1])}
    rewards, flags = np.array([1.5, -2.0]), [np.array([True, False]), np.array([False, True]), np.array([True, True])]
    dev_obs, step = staging.transfer(obs, rewards, *flags)
    for key, value in obs.items():
        assert dev_obs[key].dtype == buffer.observations[key].dtype  # type: ignore[index]
        np.testing.assert_array_equal(dev_obs[key].numpy(), value)
    np.testing.assert_array_equal(step["rewards"].numpy(), rewards.astype(np.float32))
    for name, value in zip(("terminated", "truncated", "valid"), flags):
        np.testing.assert_array_equal(step[name].numpy(), value)
    assert staging.nbytes % 64 == 0


def test_staged_is_refused_for_a_torch_env() -> None:
    from trpo_lab.envs.torch_cartpole import TorchCartPole

    agent = TRPO(TorchCartPole(4), n_steps=4, seed=0)
    with pytest.raises(ValueError, match="staged=True applies to numpy environments"):
        RolloutCollector(agent, staged=True)

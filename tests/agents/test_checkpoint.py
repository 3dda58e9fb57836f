"""The checkpoint module: round trip, atomic multi-path writes, and refusals that name the problem."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import pytest
import torch

from trpo_lab.agents import checkpoint
from trpo_lab.agents.ppo import PPO


def test_state_round_trips_through_the_file(tmp_path: Path) -> None:
    agent = PPO("CartPole-v1", n_envs=2, seed=0, n_steps=16, batch_size=16)
    agent.learn(64, tensorboard=False)
    data = checkpoint.agent_state(agent)
    checkpoint.write_checkpoint(data, tmp_path / "a.pt", tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    loaded = checkpoint.read_checkpoint(tmp_path / "a.pt")
    assert loaded["format"] == checkpoint.CHECKPOINT_FORMAT and loaded["counters"]["num_updates"] == agent.num_updates >= 2
    other = PPO("CartPole-v1", n_envs=2, seed=1, n_steps=16, batch_size=16)
    checkpoint.load_agent_state(other, loaded)
    for a, b in zip(agent.policy.parameters(), other.policy.parameters()):
        assert torch.equal(a, b)
    assert other.num_timesteps == agent.num_timesteps and other.guard.num_rejected == agent.guard.num_rejected
    agent.close()
    other.close()


def test_training_cpu_time_accumulates_across_a_resume_and_is_unknown_for_old_checkpoints() -> None:
    import math

    agent = PPO("CartPole-v1", n_envs=2, seed=0, n_steps=16, batch_size=16)
    agent.learn(64, tensorboard=False)
    assert 0 < agent.cpu_time <= agent.wall_time * 1.5 + 0.5  # one thread: CPU time about the wall time
    data = checkpoint.agent_state(agent)
    resumed = PPO("CartPole-v1", n_envs=2, seed=0, n_steps=16, batch_size=16)
    checkpoint.load_agent_state(resumed, data)
    assert resumed.cpu_time == agent.cpu_time
    resumed.learn(128, tensorboard=False)  # total steps over the lifetime: 64 more
    assert resumed.cpu_time > agent.cpu_time
    del data["counters"]["cpu_time"]  # as written before CPU time was recorded
    old = PPO("CartPole-v1", n_envs=2, seed=0, n_steps=16, batch_size=16)
    checkpoint.load_agent_state(old, data)
    assert math.isnan(old.cpu_time)
    for each in (agent, resumed, old):
        each.close()


def test_a_checkpoint_of_another_network_is_refused_before_anything_changes(tmp_path: Path) -> None:
    small = PPO("CartPole-v1", n_envs=1, seed=0, n_steps=8, batch_size=8, policy_kwargs={"net_arch": [4, 4]})
    data = checkpoint.agent_state(small)
    agent = PPO("CartPole-v1", n_envs=1, seed=0, n_steps=8, batch_size=8)
    before = [p.detach().clone() for p in agent.policy.parameters()]
    with pytest.raises(ValueError, match="Checkpoint policy parameter .* has shape"):
        checkpoint.load_agent_state(agent, data)
    assert all(torch.equal(a, b) for a, b in zip(before, agent.policy.parameters()))
    small.close()
    agent.close()


def test_space_signature_and_missing_fields() -> None:
    assert checkpoint.space_signature(gym.spaces.Discrete(3)) == {"type": "Discrete", "n": 3}
    assert checkpoint.space_signature(gym.spaces.Box(-1, 1, (2, 3))) == {"type": "Box", "shape": [2, 3]}
    assert checkpoint.space_signature(gym.spaces.MultiDiscrete([2, 4])) == {"type": "MultiDiscrete", "nvec": [2, 4]}


def test_a_damaged_file_is_refused_naming_the_field(tmp_path: Path) -> None:
    agent = PPO("CartPole-v1", n_envs=1, seed=0, n_steps=8, batch_size=8)
    data = checkpoint.agent_state(agent)
    del data["counters"]
    checkpoint.write_checkpoint(data, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="field 'counters' is missing"):
        checkpoint.read_checkpoint(tmp_path / "bad.pt")
    agent.close()

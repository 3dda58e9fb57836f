"""The collector with a torch-native vector env: no host synchronisation per step, and TRPO learns."""

from __future__ import annotations

import pytest
import torch

from trpo_lab import PPO, TRPO
from trpo_lab.envs.torch_cartpole import TorchCartPole
from trpo_lab.testing import HostSyncCounter


def _rollout_syncs(n_steps: int) -> HostSyncCounter:
    agent = TRPO(TorchCartPole(8), n_steps=n_steps, seed=0, sync_free=True)
    agent.collect_rollout()  # the first rollout also resets the envs
    with HostSyncCounter() as counter:
        agent.collect_rollout()
    return counter


def test_rollout_steps_make_no_host_sync() -> None:
    short, long = _rollout_syncs(4), _rollout_syncs(32)
    # Once per rollout, not per step: the read of valid steps and finished episodes, GAE's host
    # scan (one stacked copy on a GPU) and the noise chunk drawn on the host (a CPU tensor
    # everywhere: no sync on a GPU either). Nothing inside a step synchronises.
    assert short.count == long.count, long.report()
    once_per_rollout = ("collector.py", "in read"), ("buffer.py", "t.detach().to(dtype"), ("acting.py", "in _advance")
    for sync in long.syncs:
        assert any(path in sync.location and where in sync.location for path, where in once_per_rollout), long.report()
    assert len(short.host_data) == len(long.host_data) <= 1, long.report()


def test_rollout_fills_the_buffer_and_episode_statistics() -> None:
    agent = TRPO(TorchCartPole(4, max_episode_steps=10), n_steps=25, seed=0)
    steps = agent.collect_rollout()
    batch = agent.buffer.batch()
    assert steps == batch.size == int(agent.buffer.valid.sum())
    # 25 steps of 10-step-or-shorter episodes: every env finished at least two episodes.
    assert agent.num_episodes >= 8
    assert all(1 <= length <= 10 for length in agent.episode_lengths)
    assert list(agent.episode_returns) == list(agent.episode_lengths)  # reward 1 per step
    assert batch.actions.dtype == torch.long and batch.observations.shape[1:] == (4,)


@pytest.mark.slow
def test_trpo_learns_torch_cartpole() -> None:
    agent = TRPO(TorchCartPole(16), n_steps=64, seed=0, sync_free=True)
    agent.learn(10 * 16 * 64)
    returns = list(agent.episode_returns)
    assert sum(returns[-20:]) / 20 > 60, returns[-20:]  # random play averages about 22


def test_ppo_collects_from_a_torch_env_and_checkpoints(tmp_path) -> None:  # type: ignore[no-untyped-def]
    agent = PPO(TorchCartPole(4), n_steps=16, batch_size=32, n_epochs=1, seed=0)
    agent.learn(2 * 4 * 16, run_dir=tmp_path / "run")
    agent.save(tmp_path / "agent.pt")
    assert agent.num_timesteps > 0 and (tmp_path / "agent.pt").exists()


def test_agent_rejects_a_torch_env_it_cannot_use() -> None:
    with pytest.raises(ValueError, match="nan_policy: 'skip' for a torch vector env"):
        TRPO(TorchCartPole(2), nan_policy="skip")
    elsewhere = TorchCartPole(2)
    elsewhere.device = torch.device("meta")  # any device but the agent's
    with pytest.raises(ValueError, match="Invalid env: a torch vector env on meta, but the agent's device is cpu"):
        TRPO(elsewhere)

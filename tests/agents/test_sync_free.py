"""The device-resident update (``sync_free=True``) on the CPU: no host synchronisation inside
``update`` (counted with :class:`~trpo_lab.testing.HostSyncCounter`), and the same update as
the host-synchronising path, for Discrete, Box and MultiDiscrete policies."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

from trpo_lab import NPG, PPO, TRPO
from trpo_lab.agents.base import OnPolicyAgent
from trpo_lab.testing import HostSyncCounter


class MultiDiscreteTarget(gym.Env[np.ndarray, np.ndarray]):
    """A MultiDiscrete([3, 2]) task: reward 1 per action component matching the sign pattern of the state."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.MultiDiscrete([3, 2])

    def __init__(self) -> None:
        self._state = np.zeros(2, np.float32)
        self._t = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self._t = 0
        self._state = self.np_random.uniform(-1, 1, 2).astype(np.float32)
        return self._state.copy(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        target = (int(self._state[0] > 0) * 2, int(self._state[1] > 0))
        reward = float(action[0] == target[0]) + float(action[1] == target[1])
        self._t += 1
        self._state = self.np_random.uniform(-1, 1, 2).astype(np.float32)
        return self._state.copy(), reward, False, self._t >= 20, {}


ENVS: dict[str, Any] = {
    "discrete": "CartPole-v1",
    "box": "Pendulum-v1",
    "multidiscrete": MultiDiscreteTarget,
}

ALGOS: dict[str, tuple[type[OnPolicyAgent], dict[str, Any]]] = {
    "trpo": (TRPO, {}),
    "trpo-lbfgs": (TRPO, {"critic_optimizer": "lbfgs", "critic_lbfgs_max_iter": 10}),
    "trpo-func": (TRPO, {"fvp_backend": "func", "sub_sampling_factor": 2}),
    "npg": (NPG, {}),
    "ppo": (PPO, {"target_kl": 0.002, "learning_rate": 3e-3, "batch_size": 32, "n_epochs": 4}),
}


def _agent(algo: str, env: str, sync_free: bool | None, **extra: Any) -> OnPolicyAgent:
    cls, kwargs = ALGOS[algo]
    return cls(ENVS[env], n_envs=2, seed=3, n_steps=64, sync_free=sync_free, **{**kwargs, **extra})


@pytest.mark.parametrize("env", sorted(ENVS))
@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_update_makes_no_host_sync(algo: str, env: str) -> None:
    agent = _agent(algo, env, sync_free=True)
    agent.collect_rollout()
    batch = agent.buffer.batch()
    with HostSyncCounter() as counter:
        metrics = agent.update(batch)
    assert counter.count == 0, counter.report()
    assert not counter.host_data, counter.report()
    assert all(isinstance(v, (torch.Tensor, float)) for v in metrics.values())


@pytest.mark.parametrize("env", sorted(ENVS))
def test_host_path_still_synchronises(env: str) -> None:
    """The counter is not blind: the default CPU path stops CG and the line search early."""
    agent = _agent("trpo", env, sync_free=None)
    assert not agent.sync_free
    agent.collect_rollout()
    with HostSyncCounter() as counter:
        agent.update(agent.buffer.batch())
    assert counter.count > 0
    assert any("cg.py" in sync.location for sync in counter.syncs)


@pytest.mark.parametrize("env", sorted(ENVS))
@pytest.mark.parametrize("algo", ["trpo", "trpo-func", "npg", "ppo"])
def test_sync_free_update_equals_host_path(algo: str, env: str) -> None:
    host, device = _agent(algo, env, sync_free=False), _agent(algo, env, sync_free=True)
    for agent in (host, device):
        agent.collect_rollout()
    host_metrics = host.update(host.buffer.batch())
    device_metrics = device.update(device.buffer.batch())
    for p, q in zip(host.policy.parameters(), device.policy.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    keys = ["train/kl", "train/value_loss"] + (["train/early_stop", "train/n_updates"] if algo == "ppo" else [])
    for key in keys:
        torch.testing.assert_close(
            torch.as_tensor(device_metrics[key], dtype=torch.float32),
            torch.as_tensor(host_metrics[key], dtype=torch.float32),
            rtol=1e-4, atol=1e-6,
        )
    if algo == "ppo":
        assert float(host_metrics["train/early_stop"]) == 1.0  # the early stop was exercised


@pytest.mark.parametrize("env", ["discrete", "box"])
def test_sync_free_lbfgs_fit_matches_torch_lbfgs(env: str) -> None:
    """The masked fixed-budget L-BFGS fits the critic about as well as torch's strong-Wolfe L-BFGS."""
    host, device = (_agent("trpo-lbfgs", env, s, critic_lbfgs_max_iter=25) for s in (False, True))
    losses = []
    for agent in (host, device):
        agent.collect_rollout()
        batch = agent.buffer.batch()
        obs = agent.policy.preprocess(batch.observations)
        with torch.no_grad():
            before = torch.nn.functional.mse_loss(agent.policy.value(obs), batch.returns)
        after = agent.update(batch)["train/value_loss"]
        losses.append((float(before), float(after)))
    (host_before, host_after), (device_before, device_after) = losses
    assert host_before == pytest.approx(device_before)
    assert device_after < 0.5 * device_before
    assert device_after <= 1.5 * host_after + 1e-3 * host_before


def test_sync_free_default_follows_the_device() -> None:
    agent = _agent("trpo", "discrete", sync_free=None)
    assert agent.sync_free is False and agent.config.sync_free is None
    assert _agent("trpo", "discrete", sync_free=True).sync_free is True


def test_sync_free_rejects_non_bool() -> None:
    with pytest.raises(ValueError, match="sync_free"):
        _agent("trpo", "discrete", sync_free="yes")  # type: ignore[arg-type]

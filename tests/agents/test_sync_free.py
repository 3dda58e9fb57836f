"""The device-resident update (``sync_free=True``) on the CPU: no host synchronisation inside
``update`` (counted with :class:`~trpo_lab.testing.HostSyncCounter`), and the same update as
the host-synchronising path, for Discrete, Box and MultiDiscrete policies."""

from __future__ import annotations

import copy
import io
import math
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import Tensor, nn

from trpo_lab import ACKTR, NPG, PPO, TRPO
from trpo_lab.agents.base import OnPolicyAgent
from trpo_lab.agents.curvature import KFACCurvature
from trpo_lab.agents.metrics import to_host
from trpo_lab.optim import KFAC
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
    "ppo-kl-subset": (PPO, {"target_kl": 0.002, "learning_rate": 3e-3, "batch_size": 32, "n_epochs": 4,
                            "kl_batch_size": 40}),
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


# ---------------------------------------------------------------------- K-FAC: ACKTR and curvature="kfac"

KFAC_ALGOS: dict[str, tuple[type[OnPolicyAgent], dict[str, Any]]] = {
    "acktr": (ACKTR, {"inverse_every": 2}),
    "acktr-target-kl": (ACKTR, {"inverse_every": 2, "target_kl": 0.002}),
    "acktr-kl-subset": (ACKTR, {"inverse_every": 2, "target_kl": 0.002, "kl_batch_size": 24}),
    "trpo-kfac": (TRPO, {"curvature": "kfac"}),
}


def _kfac_agent(algo: str, env: str, sync_free: bool | None) -> OnPolicyAgent:
    cls, kwargs = KFAC_ALGOS[algo]
    return cls(ENVS[env], n_envs=2, seed=3, n_steps=32, sync_free=sync_free, **kwargs)


def _kfacs(agent: OnPolicyAgent) -> list[KFAC]:
    if isinstance(agent, ACKTR):
        return [agent.actor_optimizer, agent.critic_optimizer]
    assert isinstance(agent, TRPO) and isinstance(agent.curvature, KFACCurvature)
    return [agent.curvature.kfac]


@pytest.mark.parametrize("env", sorted(ENVS))
@pytest.mark.parametrize("algo", sorted(KFAC_ALGOS))
def test_kfac_update_makes_at_most_one_host_sync(algo: str, env: str) -> None:
    """Three updates; with inverse_every 2 the first and third refresh ACKTR's eigendecompositions
    (TRPO's every update), and from the second on ACKTR's target_kl rule adapts the step."""
    agent = _kfac_agent(algo, env, sync_free=True)
    assert all(kfac.sync_free for kfac in _kfacs(agent))
    refreshed = []
    for _ in range(3):
        agent.collect_rollout()
        batch = agent.buffer.batch()
        generations = [kfac._eigh_generation for kfac in _kfacs(agent)]
        with HostSyncCounter() as counter:
            metrics = agent.update(batch)
        assert counter.count <= 1, counter.report()  # the bound; measured: 0
        assert counter.count == 0, counter.report()
        assert not counter.host_data, counter.report()
        refreshed.append(any(k._eigh_generation > g for k, g in zip(_kfacs(agent), generations, strict=True)))
        assert all(isinstance(v, (torch.Tensor, float)) for v in metrics.values())
    assert refreshed == ([True, False, True] if algo.startswith("acktr") else [True, True, True])
    values = to_host(metrics)
    assert all(math.isfinite(v) for k, v in values.items() if not k.endswith("cond_max")), values


@pytest.mark.parametrize("env", sorted(ENVS))
@pytest.mark.parametrize("algo", sorted(KFAC_ALGOS))
def test_kfac_sync_free_updates_equal_host_path(algo: str, env: str) -> None:
    host, device = _kfac_agent(algo, env, sync_free=False), _kfac_agent(algo, env, sync_free=True)
    assert not any(kfac.sync_free for kfac in _kfacs(host))
    for _ in range(3):
        for agent in (host, device):
            agent.collect_rollout()
        host_metrics = host.update(host.buffer.batch())
        device_metrics = to_host(device.update(device.buffer.batch()))
        for p, q in zip(host.policy.parameters(), device.policy.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
        keys = [k for k in host_metrics if k.startswith(("train/kl", "kfac/"))] + ["train/value_loss"]
        for key in keys:
            assert device_metrics[key] == pytest.approx(float(host_metrics[key]), rel=1e-3, abs=1e-6), key
    if algo == "acktr-target-kl":
        assert isinstance(device, ACKTR) and isinstance(host, ACKTR)
        assert float(device.actor_lr_scale) == pytest.approx(host.actor_lr_scale)
        assert host.actor_lr_scale != 1.0  # the adaptive rule acted


def _classifier() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))
    return model, torch.randn(8, 3), torch.randint(0, 4, (8,))


def _kfac_step(optimizer: KFAC, model: nn.Module, inputs: Tensor, targets: Tensor, poison: str = "") -> None:
    if poison == "factor":  # a corrupted running factor: its next eigendecomposition is not finite
        optimizer.state[model[0].weight]["A"].fill_(float("nan"))
    fisher_inputs = inputs.clone()
    if poison == "batch":  # a non-finite statistics batch: rejected
        fisher_inputs[2, 1] = float("nan")
    with optimizer.track_statistics():
        logits = model(fisher_inputs)
        sampled = logits.detach().argmax(-1)
        nn.functional.cross_entropy(logits, sampled).backward()
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(inputs), targets).backward()
    if poison == "direction":  # the second layer's [W | b] direction is not finite: skipped
        model[2].bias.grad[0] = float("nan")
    optimizer.step()


@pytest.mark.parametrize("poison", ["factor", "batch", "direction"])
def test_kfac_nonfinite_falls_back_on_the_device(poison: str) -> None:
    """Each of K-FAC's finiteness checks, decided by torch.where with no host sync, does what the
    host path does: a NaN factor keeps the previous eigenbasis, a NaN batch is rejected, a NaN
    direction leaves its parameters (and momentum) alone; the counters agree."""
    results = []
    for sync_free in (False, True):
        model, inputs, targets = _classifier()
        optimizer = KFAC(model, inverse_every=1, sync_free=sync_free)
        _kfac_step(optimizer, model, inputs, targets)
        state = optimizer.state[model[0].weight]
        previous = state["eigenvectors_A"].clone()
        with HostSyncCounter() as counter:
            _kfac_step(optimizer, model, inputs, targets, poison)
            _kfac_step(optimizer, model, inputs, targets)
        if sync_free:
            assert counter.count == 0, counter.report()
        assert all(torch.isfinite(p).all() for p in model.parameters())
        if poison == "factor":
            assert torch.equal(state["eigenvectors_A"], previous)  # both refreshes fell back
        stats = to_host(optimizer.last_stats)
        results.append((stats, [p.detach().clone() for p in model.parameters()]))
    (host_stats, host_params), (device_stats, device_params) = results
    expected = {"factor": "eigh_fallbacks", "batch": "stats_rejected", "direction": "nonfinite_directions"}[poison]
    assert host_stats[f"kfac/{expected}"] == device_stats[f"kfac/{expected}"] == 2.0
    for name in ("eigh_fallbacks", "stats_rejected", "nonfinite_directions", "skipped_steps", "step"):
        assert device_stats[f"kfac/{name}"] == host_stats[f"kfac/{name}"], name
    for p, q in zip(host_params, device_params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_kfac_sync_free_state_dict_round_trip() -> None:
    model, inputs, targets = _classifier()
    optimizer = KFAC(model, sync_free=True)
    _kfac_step(optimizer, model, inputs, targets, "batch")
    restored_model = copy.deepcopy(model)
    restored = KFAC(restored_model, sync_free=True)
    saved = io.BytesIO()
    torch.save(optimizer.state_dict(), saved)  # a checkpoint: torch.optim's load keeps tensors shared
    saved.seek(0)
    restored.load_state_dict(torch.load(saved))
    for opt, net in ((optimizer, model), (restored, restored_model)):
        _kfac_step(opt, net, inputs, targets)
    for p, q in zip(model.parameters(), restored_model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert to_host(restored.last_stats)["kfac/stats_rejected"] == 2.0

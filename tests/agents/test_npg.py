"""NPG: the full KL-scaled natural step without a line search, learning, save/load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from trpo_lab.agents.npg import NPG
from trpo_lab.agents.trpo import TRPO
from trpo_lab.optim._flat import flat_params
from trpo_lab.presets import load_preset


def test_npg_applies_the_full_scaled_step_and_logs_its_kl() -> None:
    agent = NPG("CartPole-v1", n_envs=2, seed=0, n_steps=64, target_kl=0.01)
    agent.collect_rollout()
    batch = agent.buffer.batch()
    obs = agent.policy.preprocess(batch.observations)
    advantages = agent._advantages(batch)
    before = flat_params(agent.policy.actor_parameters())
    with torch.no_grad():
        old_params = agent.policy.dist_params(obs)
    step = agent.natural_step(obs, batch, advantages)
    metrics = agent.apply_step(step, obs, batch, advantages)
    after = flat_params(agent.policy.actor_parameters())
    torch.testing.assert_close(after - before, step.full_step, rtol=0, atol=1e-6)
    # The step is scaled so that the quadratic model ½ βs·F·βs (with damping) equals δ; the true
    # KL of a small step is close to that.
    kl = metrics["train/kl"].item()
    assert 0.003 < kl < 0.03
    with torch.no_grad():
        exact = agent.policy.distribution.kl(old_params, agent.policy.dist_params(obs)).mean().item()
    assert kl == pytest.approx(exact, rel=1e-5)
    assert set(metrics) >= {"train/kl", "train/expected_improvement", "train/actual_improvement"}


def test_full_update_metrics_and_round_trip(tmp_path: Path) -> None:
    agent = NPG("Pendulum-v1", n_envs=2, seed=0, n_steps=64, normalize_obs=True)
    seen: list[dict[str, float]] = []
    agent.learn(512, tensorboard=False, callback=lambda a, m: seen.append(m) or None)
    for key in ("train/kl", "train/surrogate", "train/value_loss", "train/explained_variance", "train/entropy"):
        assert key in seen[-1]
    agent.save(tmp_path / "npg.pt")
    loaded = NPG.load(tmp_path / "npg.pt")
    obs = np.stack([agent.observation_space.sample() for _ in range(8)])
    np.testing.assert_array_equal(agent.predict(obs), loaded.predict(obs))
    assert loaded.config == agent.config
    with pytest.raises(ValueError, match="NPG.load"):
        TRPO.load(tmp_path / "npg.pt")


@pytest.mark.slow
def test_npg_solves_cartpole_within_150k_steps() -> None:
    hyperparameters, run = load_preset("npg", "CartPole-v1")
    budget = int(run["total_timesteps"])
    assert budget <= 150_000
    agent = NPG("CartPole-v1", n_envs=int(run["n_envs"]), seed=0, **hyperparameters)
    agent.learn(budget, tensorboard=False)
    assert agent.num_timesteps <= 150_000 + agent.n_envs * agent.config.n_steps
    assert agent.evaluate(10).mean() >= 475

"""trpo_lab's torch optimizers inside SB3 through policy_kwargs=dict(optimizer_class=..., optimizer_kwargs=...)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.env_util import make_vec_env

from trpo_lab.optim import Shampoo


def test_a2c_and_ppo_build_and_step_shampoo() -> None:
    for cls, settings in ((A2C, dict(n_steps=8)), (PPO, dict(n_steps=32, batch_size=64, n_epochs=1))):
        model = cls(
            "MlpPolicy",
            make_vec_env("CartPole-v1", n_envs=2, seed=0),
            learning_rate=1e-3,
            seed=0,
            device="cpu",
            policy_kwargs=dict(
                optimizer_class=Shampoo, optimizer_kwargs=dict(precondition_every=2, start_preconditioning_step=1)
            ),
            **settings,
        )
        assert isinstance(model.policy.optimizer, Shampoo)
        before = [p.detach().clone() for p in model.policy.parameters()]
        model.learn(128)
        assert model.policy.optimizer.param_groups[0]["lr"] == 1e-3  # SB3's learning_rate is Shampoo's lr
        assert any((p != b).any() for p, b in zip(model.policy.parameters(), before))
        assert len(model.policy.optimizer.state) == len(before)  # Shampoo state for every parameter


@pytest.mark.slow
def test_ppo_with_shampoo_learns_cartpole(tmp_path: Path, learn_to_bar: Any) -> None:
    """SB3's PPO with Shampoo reaches 475 within 100k steps (rl-zoo's CartPole gamma / GAE lambda)."""
    model = PPO(
        "MlpPolicy",
        make_vec_env("CartPole-v1", n_envs=8, seed=0),
        learning_rate=1e-3,
        n_steps=64,
        batch_size=256,
        n_epochs=10,
        gamma=0.98,
        gae_lambda=0.8,
        seed=0,
        device="cpu",
        policy_kwargs=dict(optimizer_class=Shampoo, optimizer_kwargs=dict(precondition_every=10)),
    )
    loaded = learn_to_bar(model, 100_000, tmp_path)
    assert isinstance(loaded.policy.optimizer, Shampoo)

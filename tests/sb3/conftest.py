"""Shared checks of the SB3 integration tests: learn CartPole-v1 to the bar, then round-trip the zip."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import CheckpointCallback, EvalCallback, StopTrainingOnRewardThreshold
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

CARTPOLE_BAR = 475.0

LearnToBar = Callable[..., BaseAlgorithm]


def learn_cartpole_to_bar(
    model: BaseAlgorithm,
    budget: int,
    tmp_path: Path,
    eval_every: int = 8_192,
    **learn_kwargs: Any,
) -> BaseAlgorithm:
    """Train ``model`` on CartPole-v1 with EvalCallback + CheckpointCallback until the bar or the budget.

    Asserts that (1) training stopped at the bar within ``budget`` steps, (2) a fresh
    deterministic ``evaluate_policy`` of the final model reaches the bar too, (3) checkpoints
    were written, and (4) save -> load -> predict gives identical deterministic actions.
    Returns the loaded model.
    """
    n_envs = model.get_env().num_envs
    stop = StopTrainingOnRewardThreshold(reward_threshold=CARTPOLE_BAR)
    evaluation = EvalCallback(
        make_vec_env("CartPole-v1", n_envs=1, seed=1_000),
        callback_on_new_best=stop,
        eval_freq=max(eval_every // n_envs, 1),
        n_eval_episodes=5,
        deterministic=True,
    )
    checkpoints = CheckpointCallback(save_freq=max(eval_every // n_envs, 1), save_path=str(tmp_path / "checkpoints"))
    model.learn(total_timesteps=budget, callback=[evaluation, checkpoints], **learn_kwargs)
    assert evaluation.best_mean_reward >= CARTPOLE_BAR, (
        f"{type(model).__name__} reached only {evaluation.best_mean_reward} within {budget} steps"
    )
    assert model.num_timesteps <= budget
    final_return, _ = evaluate_policy(
        model, make_vec_env("CartPole-v1", n_envs=1, seed=2_000), n_eval_episodes=10, deterministic=True
    )
    assert final_return >= CARTPOLE_BAR
    assert list((tmp_path / "checkpoints").glob("*.zip")), "CheckpointCallback wrote no checkpoint"

    path = tmp_path / "model.zip"
    model.save(path)
    loaded = type(model).load(path, device="cpu")
    observations = np.random.default_rng(0).uniform(-0.5, 0.5, size=(256, 4)).astype(np.float32)
    expected, _ = model.predict(observations, deterministic=True)
    actual, _ = loaded.predict(observations, deterministic=True)
    np.testing.assert_array_equal(actual, expected)
    for key, value in model.policy.state_dict().items():
        assert (loaded.policy.state_dict()[key] == value).all(), key
    return loaded


@pytest.fixture
def learn_to_bar() -> LearnToBar:
    return learn_cartpole_to_bar

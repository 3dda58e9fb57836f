"""Shared checks of the SB3 integration tests: learn CartPole-v1 to the bar, then round-trip the zip."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback, EvalCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

CARTPOLE_BAR = 475.0

LearnToBar = Callable[..., BaseAlgorithm]


class StopAfterConsecutiveBars(BaseCallback):
    """EvalCallback's ``callback_after_eval``: stop once ``times`` evaluations in a row reach ``bar``.

    A CartPole policy can touch 475 on one evaluation and dip below on the next; two in a row
    make the final, independent evaluation a fair check of the trained model.
    """

    def __init__(self, bar: float, times: int = 2) -> None:
        super().__init__()
        self.bar, self.times, self.streak = bar, times, 0

    def _on_step(self) -> bool:
        assert isinstance(self.parent, EvalCallback)
        self.streak = self.streak + 1 if self.parent.last_mean_reward >= self.bar else 0
        return self.streak < self.times


def learn_cartpole_to_bar(
    model: BaseAlgorithm,
    budget: int,
    tmp_path: Path,
    eval_every: int = 8_192,
    **learn_kwargs: Any,
) -> BaseAlgorithm:
    """Train ``model`` on CartPole-v1 with EvalCallback + CheckpointCallback until the bar or the budget.

    Asserts that (1) training stopped within ``budget`` steps after two evaluations in a row
    (10 deterministic episodes each) reached the bar, (2) a fresh deterministic
    ``evaluate_policy`` of the final model on other episodes reaches it too, (3) checkpoints
    were written, and (4) save -> load -> predict gives identical deterministic actions.
    Returns the loaded model.
    """
    n_envs = model.get_env().num_envs
    stop = StopAfterConsecutiveBars(CARTPOLE_BAR)
    evaluation = EvalCallback(
        make_vec_env("CartPole-v1", n_envs=1, seed=1_000),
        callback_after_eval=stop,
        eval_freq=max(eval_every // n_envs, 1),
        n_eval_episodes=10,
        deterministic=True,
    )
    checkpoints = CheckpointCallback(save_freq=max(eval_every // n_envs, 1), save_path=str(tmp_path / "checkpoints"))
    model.learn(total_timesteps=budget, callback=[evaluation, checkpoints], **learn_kwargs)
    assert stop.streak == stop.times, (
        f"{type(model).__name__} did not reach {CARTPOLE_BAR} twice in a row within {budget} steps "
        f"(best {evaluation.best_mean_reward}, last {evaluation.last_mean_reward})"
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

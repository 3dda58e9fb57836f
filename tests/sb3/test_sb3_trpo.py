"""trpo_lab.sb3.TRPO / NPG: SB3 algorithms on trpo_lab.optim, checked against sb3-contrib's TRPO."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from sb3_contrib import TRPO as ContribTRPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm

from trpo_lab.sb3 import NPG, TRPO

# The trpo_lab preset for CartPole-v1 (agents/trpo.toml), in sb3-contrib's names.
CARTPOLE = dict(n_steps=256, batch_size=256, cg_max_steps=10, n_critic_updates=5)


def _model(cls: type[OnPolicyAlgorithm], **overrides: Any) -> OnPolicyAlgorithm:
    settings = {**CARTPOLE, **overrides}
    return cls("MlpPolicy", make_vec_env("CartPole-v1", n_envs=8, seed=0), seed=0, device="cpu", **settings)


def _actor_params(model: OnPolicyAlgorithm) -> dict[str, torch.Tensor]:
    # The MlpPolicy's actor: everything but the value network (sb3-contrib's own split).
    return {name: p.detach().clone() for name, p in model.policy.named_parameters() if "value" not in name}


def test_first_update_direction_matches_sb3_contrib() -> None:
    """Same weights, same rollout buffer, CG run to convergence: the actor steps are parallel."""
    theirs = _model(ContribTRPO, cg_max_steps=100)
    ours = _model(TRPO, cg_max_steps=100)
    for model in (theirs, ours):
        _, callback = model._setup_learn(10_000, None)
    theirs.collect_rollouts(theirs.env, callback, theirs.rollout_buffer, n_rollout_steps=theirs.n_steps)
    ours.policy.load_state_dict(theirs.policy.state_dict())
    ours.rollout_buffer = copy.deepcopy(theirs.rollout_buffer)
    before_theirs, before_ours = _actor_params(theirs), _actor_params(ours)

    theirs.train()
    ours.train()

    step_theirs = torch.cat([(p - before_theirs[n]).reshape(-1) for n, p in _actor_params(theirs).items()])
    step_ours = torch.cat([(p - before_ours[n]).reshape(-1) for n, p in _actor_params(ours).items()])
    assert step_theirs.norm() > 0 and step_ours.norm() > 0
    cosine = torch.nn.functional.cosine_similarity(step_theirs, step_ours, dim=0)
    assert cosine > 0.99
    # CG converged (sb3-contrib's tolerance on the squared residual is 1e-10).
    assert ours.logger.name_to_value["train/cg_residual"] ** 2 < 1e-10
    assert ours.logger.name_to_value["train/is_line_search_success"] == 1.0
    assert ours.logger.name_to_value["train/kl_divergence_loss"] <= ours.target_kl


def test_logged_keys_follow_sb3_contrib() -> None:
    model = _model(TRPO, n_steps=32)
    model.learn(256)
    logged = set(model.logger.name_to_value)
    model = _model(NPG, n_steps=32)
    model.learn(256)
    logged_npg = set(model.logger.name_to_value)
    shared = {"train/policy_objective", "train/value_loss", "train/kl_divergence_loss", "train/explained_variance"}
    assert shared | {"train/is_line_search_success", "train/cg_residual"} <= logged
    assert shared | {"train/cg_iterations", "train/step_norm"} <= logged_npg


def test_npg_takes_the_full_kl_scaled_step() -> None:
    """NPG's step has quadratic-model KL = target_kl; the actual KL is close to it."""
    model = _model(NPG, n_steps=64, target_kl=0.005)
    model.learn(512)
    kl = model.logger.name_to_value["train/kl_divergence_loss"]
    assert 0.5 * 0.005 < kl < 2 * 0.005


@pytest.mark.parametrize(
    ("name", "value"),
    [("n_steps", 0), ("cg_max_steps", 0), ("target_kl", 0.0), ("cg_damping", -1.0), ("line_search_shrinking_factor", 1.0)],
)
def test_invalid_hyperparameters_name_the_field(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        _model(TRPO, **{name: value})


@pytest.mark.slow
@pytest.mark.parametrize("cls", [TRPO, NPG, ContribTRPO], ids=["trpo_lab.sb3.TRPO", "trpo_lab.sb3.NPG", "sb3_contrib.TRPO"])
def test_learns_cartpole_within_150k(cls: type[OnPolicyAlgorithm], tmp_path: Path, learn_to_bar: Any) -> None:
    """Same hyperparameters and seed for ours and sb3-contrib's; both reach 475 within 150k steps."""
    model = _model(cls, tensorboard_log=str(tmp_path / "tb"))
    learn_to_bar(model, 150_000, tmp_path)
    assert any((tmp_path / "tb").rglob("events.out.tfevents.*"))

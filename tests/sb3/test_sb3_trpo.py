"""trpo_lab.sb3.TRPO / NPG: SB3 algorithms on trpo_lab.optim, checked against sb3-contrib's TRPO."""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sb3_contrib import TRPO as ContribTRPO
from stable_baselines3.common.distributions import kl_divergence
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm

from trpo_lab.config import TRPOConfig
from trpo_lab.sb3 import NPG, TRPO
from trpo_lab.sb3.functional import mean_kl

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


# ---------------------------------------------------------------------------------- the shared step
@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
@pytest.mark.parametrize("curvature", ["kfac", "shampoo", "exact"])
def test_every_curvature_backend_steps_inside_the_trust_region(env_id: str, curvature: str) -> None:
    settings = dict(n_steps=64, batch_size=64, n_critic_updates=1, target_kl=0.01, curvature=curvature)
    if curvature == "exact":  # the dense Fisher needs a small actor
        settings["policy_kwargs"] = dict(net_arch=[8])
    model = TRPO("MlpPolicy", make_vec_env(env_id, n_envs=4, seed=0), seed=0, device="cpu", **settings)
    before = {n: p.detach().clone() for n, p in model.policy.named_parameters()}
    model.learn(3 * 4 * 64)
    logged = model.logger.name_to_value
    assert model.curvature == curvature
    assert 0.0 <= logged["train/kl_divergence_loss"] <= 0.01
    assert logged["train/step_norm"] > 0
    assert any(not torch.equal(p, before[n]) for n, p in model.policy.named_parameters() if "value" not in n)


def test_kfac_preconditions_the_actor_layers_only() -> None:
    model = _model(TRPO, n_steps=32, curvature="kfac")
    kfac = model._curvature.kfac  # type: ignore[attr-defined]
    layer_ids = {id(p) for p in kfac.param_groups[0]["params"]}
    actor_ids = {id(p) for p in model.actor_params}
    assert layer_ids == actor_ids  # a Categorical actor is Linear layers only; none of the critic's
    value_ids = {id(p) for n, p in model.policy.named_parameters() if "value" in n}
    assert not layer_ids & value_ids


def test_batched_line_search_gives_the_sequential_result() -> None:
    finals = []
    for batched in (False, True):
        model = _model(TRPO, n_steps=32, n_critic_updates=1, line_search_batched=batched)
        model.learn(3 * 8 * 32)
        finals.append(torch.cat([p.detach().reshape(-1) for p in model.actor_params]))
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_candidate_evaluation_equals_writing_the_parameters(env_id: str) -> None:
    """functional_call / vmap over candidates = the policy's methods with the candidate written in."""
    model = TRPO("MlpPolicy", make_vec_env(env_id, n_envs=2, seed=0), seed=0, device="cpu", n_steps=32, batch_size=64)
    _, callback = model._setup_learn(1_000, None)
    model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=model.n_steps)
    batch = model._actor_batch(next(iter(model.rollout_buffer.get(batch_size=None))))
    step = model.natural_step(batch)
    theta = torch.cat([p.detach().reshape(-1) for p in model.actor_params])
    candidates = theta + torch.tensor([1.0, 0.5, 0.25]).unsqueeze(1) * step.full_step
    losses, kls = step.evaluate(candidates)
    single = [step.evaluate(c.unsqueeze(0)) for c in candidates]
    for index, candidate in enumerate(candidates):
        torch.nn.utils.vector_to_parameters(candidate, model.actor_params)
        with torch.no_grad():
            distribution = model.policy.get_distribution(batch.observations)
            ratio = torch.exp(distribution.log_prob(batch.actions) - batch.old_log_prob)
            loss = -(batch.advantages * ratio).mean()
            kl = kl_divergence(batch.old_distribution, distribution).mean()
        torch.testing.assert_close(losses[index], loss, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(kls[index], kl, rtol=1e-5, atol=1e-9)
        assert torch.equal(single[index][0][0], loss) and torch.equal(single[index][1][0], kl)


def test_mean_kl_equals_sb3s_for_every_action_space() -> None:
    import gymnasium as gym
    from stable_baselines3.common.policies import ActorCriticPolicy

    spaces = [gym.spaces.Discrete(3), gym.spaces.MultiDiscrete([2, 3]), gym.spaces.MultiBinary(3),
              gym.spaces.Box(-1, 1, (2,))]
    for space in spaces:
        policy = ActorCriticPolicy(gym.spaces.Box(-1, 1, (4,)), space, lambda _: 1e-3)
        obs = torch.randn(16, 4)
        with torch.no_grad():
            old = copy.copy(policy.get_distribution(obs))
            for p in policy.parameters():
                p.add_(0.1 * torch.randn_like(p))
            new = policy.get_distribution(obs)
        torch.testing.assert_close(mean_kl(old, new), kl_divergence(old, new).mean(), rtol=1e-6, atol=1e-9)


def test_hyperparameters_come_from_the_validated_config() -> None:
    model = _model(TRPO, n_steps=32)
    assert isinstance(model.config, TRPOConfig)
    assert model.config == TRPOConfig(**{**CARTPOLE, "n_steps": 32})
    assert (model.target_kl, model.cg_max_steps, model.batch_size) == (0.01, 10, 256)
    defaults = inspect.signature(TRPO).parameters
    for name in ("n_steps", "batch_size", "cg_max_steps", "cg_damping", "target_kl", "line_search_max_iter"):
        assert defaults[name].default == getattr(TRPOConfig(), name), name
    contrib = inspect.signature(ContribTRPO).parameters
    for name, parameter in contrib.items():
        if name in defaults and parameter.default is not inspect.Parameter.empty:
            assert defaults[name].default == parameter.default, name
    with pytest.raises(AttributeError):
        model.target_kl = 0.5  # type: ignore[misc]


def test_kfac_state_survives_save_and_load(tmp_path: Path) -> None:
    model = _model(TRPO, n_steps=32, curvature="kfac")
    model.learn(2 * 8 * 32)
    model.save(tmp_path / "model.zip")
    loaded = TRPO.load(tmp_path / "model.zip", device="cpu")
    saved, restored = model._curvature.state_dict()["kfac"], loaded._curvature.state_dict()["kfac"]
    assert restored["state"] and restored["state"].keys() == saved["state"].keys()
    for key, state in saved["state"].items():
        torch.testing.assert_close(restored["state"][key]["A"], state["A"])
    assert loaded.curvature == "kfac" and loaded.config == model.config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"curvature": "newton"}, r"Invalid curvature: 'newton'; expected one of 'cg', 'kfac', 'shampoo', 'exact'"),
        ({"cg_dampin": 0.1}, r"Unknown hyperparameter 'cg_dampin' for trpo; did you mean cg_damping"),
        ({"n_steps": "64"}, r"Invalid n_steps: '64' \(str\); expected an integer"),
        ({"line_search_max_iter": 0}, r"Invalid line_search_max_iter: 0; expected >= 1"),
        ({"line_search_batched": 1}, r"Invalid line_search_batched: 1 \(int\); expected true or false"),
        ({"learning_rate": -1.0}, r"Invalid learning_rate: -1.0; expected > 0"),
        ({"curvature": "exact"}, r"Invalid curvature 'exact': the dense Fisher needs an actor of at most 2000"),
    ],
)
def test_bad_inputs_are_named(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _model(TRPO, **kwargs)


def test_numpy_integers_are_accepted_as_sb3_accepts_them() -> None:
    model = _model(TRPO, n_steps=np.int64(32), cg_max_steps=np.int32(5))
    assert model.n_steps == 32 and model.cg_max_steps == 5 and type(model.config.cg_max_steps) is int


def test_npg_has_no_line_search_options() -> None:
    with pytest.raises(ValueError, match="Unknown hyperparameter 'line_search_max_iter' for npg"):
        _model(NPG, line_search_max_iter=3)

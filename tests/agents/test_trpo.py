"""TRPO end to end: learning bars, trust-region invariants, save/load, determinism."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from trpo_lab.agents.trpo import TRPO
from trpo_lab.logging import TIMING_COLUMNS
from trpo_lab.presets import load_preset


def _preset_agent(env_id: str, seed: int = 0, **overrides: object) -> tuple[TRPO, int]:
    hyperparameters, run = load_preset("trpo", env_id)
    hyperparameters.update(overrides)
    agent = TRPO(env_id, n_envs=int(run.get("n_envs", 8)), seed=seed, **hyperparameters)
    return agent, int(run["total_timesteps"])


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.mark.slow
def test_trpo_solves_cartpole_within_100k_steps() -> None:
    agent, budget = _preset_agent("CartPole-v1")
    assert budget <= 100_000
    agent.learn(budget)
    assert agent.num_timesteps <= 100_000 + agent.n_envs * agent.config.n_steps
    assert agent.evaluate(10).mean() >= 475


@pytest.mark.slow
def test_trpo_learns_pendulum_within_200k_steps() -> None:
    agent, budget = _preset_agent("Pendulum-v1")
    assert budget <= 200_000
    agent.learn(budget)
    assert agent.evaluate(10).mean() >= -300


def test_every_update_respects_the_trust_region(tmp_path: Path) -> None:
    agent = TRPO("CartPole-v1", n_envs=4, seed=1, n_steps=64, target_kl=0.005, n_critic_updates=1)
    kls: list[float] = []
    agent.learn(2_000, callback=lambda a, m: kls.append(m["train/kl"]) or None)
    assert len(kls) >= 5
    assert all(0.0 <= kl <= 0.005 for kl in kls)


def test_failed_line_search_keeps_the_policy() -> None:
    # A step scaled to a radius of 1e-3 is searched within 1e-12: every candidate is rejected.
    wide = TRPO("CartPole-v1", n_envs=2, seed=0, n_steps=32, target_kl=1e-3)
    tight = TRPO("CartPole-v1", n_envs=2, seed=0, n_steps=32, line_search_max_iter=1, target_kl=1e-12)
    wide.collect_rollout()
    batch = wide.buffer.batch()
    obs, advantages = wide.policy.preprocess(batch.observations), wide._advantages(batch)
    tight.policy.load_state_dict(wide.policy.state_dict())
    step = tight.natural_step(obs, batch, advantages)
    assert step.full_step.norm() > 0
    wide_step = wide.natural_step(obs, batch, advantages)
    step = step._replace(full_step=wide_step.full_step, expected_improvement=wide_step.expected_improvement)
    before = [p.detach().clone() for p in tight.policy.actor_parameters()]
    metrics = tight.apply_step(step, obs, batch, advantages)
    assert metrics["train/linesearch_success"].item() == 0.0
    for p, q in zip(tight.policy.actor_parameters(), before):
        assert torch.equal(p, q)


def test_update_returns_device_tensors_and_keeps_no_state_between_steps() -> None:
    agent = TRPO("CartPole-v1", n_envs=2, seed=0, n_steps=32)
    agent.collect_rollout()
    batch = agent.buffer.batch()
    agent.reducer.share_batch_sizes(batch.size)
    metrics = agent.update(batch)
    assert metrics and all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in metrics.values())
    assert {"train/kl", "train/cg_residual", "train/cg_iterations", "train/surrogate"} <= set(metrics)
    assert not hasattr(agent, "_old")


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_save_load_predict_round_trip(tmp_path: Path, env_id: str) -> None:
    agent = TRPO(env_id, n_envs=2, seed=0, n_steps=64, normalize_obs=True)
    agent.learn(512)
    agent.save(tmp_path / "agent.pt")
    loaded = TRPO.load(tmp_path / "agent.pt")
    obs = np.stack([agent.observation_space.sample() for _ in range(16)])
    np.testing.assert_array_equal(agent.predict(obs), loaded.predict(obs))
    np.testing.assert_array_equal(agent.predict(obs[0]), loaded.predict(obs[0]))
    assert loaded.num_timesteps == agent.num_timesteps
    assert loaded.config == agent.config


def test_load_rejects_other_algorithm_and_other_env(tmp_path: Path) -> None:
    agent = TRPO("CartPole-v1", n_envs=1, seed=0, n_steps=16)
    agent.save(tmp_path / "agent.pt")
    with pytest.raises(ValueError, match="does not match"):
        TRPO.load(tmp_path / "agent.pt", env="Acrobot-v1")
    data = torch.load(tmp_path / "agent.pt", weights_only=True)
    data["algo"] = "ppo"
    torch.save(data, tmp_path / "ppo.pt")
    with pytest.raises(ValueError, match="holds a 'ppo' agent"):
        TRPO.load(tmp_path / "ppo.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="Cannot load checkpoint"):
        TRPO.load(tmp_path / "bad.pt")


def _progress_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "progress.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in rows]


def test_same_seed_gives_identical_progress(tmp_path: Path) -> None:
    for name in ("a", "b"):
        TRPO("Pendulum-v1", n_envs=2, seed=7, n_steps=64, normalize_obs=True).learn(
            1_000, run_dir=tmp_path / name, tensorboard=False
        )
    rows_a, rows_b = _progress_rows(tmp_path / "a"), _progress_rows(tmp_path / "b")
    assert len(rows_a) >= 7
    assert rows_a == rows_b
    TRPO("Pendulum-v1", n_envs=2, seed=8, n_steps=64, normalize_obs=True).learn(
        1_000, run_dir=tmp_path / "c", tensorboard=False
    )
    assert _progress_rows(tmp_path / "c") != rows_a


def test_batched_and_sequential_line_search_agree() -> None:
    results = []
    for batched in (False, True):
        agent = TRPO("CartPole-v1", n_envs=2, seed=3, n_steps=64, line_search_batched=batched, n_critic_updates=1)
        agent.learn(640)
        results.append(torch.nn.utils.parameters_to_vector(agent.policy.actor_parameters()))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_func_fvp_backend_matches_autograd() -> None:
    steps = []
    for backend in ("autograd", "func"):
        agent = TRPO("Pendulum-v1", n_envs=2, seed=3, n_steps=32, fvp_backend=backend)
        agent.collect_rollout()
        batch = agent.buffer.batch()
        obs = agent.policy.preprocess(batch.observations)
        steps.append(agent.natural_step(obs, batch, agent._advantages(batch)).full_step)
    torch.testing.assert_close(steps[0], steps[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_kl": 0}, "Invalid target_kl: 0.0; expected > 0"),
        ({"gamma": 1.5}, r"Invalid gamma: 1.5; expected in \(0, 1\]"),
        ({"cg_max_steps": 0}, "Invalid cg_max_steps: 0; expected >= 1"),
        ({"n_steps": "64"}, "Invalid n_steps: '64' \\(str\\); expected an integer"),
        ({"line_search_shrinking_factor": 1.0}, r"Invalid line_search_shrinking_factor: 1.0; expected in \(0, 1\)"),
        ({"learning_rate": -1e-3}, "Invalid learning_rate: -0.001; expected > 0"),
        ({"cg_dampin": 0.1}, "Unknown hyperparameter 'cg_dampin' for trpo; did you mean cg_damping"),
    ],
)
def test_bad_hyperparameters_are_named(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TRPO("CartPole-v1", n_envs=1, **kwargs)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_the_critic_fit_takes_the_hand_written_gradient_and_lands_where_autograd_does(
    env_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain MLP critic is fitted through mlp_mse_gradients, one call per minibatch step; the
    fit ends where the autograd fit ends (float32 rounding aside) with the same value loss."""
    import trpo_lab.agents.trpo as trpo_module

    kwargs = {"n_envs": 2, "seed": 0, "n_steps": 64, "batch_size": 32, "n_critic_updates": 5}
    fits: dict[str, TRPO] = {}
    metrics: dict[str, dict[str, torch.Tensor]] = {}
    calls: list[int] = []
    original = trpo_module.mlp_mse_gradients
    for path in ("by hand", "autograd"):
        if path == "autograd":
            monkeypatch.setattr(trpo_module, "mlp_mse_gradients", lambda *args: None)
        else:
            monkeypatch.setattr(trpo_module, "mlp_mse_gradients", lambda *args: calls.append(1) or original(*args))
        agent = TRPO(env_id, **kwargs)
        agent.collect_rollout()
        metrics[path] = agent.fit_critic(agent.buffer.batch())
        fits[path] = agent
    assert len(calls) == 5 * (2 * 64 // 32)
    for mine, theirs in zip(fits["by hand"].policy.critic_parameters(), fits["autograd"].policy.critic_parameters(),
                            strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(metrics["by hand"]["train/value_loss"], metrics["autograd"]["train/value_loss"],
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
@pytest.mark.parametrize("sub_sampling_factor", [1, 3])
def test_the_natural_step_takes_the_hand_written_fisher_product_and_matches_autograds(
    env_id: str, sub_sampling_factor: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain MLP actor's Fisher products come from actor_fisher_product, on the sub-sampled
    states; the natural step (CG direction, scaled to the KL radius) is the autograd one's."""
    from trpo_lab.nn.policy import ActorCritic

    kwargs = {"n_envs": 2, "seed": 0, "n_steps": 64, "sub_sampling_factor": sub_sampling_factor}
    steps: dict[str, torch.Tensor] = {}
    rows: list[int] = []
    original = ActorCritic.actor_fisher_product
    for path in ("by hand", "autograd"):
        if path == "autograd":
            monkeypatch.setattr(ActorCritic, "actor_fisher_product", lambda self, obs: None)
        else:
            monkeypatch.setattr(ActorCritic, "actor_fisher_product",
                                lambda self, obs: rows.append(obs.shape[0]) or original(self, obs))
        agent = TRPO(env_id, **kwargs)
        agent.collect_rollout()
        batch = agent.buffer.batch()
        obs = agent.policy.preprocess(batch.observations)
        steps[path] = agent.natural_step(obs, batch, agent._advantages(batch)).full_step
        agent.close()
    assert rows == [-(-batch.size // sub_sampling_factor)]
    assert steps["by hand"].norm() > 0
    torch.testing.assert_close(steps["by hand"], steps["autograd"], rtol=2e-3, atol=1e-5)

"""Curvature backends of the trust-region step, the L-BFGS critic and the exact diagnostics.

Every backend is checked against the dense natural gradient (F + γI)⁻¹g of the real
ActorCritic policy on a real rollout; the learning tests train TRPO with each backend on
CartPole-v1 and stop at the first evaluation that clears the bar.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from trpo_lab.agents.curvature import (
    EXACT_MAX_PARAMETERS,
    CGCurvature,
    Curvature,
    CurvatureProblem,
    ShampooCurvature,
    exact_cost,
    exact_parameter_limit,
    make_curvature,
)
from trpo_lab.agents.npg import NPG
from trpo_lab.agents.trpo import TRPO
from trpo_lab.config import TRPOConfig, parse_set_option
from trpo_lab.optim._flat import flat_params, total_numel
from trpo_lab.optim.exact import cosine_similarity, explicit_fisher, newton_step, output_space_fisher
from trpo_lab.optim.trust_region import Direction, FisherVectorProduct
from trpo_lab.presets import load_preset

TINY = {"net_arch": {"pi": [8], "vf": [16]}}
ENVS = ["CartPole-v1", "Pendulum-v1"]  # Discrete and Box actions


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@dataclass
class Seen:
    grad: Tensor
    fvp: FisherVectorProduct
    problem: CurvatureProblem


@dataclass
class Recorder(Curvature):
    """Wraps an agent's backend and keeps what natural_step hands it."""

    inner: Curvature
    problems: list[Seen] = field(default_factory=list)

    def direction(self, grad: Tensor, fvp: FisherVectorProduct, problem: CurvatureProblem) -> Direction:
        self.problems.append(Seen(grad, fvp, problem))
        return self.inner.direction(grad, fvp, problem)


def _step_problem(agent: TRPO) -> tuple[Seen, Tensor]:
    """One rollout and natural_step; what the backend saw and the scaled step."""
    recorder = Recorder(agent.curvature)
    agent.curvature = recorder
    agent.collect_rollout()
    batch = agent.buffer.batch()
    obs = agent.policy.preprocess(batch.observations)
    step = agent.natural_step(obs, batch, agent._advantages(batch))
    agent.curvature = recorder.inner
    return recorder.problems[-1], step.full_step


def _tiny_agent(env_id: str, **hyperparameters: Any) -> TRPO:
    return TRPO(env_id, n_envs=4, seed=0, n_steps=128, policy_kwargs=TINY, **hyperparameters)


# ---------------------------------------------------------------------------------- exact references
@pytest.mark.parametrize("env_id", ENVS)
def test_exact_backend_equals_cg_run_to_convergence(env_id: str) -> None:
    agent = _tiny_agent(env_id, curvature="exact")
    seen, _ = _step_problem(agent)
    size = seen.grad.numel()
    exact = agent.curvature.direction(seen.grad, seen.fvp, seen.problem).direction
    converged = CGCurvature(agent.policy.actor_parameters(), agent.config.replace(cg_max_steps=size, cg_tol=0.0))
    cg = converged.direction(seen.grad, seen.fvp, seen.problem)
    assert float(cosine_similarity(exact, cg.direction)) > 0.9999
    torch.testing.assert_close(seen.fvp(exact), seen.grad, rtol=1e-3, atol=1e-4 * float(seen.grad.norm()))
    # The natural gradient is not the plain one, so the check above compares different things.
    assert float(cosine_similarity(exact, seen.grad)) < 0.99
    assert float(cg.metrics["cg_residual"]) < 1e-3 * float(seen.grad.norm())
    # CG hands over (F + γI) s = g − r, so natural_step needs no further product for sᵀFs.
    assert cg.product is not None
    torch.testing.assert_close(cg.product, seen.fvp(cg.direction), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("env_id", ENVS)
def test_every_backend_step_is_scaled_to_the_kl_radius(env_id: str) -> None:
    """½ βsᵀFβs = δ whatever produced s (one code path after the direction)."""
    for curvature in ("cg", "kfac", "shampoo", "exact"):
        agent = _tiny_agent(env_id, curvature=curvature, target_kl=0.01)
        seen, full_step = _step_problem(agent)
        quadratic_kl = 0.5 * torch.dot(full_step, seen.fvp(full_step))
        assert float(quadratic_kl) == pytest.approx(0.01, rel=1e-3), curvature


@pytest.mark.parametrize("env_id", ENVS)
@pytest.mark.parametrize("curvature", ["kfac", "shampoo"])
def test_kfac_and_shampoo_directions_point_along_the_natural_gradient(
    env_id: str, curvature: str, record_property: Any
) -> None:
    agent = _tiny_agent(env_id, curvature=curvature, diagnostics={"exact_every": 1})
    cosines: list[float] = []
    agent.learn(10 * 4 * 128, callback=lambda a, m: cosines.append(m["train/exact_cosine"]) or len(cosines) < 4)
    assert len(cosines) == 4
    record_property("exact_cosines", [round(c, 3) for c in cosines])
    print(f"{curvature} {env_id} cosine with (F + γI)⁻¹g over 4 updates: {[round(c, 3) for c in cosines]}")
    assert all(0.0 < c <= 1.0 + 1e-6 for c in cosines)


def test_newton_solves_the_quadratic_critic_fit_in_one_step_and_lbfgs_reaches_it() -> None:
    """A linear critic makes the full-batch value loss a quadratic: Newton's step lands on its
    least-squares minimiser, and the L-BFGS critic fit converges to the same point."""
    agent = TRPO(
        "CartPole-v1", n_envs=4, seed=0, n_steps=128, critic_optimizer="lbfgs",
        policy_kwargs={"net_arch": {"pi": [8], "vf": []}},
    )
    agent.collect_rollout()
    batch = agent.buffer.batch()
    obs = agent.policy.preprocess(batch.observations).double()
    returns = batch.returns.double()
    critic = agent.policy.critic_parameters()
    theta = flat_params(critic).double()

    def loss(flat: Tensor) -> Tensor:
        weight, bias = flat[:-1], flat[-1]
        return nn.functional.mse_loss(obs @ weight + bias, returns)

    design = torch.cat([obs, torch.ones(len(obs), 1, dtype=obs.dtype)], dim=1)
    least_squares = torch.linalg.lstsq(design, returns.unsqueeze(1)).solution.squeeze(1)
    torch.testing.assert_close(theta - newton_step(loss, theta), least_squares, rtol=1e-8, atol=1e-8)
    before = float(loss(theta))
    metrics = agent.fit_critic(batch)
    fitted = flat_params(critic).double()
    assert float(loss(fitted)) == pytest.approx(float(loss(least_squares)), rel=1e-3)
    assert float(loss(fitted)) < 0.5 * before
    assert 1 <= metrics["train/critic_lbfgs_evals"].item() <= 1.25 * agent.config.critic_lbfgs_max_iter + 1


@pytest.mark.parametrize("curvature", ["kfac", "shampoo", "exact"])
def test_npg_takes_the_full_step_of_any_backend(curvature: str) -> None:
    """NPG shares natural_step: its unsearched step lands near the KL radius with every backend."""
    kls: list[float] = []
    agent = NPG(
        "CartPole-v1", n_envs=4, seed=0, n_steps=128, policy_kwargs=TINY, curvature=curvature,
        critic_optimizer="lbfgs", target_kl=0.01,
    )
    agent.learn(3 * 4 * 128, callback=lambda a, m: kls.append(m["train/kl"]) or None)
    assert len(kls) >= 3
    assert all(0.002 < kl < 0.05 for kl in kls), kls


def test_kfac_backend_is_built_with_the_agents_reducer_and_only_the_actors_layers() -> None:
    agent = _tiny_agent("Pendulum-v1", curvature="kfac")
    kfac = agent.curvature.kfac  # type: ignore[attr-defined]
    assert kfac.statistics_reducer == agent.reducer.weighted_means
    assert {id(p) for p in kfac.param_groups[0]["params"]} == {id(p) for p in agent.policy.actor.parameters()}
    with pytest.raises(ValueError, match="Invalid module: None"):
        make_curvature(agent.config, agent.policy.actor_parameters())
    with pytest.raises(ValueError, match="are not actor parameters"):
        make_curvature(agent.config, agent.policy.actor_parameters(), agent.policy.critic)


# ---------------------------------------------------------------------------------- diagnostics
def test_exact_cosine_is_logged_every_n_updates() -> None:
    rows: list[dict[str, float]] = []
    # cg_tol stops CG once converged: run on past convergence with tol 0, float32 CG loses conjugacy
    agent = _tiny_agent("CartPole-v1", cg_max_steps=100, cg_tol=1e-10, diagnostics={"exact_every": 2})
    agent.learn(5 * 4 * 128, callback=lambda a, m: rows.append(m) or None)
    logged = [i for i, row in enumerate(rows) if "train/exact_cosine" in row]
    assert logged == [0, 2, 4]
    assert all(rows[i]["train/exact_cosine"] > 0.9999 for i in logged)  # converged CG is exact


def test_diagnostics_from_the_cli_set_option() -> None:
    overrides: dict[str, Any] = {}
    parse_set_option("diagnostics.exact_every=5", overrides)
    parse_set_option("curvature=kfac", overrides)
    config = TRPOConfig.from_dict(overrides)
    assert config.exact_every == 5 and config.curvature == "kfac"
    assert TRPOConfig().exact_every == 0


def test_dense_fisher_refuses_policies_beyond_its_memory_and_time_limits() -> None:
    big = {"policy_kwargs": {"net_arch": {"pi": [128, 64], "vf": [16]}}}
    agent = TRPO("CartPole-v1", n_envs=1, seed=0, n_steps=8, **big)
    size = total_numel(agent.policy.actor_parameters())
    assert size > EXACT_MAX_PARAMETERS == exact_parameter_limit()
    memory, seconds = exact_cost(size)
    for hyperparameters in ({"curvature": "exact"}, {"diagnostics": {"exact_every": 1}}):
        with pytest.raises(
            ValueError,
            match=rf"at most {EXACT_MAX_PARAMETERS} parameters, this one has {size} "
            rf"\(about {memory / 2**20:.0f} MB and {seconds:.0f} s per update",
        ):
            TRPO("CartPole-v1", n_envs=1, seed=0, n_steps=8, **big, **hyperparameters)


def test_exact_limit_follows_memory_and_time() -> None:
    assert exact_parameter_limit(memory_bytes=16 * 100**2, max_seconds=1e9) == 100  # 4 float32 P x P matrices
    assert exact_parameter_limit(memory_bytes=1e18, max_seconds=1e-4) == round((1e-4 * 1e10) ** (1 / 3))
    memory, _ = exact_cost(4_610)
    assert memory == 16 * 4_610**2 and EXACT_MAX_PARAMETERS >= 4_610


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_exact_curvature_runs_with_the_default_actor(env_id: str) -> None:
    """The default [64, 64] actor (4,610 / 4,545 parameters) is within the limit, and the
    output-space Fisher the update uses equals the Hessian of the mean KL."""
    agent = TRPO(env_id, n_envs=1, seed=0, n_steps=16, curvature="exact")
    agent.learn(16)
    assert agent.num_updates == 1 and np.isfinite(flat_params(agent.policy.actor_parameters()).detach().numpy()).all()
    small = TRPO(env_id, n_envs=1, seed=0, n_steps=8, policy_kwargs={"net_arch": [8]})
    obs = torch.randn(6, small.observation_space.shape[0])
    policy, dist = small.policy, small.policy.distribution
    theta = flat_params(policy.actor_parameters()).detach()
    old = policy.dist_params(obs).detach()
    dense = output_space_fisher(
        lambda flat, x: policy.dist_params_from_flat(flat, x.unsqueeze(0)).squeeze(0),
        lambda a, b: dist.kl(a.unsqueeze(0), b.unsqueeze(0)).squeeze(0),
        theta,
        obs,
    )
    reference = explicit_fisher(lambda flat: dist.kl(old, policy.dist_params_from_flat(flat, obs)).mean(), theta)
    torch.testing.assert_close(dense, reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("hyperparameters", "pattern"),
    [
        ({"curvature": "newton"}, r"Invalid curvature: 'newton'; expected one of 'cg', 'kfac', 'shampoo', 'exact'"),
        ({"critic_optimizer": "sgd"}, r"Invalid critic_optimizer: 'sgd'; expected one of 'adam', 'lbfgs'"),
        ({"diagnostics": {"exact_cosine": 3}}, r"Invalid diagnostics key 'exact_cosine'.*\['exact_every'\]"),
        ({"diagnostics": {"exact_every": -1}}, r"Invalid diagnostics.exact_every: -1; expected an integer >= 0"),
        ({"critic_lbfgs_max_iter": 0}, r"Invalid critic_lbfgs_max_iter: 0; expected >= 1"),
    ],
)
def test_bad_values_name_field_value_and_allowed(hyperparameters: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        TRPOConfig(**hyperparameters)


# ---------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("curvature", ["kfac", "shampoo"])
def test_backend_state_survives_save_and_load(tmp_path: Path, curvature: str) -> None:
    """The loaded agent's next direction equals the original's; a fresh backend's would not."""
    agent = _tiny_agent("Pendulum-v1", curvature=curvature)
    agent.learn(3 * 4 * 128)
    agent.save(tmp_path / "agent.pt")
    loaded = TRPO.load(tmp_path / "agent.pt")
    agent.collect_rollout()
    batch = agent.buffer.batch()
    obs = agent.policy.preprocess(batch.observations)
    advantages = agent._advantages(batch)
    loaded.generator.set_state(agent.generator.get_state())  # K-FAC samples its Fisher actions from it
    original = agent.natural_step(obs, batch, advantages).full_step
    restored = loaded.natural_step(obs, batch, advantages).full_step
    torch.testing.assert_close(restored, original)
    loaded.curvature = make_curvature(loaded.config, loaded.policy.actor_parameters(), loaded.policy.actor)
    assert not torch.allclose(loaded.natural_step(obs, batch, advantages).full_step, original)


def test_lbfgs_critic_state_is_checkpointed(tmp_path: Path) -> None:
    agent = _tiny_agent("CartPole-v1", critic_optimizer="lbfgs")
    agent.learn(2 * 4 * 128)
    agent.save(tmp_path / "agent.pt")
    loaded = TRPO.load(tmp_path / "agent.pt")
    assert isinstance(loaded.critic_optimizer, torch.optim.LBFGS)
    saved, restored = agent.critic_optimizer.state_dict(), loaded.critic_optimizer.state_dict()
    assert restored["param_groups"] == saved["param_groups"]
    assert restored["state"][0]["func_evals"] == saved["state"][0]["func_evals"] > 0
    torch.testing.assert_close(restored["state"][0]["d"], saved["state"][0]["d"])


# ---------------------------------------------------------------------------------- learning
LEARNING_CASES = {
    "kfac": {"curvature": "kfac"},
    "shampoo": {"curvature": "shampoo"},
    # the dense Fisher needs a small actor; the critic keeps the preset's size
    "exact": {"curvature": "exact", "policy_kwargs": {"net_arch": {"pi": [16], "vf": [64, 64]}}},
    "lbfgs-critic": {"critic_optimizer": "lbfgs"},
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(LEARNING_CASES))
def test_trpo_solves_cartpole_within_150k_steps(case: str) -> None:
    """Evaluate (10 deterministic episodes) once the rollout return passes 300; stop at >= 475."""
    hyperparameters, _ = load_preset("trpo", "CartPole-v1")
    agent = TRPO("CartPole-v1", n_envs=8, seed=0, **{**hyperparameters, **LEARNING_CASES[case]})
    evaluations: list[tuple[int, float]] = []

    def evaluate_when_promising(agent: TRPO, metrics: dict[str, float]) -> bool:
        if metrics["rollout/return_mean"] < 300:
            return True
        evaluations.append((agent.num_timesteps, float(agent.evaluate(10).mean())))
        return evaluations[-1][1] < 475

    agent.learn(150_000, callback=evaluate_when_promising)
    assert evaluations, "the rollout return never reached 300"
    steps, best = evaluations[-1]
    assert best >= 475, evaluations
    assert steps <= 150_000 + agent.n_envs * agent.config.n_steps


def _shampoo_directions(overrides: dict[str, object], scale: float, monkeypatch: pytest.MonkeyPatch) -> list[Tensor]:
    """Shampoo directions for 6 successive gradients of the default [64, 64] actor whose
    layers' gradients differ by orders of magnitude (as a policy gradient's do)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2))
    params = list(net.parameters())
    with monkeypatch.context() as patch:
        for name, value in overrides.items():
            patch.setattr(ShampooCurvature, name, value)
        backend = ShampooCurvature(params, TRPOConfig(curvature="shampoo"))
    layer_scales = [1e-4, 1e-4, 1e-3, 1e-3, 1e-1, 1e-1]
    directions = []
    for _ in range(6):
        grad = torch.cat([torch.randn(p.numel()) * s * scale for p, s in zip(params, layer_scales)])
        directions.append(backend.direction(grad, lambda v: v, CurvatureProblem(theta=grad)).direction)
    return directions


def test_shampoo_direction_keeps_each_layers_share_and_ignores_the_gradient_scale(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Why ``curvature="shampoo"`` failed on CartPole-v1 with the default actor: without
    grafting, L^(-1/4) G R^(-1/4) has about the same norm for every layer whatever its
    gradient, so layers with 1000x smaller (noisier) gradients take as large a share of the
    KL-scaled step as the informative ones; and the absolute ε = 1e-8 made the amplification
    of unseen directions depend on the gradients' scale. With per-layer SGD grafting each
    layer keeps its gradient's norm, and the relative ε makes the direction scale-free."""
    def output_share(directions: list[Tensor]) -> float:
        last = directions[-1]
        return float(last[-130:].square().sum() / last.square().sum())  # the output layer: 64 * 2 + 2

    fixed = _shampoo_directions({}, 1.0, monkeypatch)
    old = _shampoo_directions(
        {"BETA2": 0.9, "EPSILON": 1e-8, "RELATIVE_EPSILON": False, "GRAFTING": "none"}, 1.0, monkeypatch
    )
    assert output_share(fixed) > 0.99  # as in the gradient (its output layer holds > 99% of the norm)
    assert output_share(old) < 0.5  # the cause: the tiny-gradient layers dominate the step
    rescaled = _shampoo_directions({}, 1e-3, monkeypatch)
    for a, b in zip(fixed, rescaled, strict=True):
        torch.testing.assert_close(b / b.norm(), a / a.norm(), rtol=1e-3, atol=1e-5)

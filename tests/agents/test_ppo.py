"""PPO: the clipped objective against a hand computation, the update loop, learning, save/load."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from trpo_lab.agents.metrics import kl_sample, update_seed
from trpo_lab.agents.ppo import PPO, PPOGradient, optimizer_class, ppo_loss, ppo_loss_by_hand
from trpo_lab.nn.acting import NumpyActor
from trpo_lab.presets import load_preset

# A batch of four samples that hits every branch of the clipped surrogate with clip_range 0.2:
#   0: A > 0, ratio 1.5  -> clipped at 1.2 (no gradient)
#   1: A > 0, ratio 0.5  -> unclipped (min picks r·A)
#   2: A < 0, ratio 0.5  -> clipped at 0.8 (no gradient)
#   3: A < 0, ratio 1.5  -> unclipped (min picks r·A)
RATIOS = [1.5, 0.5, 0.5, 1.5]
ADVANTAGES = [2.0, 1.0, -1.0, -3.0]
OLD_LOG_PROBS = [-1.0, -0.5, -2.0, -0.3]


def _inputs(values: list[float], old_values: list[float], returns: list[float]) -> dict[str, torch.Tensor]:
    old = torch.tensor(OLD_LOG_PROBS, dtype=torch.float64)
    log_probs = (old + torch.log(torch.tensor(RATIOS, dtype=torch.float64))).requires_grad_()
    return {
        "log_probs": log_probs,
        "old_log_probs": old,
        "advantages": torch.tensor(ADVANTAGES, dtype=torch.float64),
        "values": torch.tensor(values, dtype=torch.float64, requires_grad=True),
        "old_values": torch.tensor(old_values, dtype=torch.float64),
        "returns": torch.tensor(returns, dtype=torch.float64),
        "entropy": torch.tensor([0.7, 0.6, 0.5, 0.4], dtype=torch.float64, requires_grad=True),
    }


def test_clipped_surrogate_and_its_gradient_equal_a_hand_computation() -> None:
    x = _inputs(values=[1.0, 2.0, 0.0, -1.0], old_values=[0.0, 0.0, 0.0, 0.0], returns=[2.0, 1.0, 0.5, -1.0])
    loss = ppo_loss(**x, clip_range=0.2, vf_coef=0.5, ent_coef=0.01)
    # min(r·A, clip(r)·A) per sample: min(3.0, 2.4), min(0.5, 0.5), min(-0.5, -0.8), min(-4.5, -3.6)
    expected_policy = -(2.4 + 0.5 - 0.8 - 4.5) / 4  # = 0.6
    expected_value = ((2 - 1) ** 2 + (1 - 2) ** 2 + 0.5**2 + 0.0) / 4  # = 0.5625
    expected_entropy = (0.7 + 0.6 + 0.5 + 0.4) / 4  # = 0.55
    assert loss.policy.item() == pytest.approx(expected_policy)
    assert loss.value.item() == pytest.approx(expected_value)
    assert loss.entropy.item() == pytest.approx(expected_entropy)
    assert loss.total.item() == pytest.approx(0.6 + 0.5 * 0.5625 - 0.01 * 0.55)
    assert loss.clip_fraction.item() == pytest.approx(1.0)  # every |r - 1| = 0.5 > 0.2
    # approx KL = mean(r - 1 - log r)
    assert loss.approx_kl.item() == pytest.approx(np.mean([r - 1 - math.log(r) for r in RATIOS]))

    loss.total.backward()
    # d/d log π of -min(...)/N: clipped samples give 0, unclipped -r·A/N (d r / d log π = r)
    assert x["log_probs"].grad.tolist() == pytest.approx([0.0, -0.5 * 1.0 / 4, 0.0, -1.5 * -3.0 / 4])
    # d/dV of vf_coef · mean((R - V)²) = vf_coef · 2 (V - R) / N
    assert x["values"].grad.tolist() == pytest.approx([0.5 * 2 * (v - r) / 4 for v, r in [(1, 2), (2, 1), (0, 0.5), (-1, -1)]])
    assert x["entropy"].grad.tolist() == pytest.approx([-0.01 / 4] * 4)


def test_clipping_inside_the_range_changes_nothing() -> None:
    x = _inputs(values=[0.0] * 4, old_values=[0.0] * 4, returns=[0.0] * 4)
    loss = ppo_loss(**x, clip_range=0.6)  # every ratio in [0.4, 1.6]: plain importance-sampled surrogate
    assert loss.policy.item() == pytest.approx(-np.mean(np.multiply(RATIOS, ADVANTAGES)))
    assert loss.clip_fraction.item() == 0.0


def test_value_clipping_regresses_the_clipped_prediction() -> None:
    # V - V_old = [1.0, 0.05, -0.5, 0.0] with clip_range_vf 0.2 -> [0.2, 0.05, -0.2, 0.0]
    x = _inputs(values=[1.0, 0.05, -0.5, 0.0], old_values=[0.0] * 4, returns=[1.0, 1.0, -1.0, 0.5])
    loss = ppo_loss(**x, clip_range=0.2, clip_range_vf=0.2, vf_coef=1.0)
    clipped = [0.2, 0.05, -0.2, 0.0]
    returns = [1.0, 1.0, -1.0, 0.5]
    assert loss.value.item() == pytest.approx(np.mean([(r - v) ** 2 for r, v in zip(returns, clipped)]))
    loss.value.backward()
    # only the samples inside the clip range (1 and 3) pass a gradient
    assert x["values"].grad.tolist() == pytest.approx([0.0, 2 * (0.05 - 1.0) / 4, 0.0, 2 * (0.0 - 0.5) / 4])


def test_loss_matches_an_independent_formula_on_random_data() -> None:
    gen = torch.Generator().manual_seed(3)
    n = 32
    old = torch.randn(n, generator=gen, dtype=torch.float64)
    new = (old + 0.4 * torch.randn(n, generator=gen, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(n, generator=gen, dtype=torch.float64)
    values = torch.randn(n, generator=gen, dtype=torch.float64)
    loss = ppo_loss(new, old, adv, values, values, values, torch.zeros(n, dtype=torch.float64), clip_range=0.1)
    loss.policy.backward()
    ratio = np.exp(new.detach().numpy() - old.numpy())
    a = adv.numpy()
    # the pessimistic bound written as SB3/OpenAI write it: max(-rA, -clip(r)A)
    per_sample = np.maximum(-ratio * a, -np.clip(ratio, 0.9, 1.1) * a)
    assert loss.policy.item() == pytest.approx(per_sample.mean())
    # the gradient vanishes exactly where clipping binds: A > 0 with r > 1 + ε, or A < 0 with r < 1 - ε
    clipped = ((a > 0) & (ratio > 1.1)) | ((a < 0) & (ratio < 0.9))
    assert 0 < clipped.sum() < n
    np.testing.assert_allclose(new.grad.numpy(), np.where(clipped, 0.0, -ratio * a / n), atol=1e-12)


@pytest.mark.parametrize("clip_range_vf", [None, 0.2])
@pytest.mark.parametrize("ratios", [RATIOS, [1.0, 1.1, 0.9, 1.0]], ids=["every-branch", "ties-inside-the-range"])
def test_loss_by_hand_equals_autograds(clip_range_vf: float | None, ratios: list[float]) -> None:
    """The written-out derivatives of the PPO loss: every branch of the clipped surrogate,
    ratios exactly at 1 and inside the range (min's ties), the value clip on both sides."""
    x = _inputs(values=[1.0, 0.05, -0.5, 0.0], old_values=[0.0] * 4, returns=[1.0, 1.0, -1.0, 0.5])
    x["log_probs"] = (x["old_log_probs"] + torch.log(torch.tensor(ratios, dtype=torch.float64))).requires_grad_()
    terms = {"clip_range": 0.2, "clip_range_vf": clip_range_vf, "vf_coef": 0.7, "ent_coef": 0.03}
    expected = ppo_loss(**x, **terms)
    grads = torch.autograd.grad(expected.total, [x["log_probs"], x["entropy"], x["values"]])
    loss, *ours = ppo_loss_by_hand(**{k: v.detach() for k, v in x.items()}, **terms)
    for field in expected._fields:
        torch.testing.assert_close(getattr(loss, field), getattr(expected, field).detach(), rtol=1e-14, atol=1e-15)
    for mine, theirs in zip(ours, grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("env", ["CartPole-v1", "Pendulum-v1", "multidiscrete"])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("clip_range_vf", [None, 0.05])
def test_minibatch_gradient_by_hand_equals_autograds(env: str, activation: str, clip_range_vf: float | None) -> None:
    """A minibatch's loss and gradient for every parameter, by hand (Discrete, Box) or with
    autograd only from the loss to the networks' outputs (MultiDiscrete), equal autograd's
    through the whole policy, after the policy moved away from the rollout's."""
    from test_sync_free import MultiDiscreteTarget

    agent = PPO(MultiDiscreteTarget if env == "multidiscrete" else env, n_envs=2, seed=1, n_steps=32,
                clip_range_vf=clip_range_vf, ent_coef=0.01, policy_kwargs={"activation_fn": activation})
    agent.collect_rollout()
    with torch.no_grad():
        for param in agent.policy.parameters():
            param.add_(0.1 * torch.randn_like(param))  # ratios away from 1
    minibatch = agent.buffer.batch().slice(0, 48)
    obs = agent.policy.preprocess(minibatch.observations)
    with torch.no_grad():
        log_probs = agent.policy.distribution.log_prob(agent.policy.dist_params(obs), minibatch.actions)
        # between the two middle |r − 1|: half the ratios clipped, none exactly at the edge
        middle = (log_probs - minibatch.log_probs).exp().sub(1).abs().sort().values[23:25]
        agent.current_values["clip_range"] = float(middle.mean())
    expected = agent._minibatch_loss(minibatch, obs)
    assert not isinstance(expected, PPOGradient)
    parameters = list(agent.policy.parameters())
    expected_grads = torch.autograd.grad(expected.total, parameters)
    ours = agent._minibatch_loss(minibatch, obs, by_hand=True)
    assert isinstance(ours, PPOGradient)
    assert 0 < float(ours.loss.clip_fraction) < 1
    for field in expected._fields:
        torch.testing.assert_close(getattr(ours.loss, field), getattr(expected, field).detach())
    by_param = {id(param): grad for param, grad in ours.grads}
    assert len(by_param) == len(ours.grads) == len(parameters)
    for param, grad in zip(parameters, expected_grads, strict=True):
        assert not by_param[id(param)].requires_grad
        # float32: differences of a few roundings of the tensor's largest entries
        torch.testing.assert_close(by_param[id(param)], grad, rtol=1e-5, atol=1e-5 * float(grad.abs().max()))


def _moved_agent(**kwargs: Any) -> tuple[PPO, Any, Any]:
    """A Pendulum agent after one rollout, its policy moved away from the rollout's (ratios
    away from 1), and a 48-row minibatch of that rollout with its preprocessed observations."""
    agent = PPO("Pendulum-v1", n_envs=2, seed=1, n_steps=32, clip_range_vf=0.05, ent_coef=0.01, **kwargs)
    agent.collect_rollout()
    with torch.no_grad():
        for param in agent.policy.parameters():
            param.add_(0.1 * torch.randn_like(param))
    minibatch = agent.buffer.batch().slice(0, 48)
    return agent, minibatch, agent.policy.preprocess(minibatch.observations)


@pytest.mark.parametrize("by_hand", [True, False])
def test_compiled_minibatch_loss_and_gradient_equal_eagers(by_hand: bool) -> None:
    """compile = true: torch.compile (inductor) of a minibatch's loss and gradient, through
    the hand-written path and through autograd's (the compiled graph's own backward), equals
    the eager computation up to float32 roundings."""
    agent, minibatch, obs = _moved_agent(compile=True)
    parameters = list(agent.policy.parameters())

    def loss_and_grads() -> tuple[Any, list[torch.Tensor]]:
        result = agent._minibatch_loss(minibatch, obs, by_hand=by_hand)
        if isinstance(result, PPOGradient):
            by_param = {id(param): grad for param, grad in result.grads}
            return result.loss, [by_param[id(param)] for param in parameters]
        return result, list(torch.autograd.grad(result.total, parameters))

    compiled_loss, compiled_grads = loss_and_grads()
    assert agent._compiled_loss is not None and agent._compiled_loss_ran  # compiled, not the fallback
    agent._compiled_loss = None
    eager_loss, eager_grads = loss_and_grads()
    assert isinstance(compiled_loss, PPOGradient) == isinstance(eager_loss, PPOGradient)
    for field in eager_loss._fields:
        torch.testing.assert_close(getattr(compiled_loss, field).detach(), getattr(eager_loss, field).detach())
    for mine, theirs in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5 * float(theirs.abs().max()))


def test_compiled_training_repeats_itself_and_stays_with_eagers() -> None:
    def train(compile: bool) -> torch.Tensor:
        agent = PPO("Pendulum-v1", n_envs=2, seed=3, n_steps=64, batch_size=32, n_epochs=2, compile=compile)
        agent.learn(512, tensorboard=False)
        assert agent._compiled_loss_ran == compile
        return torch.nn.utils.parameters_to_vector(agent.policy.parameters()).detach()

    compiled = train(True)
    assert torch.equal(compiled, train(True))  # same seed, same machine: the same floats
    torch.testing.assert_close(compiled, train(False), rtol=1e-4, atol=1e-5)  # other roundings, same steps


def test_compile_traces_once_whatever_the_minibatch_size_and_clip_range(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dynamic shapes from the start: the short last minibatches (rollouts drop the autoreset
    slots, so their size varies) and a scheduled clip range reuse the first compilation."""
    graphs: list[Any] = []
    real_compile = torch.compile

    def counting_compile(fn: Any, **kwargs: Any) -> Any:
        def backend(graph: Any, example_inputs: Any) -> Any:
            graphs.append(graph)
            return graph.forward

        return real_compile(fn, backend=backend, **kwargs)

    monkeypatch.setattr(torch, "compile", counting_compile)
    agent = PPO("CartPole-v1", n_envs=2, seed=0, n_steps=32, batch_size=24, n_epochs=2, compile=True,
                clip_range="linear:0.2:0")
    agent.learn(64, tensorboard=False)
    first = len(graphs)
    assert first >= 1
    sizes = set()
    for _ in range(6):
        agent.collect_rollout()
        batch = agent.buffer.batch()
        sizes.add(batch.size % 24)
        agent.update(batch)
        agent.current_values["clip_range"] *= 0.9
    assert len(sizes) > 1 and len(graphs) == first


def test_a_failed_compilation_warns_once_and_trains_as_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    def train(**kwargs: Any) -> torch.Tensor:
        agent = PPO("Pendulum-v1", n_envs=2, seed=3, n_steps=64, batch_size=32, n_epochs=2, **kwargs)
        agent.learn(256, tensorboard=False)
        assert agent._compiled_loss is None
        return torch.nn.utils.parameters_to_vector(agent.policy.parameters()).detach()

    def failing_compile(fn: Any, **kwargs: Any) -> Any:
        def compiled(*args: Any, **kw: Any) -> Any:
            raise RuntimeError("InductorError: CppCompileError: C++ compile error\n\nCommand:\ng++ x.cpp\n\n"
                               "Output:\nx.cpp:1:1: error: 'vec' was not declared\n")

        return compiled

    eager = train()
    monkeypatch.setattr(torch, "compile", failing_compile)
    with pytest.warns(RuntimeWarning, match=r"torch.compile failed \(RuntimeError: InductorError: CppCompileError: "
                      r"C\+\+ compile error; x.cpp:1:1: error: 'vec' was not declared\); the minibatch steps run "
                      r"uncompiled") as caught:
        fallen_back = train(compile=True)
    assert len([w for w in caught if "torch.compile" in str(w.message)]) == 1
    assert torch.equal(fallen_back, eager)


def test_a_failure_after_a_compiled_step_is_the_losss_own_and_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def flaky_compile(fn: Any, **kwargs: Any) -> Any:
        def compiled(*args: Any, **kw: Any) -> Any:
            calls.append(1)
            if len(calls) > 1:
                raise ValueError("a NaN in the minibatch")
            return fn(*args, **kw)

        return compiled

    monkeypatch.setattr(torch, "compile", flaky_compile)
    agent = PPO("Pendulum-v1", n_envs=2, seed=3, n_steps=64, batch_size=32, compile=True)
    with pytest.raises(ValueError, match="a NaN in the minibatch"):
        agent.learn(128, tensorboard=False)


def test_optimizer_names_resolve_and_bad_ones_are_rejected() -> None:
    assert optimizer_class("adam") is torch.optim.Adam
    assert optimizer_class("SGD") is torch.optim.SGD
    assert optimizer_class("torch.optim.Adagrad") is torch.optim.Adagrad
    with pytest.raises(ValueError, match="optimizer"):
        PPO("CartPole-v1", n_envs=1, optimizer="nosuch")
    with pytest.raises(ValueError, match="not a torch.optim.Optimizer"):
        optimizer_class("torch.optim.lr_scheduler.StepLR")
    # a preset or checkpoint must not make us import arbitrary modules
    for path in ("torch.nn.Linear", "os.system", "antigravity.fly"):
        with pytest.raises(ValueError, match="dotted paths must name a class in torch.optim or trpo_lab.optim"):
            optimizer_class(path)
    assert optimizer_class("trpo_lab.optim.Shampoo").__name__ == "Shampoo"
    with pytest.raises(ValueError, match="optimizer_kwargs"):
        PPO("CartPole-v1", n_envs=1, optimizer="sgd", optimizer_kwargs={"no_such_kwarg": 1})
    with pytest.raises(ValueError, match="learning_rate"):
        PPO("CartPole-v1", n_envs=1, optimizer_kwargs={"lr": 0.1})


def test_one_optimizer_holds_actor_and_critic() -> None:
    agent = PPO("Pendulum-v1", n_envs=1, optimizer="rmsprop", optimizer_kwargs={"alpha": 0.9})
    params = {id(p) for group in agent.optimizer.param_groups for p in group["params"]}
    assert params == {id(p) for p in agent.policy.parameters()}
    assert isinstance(agent.optimizer, torch.optim.RMSprop)
    assert agent.optimizer.param_groups[0]["alpha"] == 0.9


def test_update_logs_metrics_and_early_stop_limits_the_epochs() -> None:
    agent = PPO("CartPole-v1", n_envs=2, seed=0, n_steps=64, batch_size=32, n_epochs=4, learning_rate=3e-3)
    agent.collect_rollout()
    metrics = agent.update(agent.buffer.batch())
    for key in ("train/kl", "train/approx_kl", "train/clip_fraction", "train/policy_loss", "train/value_loss",
                "train/entropy", "train/explained_variance", "train/grad_norm", "train/loss"):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert metrics["train/kl"] > 0
    assert metrics["train/epochs"] == 4 and metrics["train/n_updates"] == 16 and metrics["train/early_stop"] == 0

    stopping = PPO("CartPole-v1", n_envs=2, seed=0, n_steps=64, batch_size=32, n_epochs=50, learning_rate=3e-3,
                   target_kl=1e-4)
    stopping.collect_rollout()
    metrics = stopping.update(stopping.buffer.batch())
    assert metrics["train/early_stop"] == 1
    assert metrics["train/n_updates"] < 50 * 4


@pytest.mark.parametrize("target_kl", [None, 0.05], ids=["plain", "sync-free-early-stop"])
def test_kl_batch_size_measures_the_kl_on_a_subset_and_changes_nothing_else(
    target_kl: float | None, update_on_drawn_rows: Any
) -> None:
    """The policy-change metrics on 16 of 64 samples: the update is bit-identical to the
    full-batch measure, and train/kl is the exact mean KL over the rows drawn."""
    kwargs = {"n_envs": 2, "seed": 0, "n_steps": 32, "batch_size": 16, "n_epochs": 3, "learning_rate": 3e-3,
              "target_kl": target_kl, "sync_free": target_kl is not None}
    full, subset = PPO("CartPole-v1", **kwargs), PPO("CartPole-v1", kl_batch_size=16, **kwargs)
    for agent in (full, subset):
        agent.learn(64 * 3, tensorboard=False)
    for a, b in zip(full.policy.parameters(), subset.policy.parameters(), strict=True):
        assert torch.equal(a, b)

    metrics, before, after = update_on_drawn_rows(subset, 16)
    dist = subset.policy.distribution
    torch.testing.assert_close(metrics["train/kl"], dist.kl(before, after).mean(), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(metrics["train/entropy"], dist.entropy(after).mean())
    assert float(metrics["train/kl"]) > 0


def test_kl_sample_draws_distinct_rows_of_every_key_and_the_whole_batch_at_or_above_its_size() -> None:
    obs = {"a": torch.arange(10.0), "b": torch.arange(10.0)[:, None].expand(10, 3)}
    chosen, rows = kl_sample(obs, 10, 4, seed=5)
    assert rows is not None and rows.unique().numel() == 4
    assert isinstance(chosen, dict) and torch.equal(chosen["a"], rows.float()) and torch.equal(chosen["b"][:, 0], rows.float())
    again, rows_again = kl_sample(obs, 10, 4, seed=5)
    assert rows_again is not None and torch.equal(rows, rows_again)  # a resumed run draws the same rows
    for count in (None, 10, 11):
        whole, none = kl_sample(obs, 10, count, seed=5)
        assert whole is obs and none is None
    assert update_seed(0, 1) != update_seed(0, 2) and update_seed(-3, 7) >= 0


def test_bad_kl_batch_size_is_named() -> None:
    with pytest.raises(ValueError, match=r"Invalid kl_batch_size: 0; expected >= 1 or none"):
        PPO("CartPole-v1", n_envs=1, kl_batch_size=0)


def test_update_returns_device_tensors_read_once_by_the_loop() -> None:
    from trpo_lab.agents.metrics import to_host

    agent = PPO("CartPole-v1", n_envs=2, seed=0, n_steps=32, batch_size=32, n_epochs=2)
    agent.collect_rollout()
    batch = agent.buffer.batch()
    agent._share_batch_sizes(batch.size)
    metrics = agent.update(batch)
    for key in ("train/kl", "train/loss", "train/explained_variance", "train/grad_norm"):
        assert isinstance(metrics[key], torch.Tensor) and metrics[key].device == agent.device, key
    host = to_host(metrics)
    assert list(host) == list(metrics) and all(isinstance(v, float) for v in host.values())
    assert host["train/n_updates"] == 2 * math.ceil(batch.size / 32)


def test_shampoo_can_be_dropped_in() -> None:
    pytest.importorskip("trpo_lab.optim.shampoo")
    agent = PPO("CartPole-v1", n_envs=2, seed=0, n_steps=32, batch_size=32, n_epochs=2, optimizer="shampoo")
    agent.learn(256, tensorboard=False)
    assert type(agent.optimizer).__name__ == "Shampoo"
    assert all(torch.isfinite(p).all() for p in agent.policy.parameters())


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_save_load_round_trip_restores_optimizer_state(tmp_path: Path, env_id: str) -> None:
    agent = PPO(env_id, n_envs=2, seed=0, n_steps=32, batch_size=32, n_epochs=2, normalize_obs=True)
    agent.learn(256, tensorboard=False)
    agent.save(tmp_path / "agent.pt")
    loaded = PPO.load(tmp_path / "agent.pt")
    obs = np.stack([agent.observation_space.sample() for _ in range(8)])
    np.testing.assert_array_equal(agent.predict(obs), loaded.predict(obs))
    assert loaded.config == agent.config and loaded.num_timesteps == agent.num_timesteps
    state, loaded_state = agent.optimizer.state_dict()["state"], loaded.optimizer.state_dict()["state"]
    assert state.keys() == loaded_state.keys() and len(state) > 0
    for key in state:
        torch.testing.assert_close(state[key]["exp_avg_sq"], loaded_state[key]["exp_avg_sq"])


def test_same_seed_same_training() -> None:
    def train() -> list[float]:
        agent = PPO("CartPole-v1", n_envs=2, seed=7, n_steps=32, batch_size=16, n_epochs=2)
        agent.learn(512, tensorboard=False)
        return [p.sum().item() for p in agent.policy.parameters()]

    assert train() == train()


@pytest.mark.slow
def test_ppo_solves_cartpole_within_100k_steps() -> None:
    hyperparameters, run = load_preset("ppo", "CartPole-v1")
    budget = int(run["total_timesteps"])
    assert budget <= 100_000
    agent = PPO("CartPole-v1", n_envs=int(run["n_envs"]), seed=0, **hyperparameters)
    agent.learn(budget, tensorboard=False)
    assert agent.num_timesteps <= 100_000 + agent.n_envs * agent.config.n_steps
    assert agent.evaluate(10).mean() >= 475


@pytest.mark.parametrize("activation", ["tanh", "elu"])
@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_rollout_stores_what_the_policy_computes(env_id: str, activation: str) -> None:
    """The CPU rollout stores each slot's action with its log-probability and value under the
    current policy, so PPO's ratio starts at 1: through the numpy policy (tanh) and through
    the torch path it falls back to (ELU has no numpy version)."""
    agent = PPO(env_id, n_envs=3, seed=0, n_steps=64, normalize_obs=True, policy_kwargs={"activation_fn": activation})
    uses_numpy = isinstance(agent.collector.actor(), NumpyActor)
    assert uses_numpy == (activation == "tanh")
    agent.learn(192)  # one update, so the policy is no longer the initial one
    agent.collect_rollout()
    buffer, policy = agent.buffer, agent.policy
    valid = buffer.valid
    obs = policy.preprocess(buffer.observations[valid])
    with torch.no_grad():
        log_probs = policy.distribution.log_prob(policy.dist_params(obs), buffer.actions[valid])
        values = policy.value(policy.preprocess(buffer.observations.reshape(-1, *buffer.observations.shape[2:])))
    torch.testing.assert_close(buffer.log_probs[valid], log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(buffer.values.reshape(-1)[valid.reshape(-1)], values[valid.reshape(-1)], rtol=1e-5, atol=1e-5)
    assert int(valid.sum()) > 0

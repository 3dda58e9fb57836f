"""Reliability (issue #9): numerical faults, interruptions, exact resume, untrusted files.

Faults are injected with small deterministic environments, so each test knows exactly
which sub-environment goes wrong at which step.
"""

from __future__ import annotations

import csv
import itertools
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

from trpo_lab import envs as envs_module
from trpo_lab.agents import agent_class
from trpo_lab.agents.base import (
    NonFiniteEnvError,
    NonFiniteUpdateError,
    OnPolicyAgent,
    TrainingInterrupted,
    read_checkpoint,
)
from trpo_lab.agents.trpo import TRPO
from trpo_lab.envs import (
    EnvStateError,
    load_vector_env_state,
    make_vec_env,
    vector_env_state,
)
from trpo_lab.logging import (
    LOCK_FILE,
    TIMING_COLUMNS,
    FolderLock,
    FolderLockedError,
    RunLogger,
    WriteFailedError,
    atomic_write_bytes,
)


def _available(algo: str) -> bool:
    try:
        agent_class(algo)
    except ValueError:
        return False
    return True


# Some agents are written by other issues; test them when they are there.
OTHER_ALGOS = [pytest.param(a, marks=pytest.mark.skipif(not _available(a), reason=f"{a} not in this checkout"))
               for a in ("ppo", "acktr")]


class CountingEnv(gym.Env[np.ndarray, int]):
    """Deterministic toy env: obs = (t, episode, 1) / 100, reward 1, truncated after ``length`` steps.

    ``faults`` maps a lifetime step number (1-based, resets excluded) to what goes wrong there:
    ``"obs"`` (a NaN in the observation), ``"reward"`` (NaN reward) or ``"inf"`` (inf reward);
    ``"always"`` makes every step's observation NaN, ``"reset"`` every observation.
    """

    observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, length: int = 50, faults: dict[int, str] | str | None = None) -> None:
        self.length, self.faults = length, faults or {}
        self.lifetime_steps = self.t = self.episode = 0

    def _obs(self) -> np.ndarray:
        return np.array([self.t, self.episode, 1.0], np.float32) / 100

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.t, self.episode = 0, self.episode + 1
        obs = self._obs()
        if self.faults == "reset":
            obs[0] = np.nan
        return obs, {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.lifetime_steps += 1
        self.t += 1
        obs, reward = self._obs(), 1.0
        kind = self.faults if isinstance(self.faults, str) else self.faults.get(self.lifetime_steps)
        if kind in ("obs", "always", "reset"):
            obs[1] = np.nan
        elif kind == "reward":
            reward = math.nan
        elif kind == "inf":
            reward = math.inf
        return obs, reward, False, self.t >= self.length, {}


def counting_envs(faults: dict[int, dict[int, str] | str], length: int = 50) -> Callable[[], gym.Env]:
    """A factory whose i-th env (the vector env's index i) gets ``faults.get(i)``."""
    counter = itertools.count()

    def make() -> gym.Env:
        return CountingEnv(length, faults.get(next(counter)))

    return make


def _rows(run_dir: Path, drop_timing: bool = True) -> list[dict[str, str]]:
    with (run_dir / "progress.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if drop_timing:
        rows = [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in rows]
    return rows


def _parameters(agent: OnPolicyAgent) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(agent.policy.parameters()).detach().clone()


# ---------------------------------------------------------------------------------- NaN / inf from the env
@pytest.mark.parametrize(
    ("kind", "what"),
    [("obs", r"observation \(1 of 3 elements NaN or inf\)"), ("reward", r"reward \(nan\)"), ("inf", r"reward \(inf\)")],
)
def test_non_finite_env_output_stops_naming_env_and_step(kind: str, what: str) -> None:
    # env 1 goes wrong on its 10th step: update 2 (n_steps=8), rollout step 1
    agent = TRPO(counting_envs({1: {10: kind}}), n_envs=3, seed=0, n_steps=8, n_critic_updates=1)
    with pytest.raises(NonFiniteEnvError, match=rf"^Environment 1 returned a non-finite {what} at rollout step 1 "
                                               r"\(update 2, timestep 27\); .*nan_policy='skip'") as info:
        agent.learn(1_000)
    assert info.value.env_index == 1
    assert agent.num_updates == 1 and torch.isfinite(_parameters(agent)).all()


def test_cli_maps_a_non_finite_env_to_exit_1_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from trpo_lab.cli import main

    env_id = "TrpoLabNaNReward-v0"
    gym.register(env_id, entry_point=lambda: CountingEnv(faults={5: "reward"}))
    try:
        code = main(["train", "trpo", env_id, "--steps", "100", "--n-envs", "1", "--run-dir", str(tmp_path / "run"),
                     "--set", "n_steps=8", "--quiet"])
    finally:
        del gym.registry[env_id]
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err == [err[0]] and err[0].startswith("trpo-lab: error: Environment 0 returned a non-finite reward (nan) "
                                                 "at rollout step 4 (update 1, timestep 4)")


def test_skip_drops_the_step_resets_the_env_and_cuts_the_advantage_chain() -> None:
    # env 0: NaN observation on its 5th step (rollout step 4); env 1 fine
    agent = TRPO(counting_envs({0: {5: "obs"}}), n_envs=2, seed=0, n_steps=8, nan_policy="skip", gamma=0.9)
    assert agent.collect_rollout() == 15
    buffer = agent.buffer
    assert not buffer.valid[4, 0] and buffer.valid[:, 1].all() and buffer.valid[[0, 1, 2, 3, 5, 6, 7], 0].all()
    assert buffer.rewards[4, 0] == 0 and buffer.truncated[3, 0] and not buffer.terminated[:, 0].any()
    # the dropped slot holds the last finite observation (t = 4); the next one the reset observation
    # of a new episode (t = 0)
    last_finite, reset = buffer.observations[4, 0], buffer.observations[5, 0]
    assert last_finite[0] == pytest.approx(0.04) and reset[0] == 0 and reset[1] == pytest.approx(last_finite[1] + 0.01)
    # the step before the dropped one bootstraps from V(last finite observation): A_3 = δ_3
    expected = buffer.rewards[3, 0] + 0.9 * buffer.values[4, 0] - buffer.values[3, 0]
    torch.testing.assert_close(buffer.advantages[3, 0], expected)
    assert torch.isfinite(buffer.advantages).all() and torch.isfinite(buffer.observations).all()
    assert agent.num_nonfinite_skipped == 1


def test_skip_over_a_run_counts_and_logs_and_keeps_statistics_finite(tmp_path: Path) -> None:
    faults = {0: {5: "obs", 30: "reward"}, 2: {17: "inf"}}
    agent = TRPO(counting_envs(faults, length=12), n_envs=3, seed=0, n_steps=16, nan_policy="skip",
                 normalize_obs=True, normalize_reward=True, n_critic_updates=1)
    agent.learn(3 * 48, run_dir=tmp_path, tensorboard=False)
    rows = _rows(tmp_path)
    # env 0: lifetime step 5 is in update 1, step 30 in update 2 (after two 12-step episodes); env 2: step 17, update 2
    assert [float(r["rollout/nonfinite_skipped"]) for r in rows] == [1.0, 3.0, 3.0, 3.0]
    assert agent.num_nonfinite_skipped == 3
    assert torch.isfinite(_parameters(agent)).all()
    state = envs_module.normalization_state(agent.env)
    assert all(np.isfinite(np.asarray(v)).all() for table in (state["obs_rms"], state["return_rms"]) for v in table.values())
    # the episodes that went bad are not recorded; the others are complete 12-step ones
    assert agent.episode_lengths and set(agent.episode_lengths) == {12.0}
    assert all(math.isfinite(r) for r in agent.episode_returns)


def test_a_run_stopped_by_a_non_finite_env_continues_from_its_checkpoint_with_skip(tmp_path: Path) -> None:
    agent = TRPO(counting_envs({1: {40: "reward"}}), n_envs=2, seed=0, n_steps=8, n_critic_updates=1, checkpoint_every=1)
    with pytest.raises(NonFiniteEnvError, match="Environment 1 returned a non-finite reward"):
        agent.learn(200, run_dir=tmp_path, tensorboard=False)
    # the envs continue from the checkpoint (step 33 of env 1), so its 40th step goes bad again: now skipped
    resumed = TRPO.load(tmp_path / "checkpoint.pt", env=counting_envs({}), nan_policy="skip")
    assert resumed.config.nan_policy == "skip" and resumed.num_updates == 4
    resumed.learn(200, run_dir=tmp_path, tensorboard=False)
    assert resumed.num_nonfinite_skipped == 1 and len(_rows(tmp_path)) == resumed.num_updates


@pytest.mark.parametrize(("faults", "message"), [
    ("always", r"^16 of the 16 transitions of update 1 were NaN or inf .* the environment is broken"),
    ("reset", r"Environment 0 returned a non-finite observation on reset"),
])
def test_skip_gives_up_on_a_broken_env(faults: str, message: str) -> None:
    with pytest.raises(NonFiniteEnvError, match=message):
        agent = TRPO(counting_envs({0: faults, 1: faults}), n_envs=2, seed=0, n_steps=8, nan_policy="skip")
        agent.learn(100)


# ---------------------------------------------------------------------------------- non-finite updates
class PoisonedTRPO(TRPO):
    """TRPO whose update writes NaN into the parameters (or the critic's Adam state) on chosen updates."""

    poison_at: set[int] = set()
    poison: str = "parameters"

    def update(self, batch: Any) -> dict[str, float]:
        metrics = super().update(batch)
        if self.num_updates + 1 in self.poison_at:
            with torch.no_grad():
                if self.poison == "parameters":
                    next(iter(self.policy.actor.parameters()))[0, 0] = math.nan
                else:
                    state = next(iter(self.critic_optimizer.state.values()))
                    state["exp_avg_sq"].fill_(math.inf)
        return metrics


@pytest.mark.parametrize("poison", ["parameters", "optimizer_state"])
def test_a_non_finite_update_is_undone_counted_and_logged(tmp_path: Path, poison: str) -> None:
    agent = PoisonedTRPO("Pendulum-v1", n_envs=2, seed=0, n_steps=32, n_critic_updates=2)  # no auto-resets
    agent.poison_at, agent.poison = {3}, poison
    snapshots: list[tuple[torch.Tensor, dict[int, torch.Tensor]]] = []

    def record(a: OnPolicyAgent, metrics: dict[str, float]) -> None:
        adam = {k: v["exp_avg_sq"].clone() for k, v in a.critic_optimizer.state.items()}  # type: ignore[attr-defined]
        snapshots.append((_parameters(a), adam))

    agent.learn(5 * 64, run_dir=tmp_path, tensorboard=False, callback=record)
    rows = _rows(tmp_path)
    assert [float(r["train/update_rejected"]) for r in rows] == [0, 0, 1, 0, 0]
    assert [float(r["train/rejected_updates"]) for r in rows] == [0, 0, 1, 1, 1]
    (params_2, adam_2), (params_3, adam_3) = snapshots[1], snapshots[2]
    assert torch.equal(params_2, params_3)  # the rejected update left no trace
    assert all(torch.equal(adam_2[k], adam_3[k]) for k in adam_2)
    assert not torch.equal(snapshots[3][0], params_3)  # and training went on
    assert torch.isfinite(_parameters(agent)).all()


def test_updates_that_keep_failing_stop_the_run_with_the_last_good_policy_saved(tmp_path: Path) -> None:
    agent = PoisonedTRPO("CartPole-v1", n_envs=2, seed=0, n_steps=16, n_critic_updates=1)
    agent.poison_at = set(range(3, 100))
    good: list[torch.Tensor] = []
    with pytest.raises(NonFiniteUpdateError, match=r"^10 updates in a row \(the last at update 12\) produced NaN .* "
                                                   r"still the one from update 2\. Lower the step size"):
        agent.learn(10_000, run_dir=tmp_path, tensorboard=False,
                    callback=lambda a, m: good.append(_parameters(a)) if a.num_updates == 2 else None)
    saved = OnPolicyAgent.load(tmp_path / "checkpoint.pt")
    assert saved.num_updates == 12 and saved.num_rejected_updates == 10
    assert torch.equal(_parameters(saved), good[0])
    assert not (tmp_path / "final.pt").exists()


def test_a_linear_algebra_failure_in_the_update_is_undone() -> None:
    class FailingTRPO(TRPO):
        def update(self, batch: Any) -> dict[str, float]:
            super().update(batch)
            raise torch.linalg.LinAlgError("linalg.cholesky: The factorization could not be completed")

    agent = FailingTRPO("CartPole-v1", n_envs=2, seed=0, n_steps=16, n_critic_updates=1)
    before = _parameters(agent)
    with pytest.warns(UserWarning, match="Update 1 failed .*cholesky.*; it is undone"):
        metrics = agent._train_one_update()
    assert metrics["train/update_rejected"] == 1.0 and torch.equal(_parameters(agent), before)


class ScaleReward(gym.RewardWrapper):
    def __init__(self, env: gym.Env, scale: float) -> None:
        super().__init__(env)
        self.scale = scale

    def reward(self, reward: float) -> float:
        return reward * self.scale


@pytest.mark.parametrize("algo", ["trpo", *OTHER_ALGOS])
def test_huge_rewards_without_normalization_never_give_nan_parameters(algo: str) -> None:
    cls = agent_class(algo)
    agent = cls(lambda: ScaleReward(gym.make("CartPole-v1"), 1e8), n_envs=4, seed=0, n_steps=32)
    rejected: list[float] = []
    agent.learn(40 * 128, callback=lambda a, m: rejected.append(m["train/update_rejected"]) or None)
    assert len(rejected) >= 40
    assert torch.isfinite(_parameters(agent)).all()
    obs = torch.as_tensor(np.stack([agent.observation_space.sample() for _ in range(64)]))
    dist_params, values = agent.policy(obs)
    assert torch.isfinite(dist_params).all() and torch.isfinite(values).all()


def _state_vector(agent: OnPolicyAgent) -> torch.Tensor:
    from trpo_lab.agents.guard import tensor_leaves

    floating = [t for t in tensor_leaves(agent._optimizer_states()) if t.is_floating_point()]
    return torch.cat([t.detach().reshape(-1).double().clone() for t in floating])


@pytest.mark.parametrize("algo", ["trpo", "npg", *OTHER_ALGOS])
def test_the_guard_undoes_a_poisoned_update_of_every_agent(algo: str) -> None:
    """NaN written into the parameters and every optimizer-state tensor by an update: all of it is undone."""
    if not _available(algo):
        pytest.skip(f"{algo} not in this checkout")
    agent = agent_class(algo)("Pendulum-v1", n_envs=2, seed=0, n_steps=16)
    for _ in range(2):
        agent._train_one_update()  # optimizer state exists now
    params, state = _parameters(agent), _state_vector(agent)
    assert bool(agent._replaced_state_tensors()) == (algo == "acktr")  # K-FAC's factors, shared by the snapshot
    real_update = agent.update

    def poisoned(batch: Any) -> dict[str, float]:
        metrics = real_update(batch)
        from trpo_lab.agents.guard import tensor_leaves

        replaced = {id(t) for t in agent._replaced_state_tensors()}
        with torch.no_grad():
            floating = [t for t in tensor_leaves(agent._optimizer_states()) if t.is_floating_point()]
            for tensor in [*agent.policy.parameters(), *floating]:
                if id(tensor) not in replaced:
                    tensor.fill_(math.nan)
        # The tensors an optimizer replaces rather than modifies (K-FAC's factors and
        # eigenbases) are poisoned the way that optimizer changes them: new tensors.
        for optimizer in getattr(getattr(agent, "optimizer", None), "optimizers", {}).values():
            for param_state in optimizer.state.values():
                for key, value in param_state.items():
                    if id(value) in replaced and value.is_floating_point():
                        param_state[key] = torch.full_like(value, math.nan)
        return metrics

    agent.update = poisoned  # type: ignore[method-assign]
    metrics = agent._train_one_update()
    assert metrics["train/update_rejected"] == 1.0 and agent.num_rejected_updates == 1
    assert torch.equal(_parameters(agent), params)
    assert torch.equal(_state_vector(agent), state)
    agent.update = real_update  # type: ignore[method-assign]
    assert agent._train_one_update()["train/update_rejected"] == 0.0


@pytest.mark.parametrize("algo", [p for p in OTHER_ALGOS if p.values[0] == "ppo"])
def test_a_diverging_optimizer_is_held_by_the_guard(algo: str) -> None:
    """A PPO step size of 1e30 drives the networks to inf: every such update is undone, then the run stops."""
    agent = agent_class(algo)("CartPole-v1", n_envs=2, seed=0, n_steps=16, learning_rate=1e30)
    with pytest.raises(NonFiniteUpdateError, match="10 updates in a row"):
        agent.learn(30 * 32)
    assert agent.num_rejected_updates == 10
    assert torch.isfinite(_parameters(agent)).all()


# ---------------------------------------------------------------------------------- interruptions
def _send(signum: int, at_update: int, times: int = 1) -> Callable[[OnPolicyAgent, dict[str, float]], None]:
    def callback(agent: OnPolicyAgent, metrics: dict[str, float]) -> None:
        if agent.num_updates == at_update:
            for _ in range(times):
                os.kill(os.getpid(), signum)
                time.sleep(0.01)  # let the handler run

    return callback


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_finishes_the_update_checkpoints_and_restores_the_handlers(tmp_path: Path, signum: int) -> None:
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    agent = TRPO("CartPole-v1", n_envs=2, seed=0, n_steps=16, n_critic_updates=1)
    with pytest.raises(TrainingInterrupted, match=rf"{signal.Signals(signum).name} received: stopped after update 3 "
                                                  rf"\(timestep \d+\); checkpoint written to .*checkpoint.pt") as info:
        agent.learn(10_000, run_dir=tmp_path, tensorboard=False, callback=_send(signum, 3))
    assert info.value.signum == signum and isinstance(info.value, KeyboardInterrupt)
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    assert len(_rows(tmp_path)) == 3 and not (tmp_path / "final.pt").exists()
    assert read_checkpoint(tmp_path / "checkpoint.pt")["counters"]["num_updates"] == 3


def test_a_second_signal_stops_at_once(tmp_path: Path) -> None:
    agent = TRPO("CartPole-v1", n_envs=2, seed=0, n_steps=16, n_critic_updates=1)
    with pytest.raises(KeyboardInterrupt) as info:
        agent.learn(10_000, run_dir=tmp_path, tensorboard=False, callback=_send(signal.SIGINT, 2, times=2))
    assert not isinstance(info.value, TrainingInterrupted)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_signal_stays_ignored_and_threads_need_no_handlers() -> None:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        agent = TRPO("Pendulum-v1", n_envs=2, seed=0, n_steps=16, n_critic_updates=1)
        agent.learn(5 * 32, callback=_send(signal.SIGINT, 2))
        assert agent.num_updates == 5  # ran to the end
    finally:
        signal.signal(signal.SIGINT, previous)
    errors: list[BaseException] = []

    def train() -> None:
        try:
            TRPO("CartPole-v1", n_envs=2, seed=0, n_steps=16, n_critic_updates=1).learn(64)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=train)
    thread.start()
    thread.join(timeout=120)
    assert not errors


# ---------------------------------------------------------------------------------- exact resume
RESUME_CASES = [
    pytest.param("trpo", "CartPole-v1", {}, id="trpo-cartpole"),
    pytest.param("trpo", "Pendulum-v1", {"normalize_obs": True, "normalize_reward": True}, id="trpo-pendulum-norm"),
    *[pytest.param(p.values[0], "Pendulum-v1", {"normalize_obs": True}, marks=p.marks, id=f"{p.values[0]}-pendulum")
      for p in OTHER_ALGOS],
]


@pytest.mark.parametrize(("algo", "env_id", "kwargs"), RESUME_CASES)
def test_resume_from_any_checkpoint_repeats_the_uninterrupted_run(
    tmp_path: Path, algo: str, env_id: str, kwargs: dict[str, Any]
) -> None:
    cls = agent_class(algo)
    budget = 7 * 2 * 48
    full = tmp_path / "full"

    def keep_checkpoint(agent: OnPolicyAgent, metrics: dict[str, float]) -> None:
        shutil.copy(full / "checkpoint.pt", full / f"checkpoint_{agent.num_updates}.pt")

    cls(env_id, n_envs=2, seed=3, n_steps=48, checkpoint_every=1, **kwargs).learn(
        budget, run_dir=full, tensorboard=False, callback=keep_checkpoint
    )
    expected = _rows(full)
    assert len(expected) >= 7
    lines = (full / "progress.csv").read_text().splitlines(keepends=True)  # header + one line per update
    for k in (1, 4, len(expected) - 1):
        run = tmp_path / f"resumed_{k}"
        run.mkdir()
        # as a killed run leaves it: rows past the checkpoint and a row cut short
        torn = lines[k + 3][:9] if k + 3 < len(lines) else ""
        (run / "progress.csv").write_text("".join(lines[: k + 3]) + torn)
        shutil.copy(full / f"checkpoint_{k}.pt", run / "checkpoint.pt")
        agent = OnPolicyAgent.load(run / "checkpoint.pt")
        assert agent.num_updates == k
        agent.learn(budget, run_dir=run, tensorboard=False)
        assert _rows(run) == expected, f"resumed from update {k}"


@pytest.mark.skipif(not hasattr(signal, "SIGTERM"), reason="needs POSIX signals")
def test_cli_sigterm_then_resume_gives_the_uninterrupted_progress(tmp_path: Path) -> None:
    def command(run_dir: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "trpo_lab", "train", *extra, "--run-dir", str(run_dir), "--quiet"]

    train = ["trpo", "Pendulum-v1", "--n-envs", "2", "--seed", "5", "--set", "n_steps=32",
             "--set", "n_critic_updates=2", "--set", "normalize_obs=true", "--set", "checkpoint_every=1000"]
    budget = ["--steps", "1536"]  # 24 updates
    process = subprocess.Popen(command(tmp_path / "run", *train, *budget), cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        progress = tmp_path / "run" / "progress.csv"
        while not (progress.exists() and len(progress.read_text().splitlines()) >= 4):
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "no progress within 120 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr and "checkpoint written to" in stderr.strip().splitlines()[-1]
    stopped_at = read_checkpoint(tmp_path / "run" / "checkpoint.pt")["counters"]["num_updates"]
    assert 3 <= stopped_at < 24 and len(_rows(tmp_path / "run")) == stopped_at
    resumed = subprocess.run([sys.executable, "-m", "trpo_lab", "train", "--resume", str(tmp_path / "run"), "--quiet"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    whole = subprocess.run(command(tmp_path / "whole", *train, *budget), cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    assert _rows(tmp_path / "run") == _rows(tmp_path / "whole")


# ---------------------------------------------------------------------------------- env state
STATE_ENVS = ["CartPole-v1", "Pendulum-v1", "Acrobot-v1", "MountainCar-v0", "FrozenLake-v1"]
try:
    import mujoco  # noqa: F401

    STATE_ENVS.append("Hopper-v5")
except ImportError:
    pass


@pytest.mark.parametrize("env_id", STATE_ENVS)
def test_vector_env_state_round_trip_continues_bit_for_bit(env_id: str) -> None:
    norm = env_id != "FrozenLake-v1"
    original = make_vec_env(env_id, 3, seed=0, normalize_obs=norm, normalize_reward=norm)
    original.reset(seed=0)
    original.action_space.seed(1)
    for _ in range(41):
        original.step(original.action_space.sample())
    state = vector_env_state(original)
    copy = make_vec_env(env_id, 3, seed=7, normalize_obs=norm, normalize_reward=norm)
    copy.reset(seed=7)
    copy.step(copy.action_space.sample())
    path_state = _through_checkpoint(state)
    load_vector_env_state(copy, path_state)
    for _ in range(120):
        action = original.action_space.sample()
        a, b = original.step(action), copy.step(action)
        for x, y in zip(a[:4], b[:4]):
            np.testing.assert_array_equal(x, y)
        assert ("_episode" in a[4]) == ("_episode" in b[4])
        if "_episode" in a[4]:
            np.testing.assert_array_equal(a[4]["episode"]["r"], b[4]["episode"]["r"])


def _through_checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # type: ignore[no-any-return]


class DequeEnv(CountingEnv):
    def __init__(self) -> None:
        super().__init__()
        self.history: deque[int] = deque(maxlen=3)


def test_envs_that_cannot_be_captured_raise_clearly_and_resume_with_a_warning(tmp_path: Path) -> None:
    with pytest.raises(EnvStateError, match=r"Cannot capture sub-environment 0 DequeEnv.history: "
                                            r"a collections.deque is not plain data"):
        vector_env_state(make_vec_env(DequeEnv, 2))
    async_env = make_vec_env("CartPole-v1", 2, vectorization="async")
    try:
        with pytest.raises(EnvStateError, match=r"Cannot capture the state of a AsyncVectorEnv: only .*SyncVectorEnv"):
            vector_env_state(async_env)
    finally:
        async_env.close()
    agent = TRPO(DequeEnv, n_envs=2, seed=0, n_steps=8, n_critic_updates=1)
    agent.learn(32)
    agent.save(tmp_path / "agent.pt")
    assert "DequeEnv.history" in read_checkpoint(tmp_path / "agent.pt")["env_state_error"]
    with pytest.warns(UserWarning, match=r"Resuming without the environments' state \(Cannot capture .*DequeEnv.history"
                                         r".*\); they restart from a fresh reset with seed 2"):
        loaded = TRPO.load(tmp_path / "agent.pt", env=DequeEnv)
    loaded.learn(64)
    assert loaded.num_updates == 4


def test_loading_env_state_into_another_env_is_refused_before_changing_anything() -> None:
    state = vector_env_state(make_vec_env("CartPole-v1", 2, seed=0))
    other = make_vec_env("Acrobot-v1", 2, seed=0)
    before = vector_env_state(other)
    with pytest.raises(EnvStateError, match=r"Sub-environment 0 is TimeLimit > OrderEnforcing > PassiveEnvChecker > "
                                            r"AcrobotEnv; the saved state is of .*CartPoleEnv"):
        load_vector_env_state(other, state)
    with pytest.raises(EnvStateError, match="has 2 sub-environments, this env 3"):
        load_vector_env_state(make_vec_env("CartPole-v1", 3, seed=0), state)
    assert str(vector_env_state(other)) == str(before)


# ---------------------------------------------------------------------------------- files
def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoint.pt"
    atomic_write_bytes(path, b"old")
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and len(synced) >= 2  # the file and its folder

    def fail(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(path, b"newer")
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_every_result_file_of_a_run_is_complete_after_it(tmp_path: Path) -> None:
    """config.toml, checkpoint.pt and final.pt go through atomic_write_*; progress.csv is
    appended row by row, fsynced before each checkpoint and trimmed back to it on resume."""
    written: list[str] = []
    real = atomic_write_bytes

    def spy(path: str | Path, data: bytes) -> None:
        written.append(Path(path).name)
        real(path, data)

    import trpo_lab.agents.checkpoint as checkpoint

    original = checkpoint.atomic_write_bytes
    checkpoint.atomic_write_bytes = spy  # type: ignore[assignment]
    try:
        TRPO("CartPole-v1", n_envs=2, seed=0, n_steps=16, n_critic_updates=1, checkpoint_every=2).learn(
            4 * 32, run_dir=tmp_path, tensorboard=False
        )
    finally:
        checkpoint.atomic_write_bytes = original  # type: ignore[assignment]
    assert written.count("checkpoint.pt") == 3 and written.count("final.pt") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        LOCK_FILE, "checkpoint.pt", "config.toml", "final.pt", "progress.csv"
    ]
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released: no holder recorded


def test_progress_rows_past_the_checkpoint_and_a_torn_row_are_dropped_on_resume(tmp_path: Path) -> None:
    header = "timesteps,updates,return_mean\n"
    (tmp_path / "progress.csv").write_text(header + "10,1,1.0\n20,2,2.0\n30,3,3.0\n40,4,4")
    with pytest.warns(UserWarning, match=r"dropped 1 damaged row\(s\) \(cut short or with the wrong number of fields\)"):
        RunLogger(tmp_path, 100, tensorboard=False, resume=True, start_updates=2).close()
    assert (tmp_path / "progress.csv").read_text().replace("\r\n", "\n") == header + "10,1,1.0\n20,2,2.0\n"


# ---------------------------------------------------------------------------------- untrusted files
class RunsCode:
    """Unpickling this calls ``Path.touch(marker)``: what an attacker's checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path: Path, writer: str) -> None:
    import pickle

    marker = tmp_path / "pwned"
    agent = TRPO("CartPole-v1", n_envs=1, seed=0, n_steps=8)
    data = agent.state_dict()
    data["counters"]["num_updates"] = RunsCode(marker)
    path = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save(data, path)
    else:
        path.write_bytes(pickle.dumps(data, protocol=4))
    pickle.loads(pickle.dumps(RunsCode(tmp_path / "control")))  # the payload does work when unpickled
    assert (tmp_path / "control").exists()
    expected = (r"refused, it refers to Python code or classes \(.*GLOBAL .*\)"
                if writer == "torch.save" else r"not a weights-only PyTorch checkpoint")
    with pytest.raises(ValueError, match=rf"Cannot load checkpoint .*evil.pt: {expected}.*nothing in the file was run"):
        TRPO.load(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------- full disks, read-only places (#18)
def _failing(errno_code: int) -> Callable[..., Any]:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno_code, os.strerror(errno_code))

    return fail


class _FullFile:
    """A text file whose writes fail once ``room`` characters are used (a disk filling up)."""

    def __init__(self, file: Any, room: int, errno_code: int) -> None:
        self.file, self.room, self.errno_code = file, room, errno_code

    def write(self, text: str) -> int:
        self.room -= len(text)
        if self.room < 0:
            raise OSError(self.errno_code, os.strerror(self.errno_code))
        return int(self.file.write(text))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


def _tiny_trpo(**kwargs: Any) -> TRPO:
    return TRPO("CartPole-v1", n_envs=1, seed=0, n_steps=16, n_critic_updates=1, checkpoint_every=1, **kwargs)


@pytest.mark.parametrize("errno_code", [28, 13, 30])  # ENOSPC, EACCES, EROFS
def test_a_checkpoint_that_cannot_be_written_stops_the_run_and_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, errno_code: int
) -> None:
    import trpo_lab.logging as logging_module

    replaced: list[str] = []
    real_replace = os.replace

    def replace_until_full(src: Any, dst: Any) -> None:
        if Path(dst).name == "checkpoint.pt" and replaced.count("checkpoint.pt") == 2:
            raise OSError(errno_code, os.strerror(errno_code))
        replaced.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(logging_module.os, "replace", replace_until_full)
    with pytest.raises(WriteFailedError) as info:
        _tiny_trpo().learn(10 * 16, run_dir=tmp_path, tensorboard=False)
    code = {28: "ENOSPC", 13: "EACCES", 30: "EROFS"}[errno_code]
    assert str(info.value) == (f"Cannot write {tmp_path / 'checkpoint.pt'}: {os.strerror(errno_code)} ({code}); "
                               "the previous checkpoint.pt, if any, is unchanged")
    assert isinstance(info.value, OSError) and info.value.errno == errno_code
    monkeypatch.setattr(logging_module.os, "replace", real_replace)
    resumed = TRPO.load(tmp_path / "checkpoint.pt")  # intact and loadable: the checkpoint of update 2
    assert resumed.num_updates == 2
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    resumed.learn(4 * 16, run_dir=tmp_path, tensorboard=False)  # and the run continues from it (the lock is free)
    updates = [int(float(row["updates"])) for row in _rows(tmp_path)]
    assert updates == list(range(1, len(updates) + 1)) and updates[-1] >= 4  # update 3 was redone, no duplicate


def test_the_cli_reports_a_full_disk_in_one_line_and_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import trpo_lab.logging as logging_module
    from trpo_lab.cli import main

    monkeypatch.setattr(logging_module.os, "replace", _failing(28))  # nothing atomic can be written
    code = main(["train", "trpo", "CartPole-v1", "--steps", "32", "--n-envs", "1", "--set", "n_steps=16", "--quiet",
                 "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [f"trpo-lab: error: Cannot write {tmp_path / 'run' / 'config.toml'}: No space left on device (ENOSPC); "
                   "the previous config.toml, if any, is unchanged"]


def test_a_budget_below_one_rollout_warns_in_one_line_what_will_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from trpo_lab.cli import main

    assert main(["train", "trpo", "CartPole-v1", "--steps", "20", "--n-envs", "2", "--set", "n_steps=16", "--quiet",
                 "--run-dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["trpo-lab: warning: the budget of 20 steps is less than one rollout (n_envs 2 x n_steps 16 = 32 "
                   "steps): 1 update of 32 steps will run; lower n_steps to 10 to stay within it"]
    assert len(_rows(tmp_path)) == 1


def test_progress_csv_that_cannot_be_written_stops_the_run_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = Path.open

    def open_small_disk(self: Path, *args: Any, **kwargs: Any) -> Any:
        file = real_open(self, *args, **kwargs)
        return _FullFile(file, 3000, 28) if self.name == "progress.csv" else file

    monkeypatch.setattr(Path, "open", open_small_disk)
    agent = _tiny_trpo()
    with pytest.raises(WriteFailedError, match=rf"^Cannot write {tmp_path / 'progress.csv'}: No space left on device "
                                               r"\(ENOSPC\)$"):
        agent.learn(20 * 16, run_dir=tmp_path, tensorboard=False)
    assert 1 <= agent.num_updates < 20
    monkeypatch.setattr(Path, "open", real_open)
    assert TRPO.load(tmp_path / "checkpoint.pt").num_updates >= agent.num_updates - 1  # every update checkpointed


def test_tensorboard_events_that_cannot_be_written_stop_the_run_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    from tensorboard.compat.tensorflow_stub.io import gfile

    real_write = gfile.GFile.write
    calls: list[int] = []

    def write_until_full(self: Any, data: Any) -> Any:
        calls.append(1)
        if len(calls) > 3:
            raise OSError(28, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(gfile.GFile, "write", write_until_full)
    agent = _tiny_trpo()
    with pytest.raises(WriteFailedError, match=rf"^Cannot write {tmp_path}/events\.out\.tfevents\..*: "
                                               r"No space left on device \(ENOSPC\)$"):
        agent.learn(50 * 16, run_dir=tmp_path)
    assert agent.num_updates < 50
    assert "Traceback" not in capfd.readouterr().err  # TensorBoard's writer thread printed nothing


def test_a_compare_report_that_cannot_be_written_names_it_and_keeps_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trpo_lab.logging as logging_module
    from trpo_lab.experiments import load_experiment
    from trpo_lab.experiments.report import write_outputs

    (tmp_path / "summary.csv").write_text("old summary\n")
    monkeypatch.setattr(logging_module.os, "replace", _failing(30))
    with pytest.raises(WriteFailedError, match=rf"^Cannot write {tmp_path / 'summary.csv'}: Read-only file system \(EROFS\)"):
        write_outputs(load_experiment(None), [], [], [], 1.0, 1, tmp_path)
    assert (tmp_path / "summary.csv").read_text() == "old summary\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.csv"]


# ---------------------------------------------------------------------------------- two runs at once (#18)
def _hold_lock(folder: Path) -> subprocess.Popen[str]:
    """Another process holding ``folder`` as a run would (a FolderLock), until killed."""
    code = ("import sys, time; from trpo_lab.logging import FolderLock; "
            "FolderLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_into_a_held_run_dir_exits_2_naming_the_holder_and_a_killed_holder_is_taken_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from trpo_lab.cli import main

    run_dir = tmp_path / "run"
    holder = _hold_lock(run_dir)
    argv = ["train", "trpo", "CartPole-v1", "--steps", "16", "--n-envs", "1", "--set", "n_steps=16", "--quiet",
            "--run-dir", str(run_dir)]
    try:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"trpo-lab: error: The run directory {run_dir} is in use by another trpo-lab process "
                       f"(pid {holder.pid}, lock file {run_dir / LOCK_FILE}); wait for it to finish or stop it, "
                       "or use another folder"]
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]  # the second run wrote nothing
        with pytest.raises(FolderLockedError, match=f"pid {holder.pid}"):  # the Python API alike
            TRPO("CartPole-v1", n_envs=1, n_steps=8).learn(8, run_dir=run_dir)
    finally:
        holder.kill()  # kill -9: the lock file still names it, the kernel has dropped the lock
        holder.wait()
    assert (run_dir / LOCK_FILE).read_text().strip() == str(holder.pid)
    lock = FolderLock(run_dir).acquire()
    assert lock.taken_over_from == holder.pid
    assert (run_dir / LOCK_FILE).read_text().strip() == str(os.getpid())
    lock.release()
    assert main(argv) == 0 and (run_dir / "final.pt").is_file()


def test_a_lock_is_exclusive_within_one_process_too(tmp_path: Path) -> None:
    with FolderLock(tmp_path, "compare folder"):
        with pytest.raises(FolderLockedError, match=rf"^The compare folder {tmp_path} is in use .*\(pid {os.getpid()},"):
            FolderLock(tmp_path, "compare folder").acquire()
    FolderLock(tmp_path).acquire().release()  # released on exit


@pytest.mark.parametrize("executor", ["local", pytest.param("ray", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("ray") is None, reason="ray not installed"))])
def test_a_second_compare_into_a_held_folder_is_refused_before_running_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], executor: str
) -> None:
    from trpo_lab.cli import main

    out = tmp_path / "out"
    holder = _hold_lock(out)
    try:
        code = main(["compare", "--algos", "trpo", "--envs", "CartPole-v1", "--seeds", "1", "--steps", "64",
                     "--out", str(out), "--executor", executor, "--quiet"])
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and f"The compare folder {out} is in use by another trpo-lab process (pid {holder.pid}" in err[0]
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]


# ---------------------------------------------------------------------------------- damaged files on resume (#18)
def _progress_after_two_updates(tmp_path: Path) -> tuple[TRPO, str]:
    agent = _tiny_trpo()
    agent.learn(2 * 16, run_dir=tmp_path, tensorboard=False)
    return agent, (tmp_path / "progress.csv").read_text()


@pytest.mark.parametrize(
    ("damage", "warning"),
    [
        (lambda text: text[:-7], r"dropped 1 damaged row\(s\) \(cut short or with the wrong number of fields\); repaired"),
        (lambda text: text.replace("\n", "\n1,2\n", 1), r"dropped 1 damaged row"),
        (lambda text: text.splitlines()[0][:10], r"held only part of its header \(10 bytes\); it starts over"),
        (lambda text: text.split("\n")[0] + "\n" + text.split("\n")[1] + "\n",
         r"holds rows up to update 1 but the checkpoint is at update 2: the rows of updates 2..2 are missing"),
        (lambda text: b"\xff\xfe\x00garbage", r"is not readable CSV text .*; kept as progress.csv.damaged"),
    ],
    ids=["last row cut short", "a row with too few fields", "header cut short", "rows missing", "not text"],
)
def test_a_damaged_progress_csv_is_repaired_with_a_warning_on_resume(
    tmp_path: Path, damage: Callable[[str], Any], warning: str
) -> None:
    agent, text = _progress_after_two_updates(tmp_path)
    damaged = damage(text)
    path = tmp_path / "progress.csv"
    path.write_bytes(damaged if isinstance(damaged, bytes) else damaged.encode())
    resumed = TRPO.load(tmp_path / "checkpoint.pt")
    with pytest.warns(UserWarning, match=warning):
        resumed.learn(3 * 16, run_dir=tmp_path, tensorboard=False)
    rows = _rows(tmp_path)
    updates = [int(float(row["updates"])) for row in rows]
    assert updates[-1] >= 3 and updates == sorted(set(updates))  # no duplicates, in order
    assert all(None not in row.values() and None not in row for row in rows)  # every row has the header's fields


def test_the_cli_resumes_a_truncated_progress_csv_with_a_one_line_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from trpo_lab.cli import main

    _progress_after_two_updates(tmp_path)
    path = tmp_path / "progress.csv"
    path.write_text(path.read_text()[:-5])
    assert main(["train", "--resume", str(tmp_path), "--steps", str(3 * 16), "--quiet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("trpo-lab: warning: ") for line in err), err
    assert "dropped 1 damaged row(s)" in err[0] and "rows of updates 2..2 are missing" in err[1]


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_a_checkpoint_cut_off_by_something_else_gives_one_clear_error(
    tmp_path: Path, fraction: float, capsys: pytest.CaptureFixture[str]
) -> None:
    from trpo_lab.cli import main

    _progress_after_two_updates(tmp_path)
    path = tmp_path / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ValueError, match=r"^Cannot load checkpoint .*checkpoint.pt: the file (is empty|is truncated or corrupt)"):
        TRPO.load(path)
    assert main(["train", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Cannot load checkpoint" in err[0]


def test_a_hand_edited_config_toml_is_checked_on_resume(tmp_path: Path) -> None:
    from trpo_lab.experiments import resume_run

    _progress_after_two_updates(tmp_path)
    config = tmp_path / "config.toml"
    original = config.read_text()
    config.write_text(original.replace("[hyperparameters]", "learning_rat = 0.1\n\n[hyperparameters]"))
    with pytest.raises(ValueError, match=r"Invalid .*config.toml: unknown key 'learning_rat'; expected some of \['algo'"):
        resume_run(tmp_path)
    config.write_text(original.replace("[hyperparameters]", "[hyperparameters]\nlearning_rat = 0.1"))
    with pytest.raises(ValueError, match=r"Invalid .*config.toml: Unknown hyperparameter 'learning_rat' for trpo; "
                                         r"did you mean learning_rate"):
        resume_run(tmp_path)
    config.write_text(original.replace("gamma = 0.99", "gamma = 7"))
    with pytest.raises(ValueError, match=r"Invalid .*config.toml: Invalid gamma: 7.0; expected in \(0, 1\]"):
        resume_run(tmp_path)
    config.write_text(original)
    agent, budget = resume_run(tmp_path)
    assert budget == 2 * 16 and agent.num_updates == 2
    agent.close()

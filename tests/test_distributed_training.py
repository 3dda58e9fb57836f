"""Data-parallel training (issue #8) on 2 gloo processes spawned by the tests.

What is proven: the ranks stay bit-identical for every agent through gloo; the first TRPO
step on a batch split over 2 ranks equals the single-process step on the whole batch; a
resumed 2-rank run repeats the uninterrupted one exactly; drift is caught; 2 ranks x 4 envs learn CartPole-v1
within the single-process budget of 1 rank x 8 envs; a dead or hung rank stops the other
with one line within the timeout; ``trpo-lab train --nproc 2`` runs end to end; and
``compare --executor ray`` writes what the local executor writes.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from spawn_ranks import free_port, spawn_two

from trpo_lab.distributed import DistributedContext, RankDriftError, init_distributed
from trpo_lab.envs import running_statistics
from trpo_lab.logging import TIMING_COLUMNS
from trpo_lab.rollout.buffer import RolloutBatch


def _join(rank: int, port: int, timeout_s: float = 60.0, check_every: int = 10) -> DistributedContext:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    ctx = init_distributed("gloo", timeout_s=timeout_s, check_every=check_every)
    assert ctx is not None
    return ctx


def _flat(agent: Any) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in agent.policy.parameters()])


def _progress(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "progress.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    timing = {*TIMING_COLUMNS, "dist/bytes_reduced"}
    return [{k: v for k, v in row.items() if k not in timing} for row in rows]


# ---------------------------------------------------------------------------- lock-step ranks
_LOCKSTEP_CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("trpo", "CartPole-v1", {}),
    ("trpo", "Pendulum-v1", {"curvature": "kfac", "normalize_obs": True, "normalize_reward": True}),
    ("trpo", "CartPole-v1", {"critic_optimizer": "lbfgs", "sub_sampling_factor": 3}),
    ("npg", "Pendulum-v1", {"normalize_obs": True}),
    ("acktr", "CartPole-v1", {}),
    ("ppo", "Pendulum-v1", {"batch_size": 50, "target_kl": 0.02, "normalize_obs": True}),
]


def _lockstep_worker(rank: int, port: int, out_dir: str) -> None:
    from trpo_lab.agents import agent_class

    ctx = _join(rank, port, check_every=2)
    out = Path(out_dir)
    results: dict[str, Any] = {}
    for i, (algo, env_id, extra) in enumerate(_LOCKSTEP_CASES):
        agent = agent_class(algo)(env_id, n_envs=2, seed=3, dist=ctx, n_steps=64, **extra)
        sizes: list[int] = []
        agent.learn(1_500, callback=lambda a, m: sizes.append(a.reducer.total_count) or None)  # noqa: B023
        rms = running_statistics(agent.env)
        results[f"{i}"] = {
            "params": _flat(agent),
            "timesteps": agent.num_timesteps,
            "sizes": sizes,
            "rms": {name: (r.mean.copy(), r.var.copy(), r.count) for name, r in rms.items()},
            "bytes": ctx.bytes_reduced,
        }
        agent.close()
    # the dense Fisher reference is single-process only: refused before any collective
    with pytest.raises(ValueError, match="data-parallel"):
        agent_class("trpo")("CartPole-v1", n_envs=1, dist=ctx, curvature="exact", policy_kwargs={"net_arch": [4]})
    # resume: 4 updates + checkpoint + load on every rank + 4 more == 8 uninterrupted updates
    from trpo_lab.agents.trpo import TRPO

    settings: dict[str, Any] = {"n_envs": 2, "seed": 5, "n_steps": 64, "normalize_obs": True, "checkpoint_every": 2}
    TRPO("Pendulum-v1", dist=ctx, **settings).learn(8 * 2 * 2 * 64, run_dir=out / "whole", tensorboard=False)
    TRPO("Pendulum-v1", dist=ctx, **settings).learn(4 * 2 * 2 * 64, run_dir=out / "cut", tensorboard=False)
    resumed = TRPO.load(out / "cut" / "checkpoint.pt", dist=ctx)
    resumed.learn(8 * 2 * 2 * 64, run_dir=out / "cut", tensorboard=False)
    results["resumed"] = _flat(resumed)
    # drift: rank 1 nudges a parameter after update 3; the check at update 4 stops both ranks
    agent = TRPO("CartPole-v1", n_envs=2, seed=0, dist=ctx, n_steps=32)

    def nudge(a: Any, metrics: dict[str, float]) -> None:
        if rank == 1 and a.num_updates == 3:
            with torch.no_grad():
                next(a.policy.parameters()).view(-1)[0] += 1e-6

    try:
        agent.learn(10_000, callback=nudge)
    except RankDriftError as exc:
        results["drift"] = (agent.num_updates, str(exc))
    torch.save(results, out / f"rank{rank}.pt")
    ctx.close()


def test_ranks_stay_bit_identical_resume_exactly_and_drift_is_caught(tmp_path: Path) -> None:
    spawn_two(_lockstep_worker, str(tmp_path))
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    for i, (algo, env_id, extra) in enumerate(_LOCKSTEP_CASES):
        a, b = r0[f"{i}"], r1[f"{i}"]
        assert torch.equal(a["params"], b["params"]), (algo, env_id, extra)
        assert a["timesteps"] == b["timesteps"] == sum(a["sizes"]) >= 1_500  # every rank's steps count
        assert a["sizes"] == b["sizes"]
        assert a["bytes"] > 0
        for name, (mean, var, count) in a["rms"].items():
            np.testing.assert_array_equal(mean, b["rms"][name][0])
            np.testing.assert_array_equal(var, b["rms"][name][1])
            assert count == b["rms"][name][2]
            if name == "obs_rms":  # merged statistics count the observations of both ranks
                assert count == pytest.approx(a["timesteps"] + 4, abs=8)
    # resume restores every rank: the same parameters and the same progress.csv as one run
    assert torch.equal(r0["resumed"], r1["resumed"])
    assert _progress(tmp_path / "cut") == _progress(tmp_path / "whole")
    data = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    assert len(data["ranks"]) == 2 and data["ranks"][1]["reset_seed"] == 5 + 1000
    for rank_result in (r0, r1):
        updates, message = rank_result["drift"]
        assert updates == 4 and "drifted apart" in message


# ---------------------------------------------------------------------------- exact split
def _halves(batch_dir: Path) -> None:
    """One single-process rollout of 4 envs, split into envs (0, 1) and (2, 3)."""
    from trpo_lab.agents.trpo import TRPO

    agent = TRPO("CartPole-v1", n_envs=4, seed=0, n_steps=64)
    agent.collect_rollout()
    buffer = agent.buffer
    fields = {
        "observations": buffer.observations, "actions": buffer.actions, "log_probs": buffer.log_probs,
        "values": buffer.values, "advantages": buffer.advantages, "returns": buffer.returns,
    }
    for rank, envs in enumerate(([0, 1], [2, 3])):
        valid = buffer.valid[:, envs].reshape(-1)
        half = RolloutBatch(**{name: t[:, envs].reshape(-1, *t.shape[2:])[valid] for name, t in fields.items()})
        torch.save(tuple(half), batch_dir / f"half{rank}.pt")
    agent.close()


def _record_steps(agent: Any) -> list[torch.Tensor]:
    steps: list[torch.Tensor] = []
    natural_step = agent.natural_step

    def recording(*args: Any) -> Any:
        step = natural_step(*args)
        steps.append(step.full_step.detach().clone())
        return step

    agent.natural_step = recording
    return steps


def _split_worker(rank: int, port: int, batch_dir: str) -> None:
    from trpo_lab.agents.trpo import TRPO

    ctx = _join(rank, port)
    half = RolloutBatch(*torch.load(Path(batch_dir) / f"half{rank}.pt"))
    agent = TRPO("CartPole-v1", n_envs=2, seed=0, n_steps=64, dist=ctx)
    steps = _record_steps(agent)
    agent._share_batch_sizes(half.size)
    agent.update(half)
    torch.save({"step": steps[0], "actor": torch.cat([p.detach().reshape(-1) for p in agent.policy.actor_parameters()])},
               Path(batch_dir) / f"rank{rank}.pt")
    ctx.close()


def test_first_trpo_step_on_a_split_batch_equals_the_single_process_step(tmp_path: Path) -> None:
    from trpo_lab.agents.trpo import TRPO

    _halves(tmp_path)
    halves = [RolloutBatch(*torch.load(tmp_path / f"half{rank}.pt")) for rank in (0, 1)]
    whole = RolloutBatch(*(torch.cat(fields) for fields in zip(*halves)))
    assert abs(halves[0].size - halves[1].size) > 0  # unequal sample counts: the weights matter
    single = TRPO("CartPole-v1", n_envs=2, seed=0, n_steps=64)
    steps = _record_steps(single)
    single.update(whole)
    spawn_two(_split_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert torch.equal(ranks[0]["step"], ranks[1]["step"]) and torch.equal(ranks[0]["actor"], ranks[1]["actor"])
    assert steps[0].norm() > 0
    torch.testing.assert_close(ranks[0]["step"], steps[0], rtol=1e-4, atol=1e-6)
    actor = torch.cat([p.detach().reshape(-1) for p in single.policy.actor_parameters()])
    torch.testing.assert_close(ranks[0]["actor"], actor, rtol=1e-4, atol=1e-6)  # same line-search outcome


# ---------------------------------------------------------------------------- learning
def _learning_worker(rank: int, port: int, algo: str, out_dir: str) -> None:
    from trpo_lab.agents import agent_class
    from trpo_lab.presets import load_preset

    ctx = _join(rank, port)
    hyperparameters, run = load_preset(algo, "CartPole-v1")
    assert int(run["n_envs"]) == 8  # the single-process test's 1 rank x 8 envs; here 2 ranks x 4 envs
    agent = agent_class(algo)("CartPole-v1", n_envs=4, seed=0, dist=ctx, **hyperparameters)
    agent.learn(int(run["total_timesteps"]), tensorboard=False)
    if ctx.is_main:
        torch.save({"timesteps": agent.num_timesteps, "budget": int(run["total_timesteps"]),
                    "per_update": 8 * agent.config.n_steps, "eval": agent.evaluate(10)}, Path(out_dir) / "result.pt")
    agent.close()
    ctx.close()


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["trpo", "ppo"])
def test_two_ranks_of_four_envs_solve_cartpole_within_the_single_process_budget(tmp_path: Path, algo: str) -> None:
    spawn_two(_learning_worker, algo, str(tmp_path))
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    assert result["budget"] <= 100_000
    assert result["timesteps"] <= result["budget"] + result["per_update"]  # all ranks' steps counted
    assert result["eval"].mean() >= 475


# ---------------------------------------------------------------------------- the CLI
def _cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trpo_lab", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_train_nproc_2_runs_end_to_end_and_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    common = ["--quiet", "--set", "n_steps=128", "--set", "checkpoint_every=2", "--set", "policy_kwargs.net_arch=[16]"]
    first = _cli("train", "trpo", "CartPole-v1", "--nproc", "2", "--steps", "2000", "--n-envs", "2",
                 "--run-dir", str(run_dir), *common, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("trpo on CartPole-v1:") == 1  # rank 0 reports, rank 1 is silent
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("events.")) == [
        ".trpo_lab.lock", "checkpoint.pt", "config.toml", "final.pt", "progress.csv"]  # the lock: rank 0's, released
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1  # only rank 0 writes
    rows = list(csv.DictReader((run_dir / "progress.csv").open(newline="")))
    assert float(rows[0]["timesteps"]) > 2 * 128  # both ranks' steps: 2 ranks x 2 envs x 128, less resets
    assert float(rows[0]["dist/world_size"]) == 2 and float(rows[0]["dist/bytes_reduced"]) > 0
    data = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert len(data["ranks"]) == 2 and data["seed"] == 0
    resumed = _cli("train", "--resume", str(run_dir), "--nproc", "2", "--steps", "4000", "--quiet", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    more = list(csv.DictReader((run_dir / "progress.csv").open(newline="")))
    assert [int(float(r["updates"])) for r in more] == list(range(1, len(more) + 1)) and len(more) > len(rows)
    assert float(more[-1]["timesteps"]) >= 4000
    evaluated = _cli("eval", str(run_dir), "--episodes", "2", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr


def test_train_nproc_checks_arguments_before_launching(tmp_path: Path) -> None:
    for args, message in (
        (["--nproc", "2", "--set", "gama=0.9"], "Unknown hyperparameter 'gama'"),
        (["--nproc", "0"], "Invalid --nproc: 0"),
        (["--nproc", "2", "--dist-timeout", "0"], "Invalid --dist-timeout"),
    ):
        result = _cli("train", "trpo", "CartPole-v1", *args, cwd=tmp_path, timeout=60)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.stderr
    refused = _cli("compare", "--ray-address", "auto", cwd=tmp_path, timeout=60)
    assert refused.returncode == 2 and "--ray-address needs --executor ray" in refused.stderr


@pytest.mark.parametrize("failure", ["killed", "hung"])
def test_a_dead_or_hung_rank_stops_the_other_with_one_line_within_the_timeout(tmp_path: Path, failure: str) -> None:
    timeout_s = 8
    port = free_port()
    run_dir = tmp_path / "run"
    ranks = []
    for rank in (0, 1):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
        ranks.append(subprocess.Popen(
            [sys.executable, "-m", "trpo_lab", "train", "trpo", "CartPole-v1", "--steps", "10000000", "--n-envs", "2",
             "--run-dir", str(run_dir), "--quiet", "--dist-timeout", str(timeout_s), "--set", "n_steps=64"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    try:
        deadline = time.monotonic() + 120
        progress = run_dir / "progress.csv"
        while not (progress.exists() and len(progress.read_text().splitlines()) >= 4):
            assert ranks[0].poll() is None and time.monotonic() < deadline, ranks[0].communicate()
            time.sleep(0.2)
        ranks[1].send_signal(signal.SIGKILL if failure == "killed" else signal.SIGSTOP)
        stopped = time.monotonic()
        _, stderr = ranks[0].communicate(timeout=timeout_s + 60)
        waited = time.monotonic() - stopped
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
            process.communicate()
    assert ranks[0].returncode == 1
    assert waited < timeout_s + 30  # bounded by the collective timeout, not forever
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("trpo-lab: error: data-parallel rank 0 of 2:") and "another rank failed" in lines[0]


# ---------------------------------------------------------------------------- Ray
def _files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)).split("events.out.tfevents")[0] for p in out.rglob("*") if p.is_file())


def test_compare_on_ray_writes_what_the_local_executor_writes_and_a_rerun_skips(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    from trpo_lab.experiments import experiment_from_dict, run_experiment

    experiment = experiment_from_dict(
        {"algos": ["trpo", "ppo"], "envs": ["CartPole-v1"], "seeds": 1, "steps": 1500, "eval_episodes": 2},
        "tiny", "test",
    )
    quiet: dict[str, Any] = {"progress": False, "log": lambda line: None}
    local = run_experiment(experiment, tmp_path / "local", workers=2, **quiet)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        on_ray = run_experiment(experiment, tmp_path / "ray", executor="ray", **quiet)
        again = run_experiment(experiment, tmp_path / "ray", executor="ray", **quiet)
    finally:
        ray.shutdown()
    assert not local.failures and not on_ray.failures
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")
    assert "summary.csv" in _files(tmp_path / "ray") and "report.md" in _files(tmp_path / "ray")
    timing = {"wall_s", "fps", "eval_s", "cpu_s"}

    def summary(out: Path) -> list[dict[str, str]]:
        rows = csv.DictReader((out / "summary.csv").open(newline=""))
        return [{k: v for k, v in row.items() if k not in timing} for row in rows]

    assert summary(tmp_path / "ray") == summary(tmp_path / "local")  # same seeds, same results
    for run in (tmp_path / "local" / "runs").iterdir():
        assert _progress(run) == _progress(tmp_path / "ray" / "runs" / run.name)
    assert sorted(again.skipped) == ["CartPole-v1-ppo-seed0", "CartPole-v1-trpo-seed0"]

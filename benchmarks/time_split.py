"""Where a training run's time goes: the environments, the rest of the rollout, the update.

Runs one agent with the settings of ``throughput.py`` (8 envs, one torch thread, a short
warm-up run first) and times, with ``time.perf_counter`` around each piece, the vector
env's ``step``, the whole rollout, and the update; for TRPO also the actor's natural
step, the line search and the critic fit.  The environments are the floor no framework can
go under, and the update is arithmetic fixed by the hyperparameters, so this tells how far
a throughput ratio against Stable-Baselines3 can still move.

    python benchmarks/time_split.py --algo trpo --env CartPole-v1 --steps 40000
    python benchmarks/time_split.py --algo acktr --env CartPole-v1 --steps 40000
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from typing import Any

import torch
from throughput import SETTINGS

from trpo_lab.agents import agent_class

PIECES = {
    "trpo": ("natural_step", "apply_step", "fit_critic"),
}


def _timed(totals: dict[str, float], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - start

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algo", default="trpo", choices=sorted(set(SETTINGS) - {"a2c"}))
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("--n-envs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40_000)
    parser.add_argument("--warmup", type=int, default=4_096)
    args = parser.parse_args()
    torch.set_num_threads(1)
    algo = args.algo
    agent = agent_class(algo)(args.env, n_envs=args.n_envs, seed=0, **SETTINGS[args.algo])
    agent.learn(args.warmup, tensorboard=False)
    totals: dict[str, float] = {}
    agent.env.step = _timed(totals, "env.step", agent.env.step)  # type: ignore[method-assign]
    for name in ("collect_rollout", "update", *PIECES.get(algo, ())):
        setattr(agent, name, _timed(totals, name, getattr(agent, name)))
    start_steps, start = agent.num_timesteps, time.perf_counter()
    agent.learn(start_steps + args.steps, tensorboard=False)
    total = time.perf_counter() - start
    steps = agent.num_timesteps - start_steps
    agent.close()
    rollout, update, env = totals["collect_rollout"], totals["update"], totals["env.step"]
    rows = [
        ("environments (vector env step)", env),
        ("rest of the rollout (policy, buffer, GAE)", rollout - env),
        ("update", update),
        *((f"  {name}", totals[name]) for name in PIECES.get(algo, ())),
        ("rest (update guard, logging, ...)", total - rollout - update),
    ]
    print(f"{algo} on {args.env}: {steps} steps in {total:.2f} s ({steps / total:,.0f} steps/s), "
          f"n_envs={args.n_envs}, {SETTINGS[args.algo]}, 1 thread")
    for label, seconds in rows:
        print(f"  {label:42s} {seconds:6.2f} s  {100 * seconds / total:5.1f}%")


if __name__ == "__main__":
    import sys

    sys.path.append(sys.path.pop(0))  # this folder last: its mujoco.py must not shadow the mujoco package
    main()

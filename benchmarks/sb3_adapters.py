"""trpo_lab's SB3 adapters against their SB3 counterparts: env-steps/s and final return, as ratios.

Pairs (same SB3 VecEnv, policy, seed and the hyperparameters both sides share):

- ``trpo``:  ``trpo_lab.sb3.TRPO``  vs ``sb3_contrib.TRPO`` (identical hyperparameters);
- ``acktr``: ``trpo_lab.sb3.ACKTR`` vs ``stable_baselines3.A2C`` (same n_envs, n_steps, gamma;
  otherwise each algorithm's defaults: ACKTR's K-FAC lr 0.25 / kl_clip 1e-3, A2C's RMSprop 7e-4).

Runs are interleaved (ours, theirs, then theirs, ours on the next repeat) after a short warm-up
of each, all in one process with one torch thread, so machine noise hits both sides alike. The
final return is ``evaluate_policy`` (deterministic, 10 episodes, a separate env) of the trained
model. Figures: median env-steps/s and final return per side, and ours / theirs.

    python benchmarks/sb3_adapters.py --steps 20000 --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

N_ENVS = 8
# Shared settings per pair and env (sb3-contrib / SB3 names).
SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "trpo": {
        "CartPole-v1": {"n_steps": 256, "batch_size": 256, "cg_max_steps": 10, "n_critic_updates": 5},
        "Pendulum-v1": {"n_steps": 128, "batch_size": 128, "gamma": 0.9, "n_critic_updates": 20},
    },
    "acktr": {
        "CartPole-v1": {"n_steps": 20},
        "Pendulum-v1": {"n_steps": 20, "gamma": 0.9},
    },
}


def _classes(pair: str) -> tuple[type[BaseAlgorithm], type[BaseAlgorithm]]:
    if pair == "trpo":
        from sb3_contrib import TRPO as Theirs

        from trpo_lab.sb3 import TRPO as Ours
    else:
        from stable_baselines3 import A2C as Theirs

        from trpo_lab.sb3 import ACKTR as Ours
    return Ours, Theirs


def run(cls: type[BaseAlgorithm], env_id: str, settings: dict[str, Any], steps: int) -> tuple[float, float]:
    """Train once; returns (env-steps/s of learn(), deterministic mean return of the result)."""
    env = make_vec_env(env_id, n_envs=N_ENVS, seed=0)
    model = cls("MlpPolicy", env, seed=0, device="cpu", **settings)
    start = time.perf_counter()
    model.learn(steps)
    fps = model.num_timesteps / (time.perf_counter() - start)
    final_return, _ = evaluate_policy(model, make_vec_env(env_id, n_envs=1, seed=1_000), n_eval_episodes=10)
    env.close()
    return fps, float(final_return)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default="trpo,acktr", help="comma-separated: trpo, acktr")
    parser.add_argument("--envs", default="CartPole-v1,Pendulum-v1")
    parser.add_argument("--steps", type=int, default=50_000, help="env steps per run")
    parser.add_argument("--warmup", type=int, default=2_048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pairs = [p for p in args.pairs.split(",") if p]
    envs = [e for e in args.envs.split(",") if e]
    for pair in pairs:
        if pair not in SETTINGS:
            parser.error(f"unknown pair {pair!r}; expected some of {', '.join(SETTINGS)}")

    results: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    jobs: list[tuple[str, str, str, Callable[[int], tuple[float, float]]]] = []
    for pair in pairs:
        ours, theirs = _classes(pair)
        for env_id in envs:
            settings = SETTINGS[pair][env_id]
            for side, cls in (("ours", ours), ("theirs", theirs)):
                jobs.append((pair, env_id, side, lambda steps, c=cls, e=env_id, s=settings: run(c, e, s, steps)))
    for _, _, _, job in jobs:
        job(args.warmup)
    for repeat in range(args.repeats):
        for index in range(0, len(jobs), 2):
            pair_jobs = jobs[index : index + 2] if repeat % 2 == 0 else jobs[index : index + 2][::-1]
            for pair, env_id, side, job in pair_jobs:
                results.setdefault((pair, env_id, side), []).append(job(args.steps))

    print(f"steps per run {args.steps}, repeats {args.repeats}, n_envs {N_ENVS}, torch threads 1")
    header = f"{'pair':6} {'env':12} {'fps ours':>9} {'fps theirs':>10} {'ratio':>6} {'ret ours':>9} {'ret theirs':>10}"
    print(header)
    print("-" * len(header))
    for pair in pairs:
        for env_id in envs:
            ours_runs, theirs_runs = results[(pair, env_id, "ours")], results[(pair, env_id, "theirs")]
            fps_ours = statistics.median(r[0] for r in ours_runs)
            fps_theirs = statistics.median(r[0] for r in theirs_runs)
            ret_ours = statistics.median(r[1] for r in ours_runs)
            ret_theirs = statistics.median(r[1] for r in theirs_runs)
            print(
                f"{pair:6} {env_id:12} {fps_ours:9.0f} {fps_theirs:10.0f} {fps_ours / fps_theirs:6.2f} "
                f"{ret_ours:9.1f} {ret_theirs:10.1f}"
            )
    print("pairs: trpo = trpo_lab.sb3.TRPO vs sb3_contrib.TRPO; acktr = trpo_lab.sb3.ACKTR vs stable_baselines3.A2C")


if __name__ == "__main__":
    import sys

    sys.path.append(sys.path.pop(0))  # this folder last: its mujoco.py must not shadow the mujoco package
    main()

"""Training env-steps/s as a fraction of the random-action vector-env rate (the physics floor).

    python benchmarks/physics_floor.py --algo trpo --env HalfCheetah-v5 --steps 20000

Issue #6's target: >= 35% on HalfCheetah-v5.  Both rates use the same vector env
(``make_vec_env`` with the preset's n_envs, vectorization and normalization), one torch
thread, interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from trpo_lab.agents import agent_class
from trpo_lab.envs import make_vec_env
from trpo_lab.presets import load_preset


def random_rate(env_id: str, n_envs: int, steps: int, **env_args: object) -> float:
    env = make_vec_env(env_id, n_envs, seed=0, **env_args)  # type: ignore[arg-type]
    env.reset(seed=0)
    n = max(1, steps // n_envs)
    space = env.single_action_space
    actions = [np.stack([space.sample() for _ in range(n_envs)]) for _ in range(16)]
    start = time.perf_counter()
    for i in range(n):
        env.step(actions[i % 16])
    rate = n * n_envs / (time.perf_counter() - start)
    env.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algo", default="trpo")
    parser.add_argument("--env", default="HalfCheetah-v5")
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    hyperparameters, run = load_preset(args.algo, args.env)
    n_envs = int(run.get("n_envs", 8))
    env_args = {"normalize_obs": hyperparameters.get("normalize_obs", False),
                "normalize_reward": hyperparameters.get("normalize_reward", False)}
    physics, training = [], []
    for _ in range(args.repeats):
        physics.append(random_rate(args.env, n_envs, args.steps, **env_args))
        agent = agent_class(args.algo)(args.env, n_envs=n_envs, seed=0, **hyperparameters)
        agent.learn(agent.n_envs * agent.config.n_steps, tensorboard=False)  # warm-up update
        start_steps, start = agent.num_timesteps, time.perf_counter()
        agent.learn(start_steps + args.steps, tensorboard=False)
        training.append((agent.num_timesteps - start_steps) / (time.perf_counter() - start))
        agent.close()
    p, t = statistics.median(physics), statistics.median(training)
    print(f"{args.algo} on {args.env}: n_envs={n_envs}, preset hyperparameters, 1 thread, {args.repeats} interleaved repeats")
    print(f"  random-action vector env {p:9.0f} steps/s")
    print(f"  training                 {t:9.0f} steps/s")
    print(f"  training / physics floor = {100 * t / p:.0f}%")


if __name__ == "__main__":
    import sys

    sys.path.append(sys.path.pop(0))  # this folder last: its mujoco.py must not shadow the mujoco package
    main()

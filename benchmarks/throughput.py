"""Training throughput (env-steps/s) of trpo_lab against Stable-Baselines3 / sb3-contrib.

Both sides train with the same hyperparameters, the same number of environments and one
torch thread, in the same process, interleaved (ours, theirs, ours, theirs, ...) after a
short warm-up run each, so machine noise hits both alike.  The figure that matters is the
ratio of medians.

    python benchmarks/throughput.py --algo trpo --env CartPole-v1 --steps 50000 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

# The settings issue #6 fixes for the ratios (same names on both sides).
SETTINGS: dict[str, dict[str, Any]] = {
    "trpo": {"n_steps": 256, "batch_size": 256, "cg_max_steps": 10, "n_critic_updates": 5},
    "ppo": {"n_steps": 256, "batch_size": 256, "n_epochs": 4},
    "a2c": {"n_steps": 8},
    "acktr": {"n_steps": 8},
}


def ours(algo: str, env_id: str, n_envs: int, settings: dict[str, Any]) -> Callable[[int], Any]:
    from trpo_lab.agents import agent_class

    def run(steps: int) -> Any:
        agent = agent_class(algo)(env_id, n_envs=n_envs, seed=0, **settings)
        agent.learn(steps, tensorboard=False)
        agent.close()
        return agent

    return run


def theirs(algo: str, env_id: str, n_envs: int, settings: dict[str, Any]) -> Callable[[int], Any]:
    from stable_baselines3.common.env_util import make_vec_env

    if algo == "trpo":
        from sb3_contrib import TRPO as cls
    elif algo == "ppo":
        from stable_baselines3 import PPO as cls
    elif algo in ("a2c", "acktr"):
        from stable_baselines3 import A2C as cls

        settings = {k: v for k, v in settings.items() if k in ("n_steps",)}
    else:
        raise ValueError(f"No Stable-Baselines3 counterpart for {algo!r}")

    def run(steps: int) -> Any:
        env = make_vec_env(env_id, n_envs=n_envs, seed=0)
        model = cls("MlpPolicy", env, seed=0, device="cpu", verbose=0, **settings)
        model.learn(steps)
        env.close()
        return model

    return run


def timed(fn: Callable[[int], Any], steps: int) -> float:
    start = time.perf_counter()
    fn(steps)
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algo", default="trpo", choices=sorted(SETTINGS))
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("--n-envs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50_000)
    parser.add_argument("--warmup", type=int, default=4_096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = SETTINGS[args.algo]
    baseline_algo = {"acktr": "a2c"}.get(args.algo, args.algo)
    runners = {
        "trpo_lab": ours(args.algo, args.env, args.n_envs, settings),
        "sb3": theirs(baseline_algo, args.env, args.n_envs, settings),
    }
    for fn in runners.values():
        fn(args.warmup)
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, fn in runners.items():
            rates[name].append(timed(fn, args.steps))
    med = {name: statistics.median(r) for name, r in rates.items()}
    print(f"{args.algo} vs SB3 {baseline_algo} on {args.env}: n_envs={args.n_envs}, {settings}, "
          f"{args.steps} steps x {args.repeats} interleaved repeats, 1 thread")
    for name, r in rates.items():
        print(f"  {name:9s} median {med[name]:9.0f} steps/s   runs {[round(x) for x in r]}")
    print(f"  ratio trpo_lab / sb3 = {med['trpo_lab'] / med['sb3']:.2f}x")


if __name__ == "__main__":
    main()

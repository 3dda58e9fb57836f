"""Atari: our ACKTR against SB3's A2C and our PPO against SB3's PPO, side by side.

Every pair trains on the same game for the same number of emulator frames, on the same
seeds, in one invocation, one torch thread each, interleaved (ours, theirs, per seed):

* ACKTR: ``agents/acktr.toml``'s Atari preset (the paper's settings, shared Nature-CNN trunk)
  against SB3's A2C with rl-baselines3-zoo's Atari settings (16 envs x 5 steps,
  RMSpropTFLike eps 1e-5, ent_coef 0.01, vf_coef 0.25);
* PPO: ``agents/ppo.toml``'s Atari preset against SB3's PPO with the same (rl-zoo) values:
  8 envs x 128 steps, 4 epochs of 256, lr 2.5e-4, clip 0.1, ent_coef 0.01, vf_coef 0.5
  (both held constant: the zoo's linear decay is left out on both sides).

Environments: ours through :func:`trpo_lab.make_vec_env` (Gymnasium's AtariPreprocessing +
FrameStackObservation(4), clipped rewards, raw scores logged); SB3's through its own
``make_atari_env`` + ``VecFrameStack(4)`` (its AtariWrapper: the same no-op reset, frame
skip 4 with max-pooling, 84 x 84 grayscale and reward clipping; its Monitor logs raw scores).

Frames and steps: one agent step is 4 frames; ``--frames`` is the budget in frames, the
table gives both. Reported per run: the mean raw return of the last 100 episodes against
frames (sampled at every update), wall time, agent steps/s; per pair the steps/s ratio.
The result file (``--out``, JSON, written atomically) holds every curve.

    python benchmarks/atari.py --frames 2000000 --seeds 3                 # the README figure
    python benchmarks/atari.py --frames 40000 --seeds 1 --out benchmarks/results/atari_pong_short.json
    python benchmarks/atari.py --algos ppo --frames 40000 --set policy_kwargs.features_extractor_kwargs.compute_dtype=bfloat16
    python benchmarks/atari.py --algos ppo --side ours --out ours.json   # one side: resumable pieces
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

FRAME_SKIP = 4
PAIRS = {"acktr": "a2c", "ppo": "ppo"}


def run_ours(algo: str, env_id: str, seed: int, steps: int, overrides: Sequence[str] = ()) -> dict[str, Any]:
    from trpo_lab.agents import agent_class
    from trpo_lab.config import parse_set_option
    from trpo_lab.presets import load_preset

    hyperparameters, run = load_preset(algo, env_id)
    for item in overrides:  # trpo-lab train's --set, on top of the preset
        parse_set_option(item, hyperparameters)
    agent = agent_class(algo)(env_id, n_envs=int(run["n_envs"]), seed=seed, **hyperparameters)
    curve: list[tuple[float, float]] = []

    def record(_: Any, metrics: dict[str, float]) -> None:
        ret = metrics.get("rollout/return_mean", float("nan"))
        if np.isfinite(ret):
            curve.append((metrics["time/frames"], ret))

    start = time.perf_counter()
    agent.learn(steps, callback=record, tensorboard=False)
    wall = time.perf_counter() - start
    result = {"steps": agent.num_timesteps, "wall_s": wall, "curve": curve, "n_envs": agent.n_envs}
    agent.close()
    return result


def run_theirs(algo: str, env_id: str, seed: int, steps: int) -> dict[str, Any]:
    from stable_baselines3 import A2C, PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_atari_env
    from stable_baselines3.common.sb2_compat.rmsprop_tf_like import RMSpropTFLike
    from stable_baselines3.common.vec_env import VecFrameStack

    from trpo_lab.envs.atari import register_atari

    register_atari()
    if algo == "a2c":
        n_envs = 16
        kwargs: dict[str, Any] = {
            "ent_coef": 0.01, "vf_coef": 0.25,
            "policy_kwargs": {"optimizer_class": RMSpropTFLike, "optimizer_kwargs": {"eps": 1e-5}},
        }
        cls: Any = A2C
    else:
        n_envs = 8
        kwargs = {"n_steps": 128, "n_epochs": 4, "batch_size": 256, "learning_rate": 2.5e-4, "clip_range": 0.1,
                  "ent_coef": 0.01, "vf_coef": 0.5}
        cls = PPO
    env = VecFrameStack(make_atari_env(env_id, n_envs=n_envs, seed=seed), n_stack=4)
    model = cls("CnnPolicy", env, seed=seed, device="cpu", verbose=0, **kwargs)
    curve: list[tuple[float, float]] = []

    class Record(BaseCallback):
        def _on_step(self) -> bool:
            return True

        def _on_rollout_end(self) -> None:
            if model.ep_info_buffer:
                frames = float(model.num_timesteps * FRAME_SKIP)
                curve.append((frames, float(np.mean([info["r"] for info in model.ep_info_buffer]))))

    start = time.perf_counter()
    model.learn(steps, callback=Record())
    wall = time.perf_counter() - start
    env.close()
    return {"steps": model.num_timesteps, "wall_s": wall, "curve": curve, "n_envs": n_envs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="PongNoFrameskip-v4")
    parser.add_argument("--frames", type=int, default=2_000_000, help="emulator frames per run (4 per agent step)")
    parser.add_argument("--seeds", type=int, default=1, help="how many seeds (default 1)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first..first+N-1 (default 0)")
    parser.add_argument("--algos", default="acktr,ppo", help="ours, each against its SB3 pair (acktr: A2C)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="JSON result file (written atomically)")
    parser.add_argument(
        "--side", choices=("both", "ours", "peer"), default="both",
        help="both (default, interleaved per seed), or one side only: a long comparison in resumable pieces, "
             "or another setting of ours (--set) against an earlier file's SB3 runs (they repeat exactly on "
             "one machine); with one side no steps/s ratio is printed",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override one of our presets' values, as trpo-lab train --set does (repeatable; SB3's side is unchanged)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = args.frames // FRAME_SKIP
    algos = [a for a in args.algos.split(",") if a]
    unknown = sorted(set(algos) - set(PAIRS))
    if unknown:
        parser.error(f"unknown --algos {unknown}; expected some of {sorted(PAIRS)}")
    if args.seeds < 1 or args.first_seed < 0:
        parser.error(f"invalid --seeds {args.seeds} / --first-seed {args.first_seed}; expected >= 1 / >= 0")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))

    results: dict[str, list[dict[str, Any]]] = {}
    for algo in algos:
        for seed in seeds:
            if args.side != "peer":
                results.setdefault(f"ours/{algo}", []).append(run_ours(algo, args.env, seed, steps, args.set))
            if args.side != "ours":
                results.setdefault(f"sb3/{PAIRS[algo]}", []).append(run_theirs(PAIRS[algo], args.env, seed, steps))

    print(f"{args.env}: {args.frames} frames = {steps} agent steps per run, seeds {seeds}, {args.threads} thread(s)"
          + (f", ours with {args.set}" if args.set else ""))
    print(f"{'run':12s} {'n_envs':>6s} {'wall_s':>8s} {'steps/s':>8s} {'final return (last 100 ep.)':>30s}")
    rate: dict[str, float] = {}
    for name, runs in results.items():
        rates = [r["steps"] / r["wall_s"] for r in runs]
        rate[name] = statistics.median(rates)
        finals = [r["curve"][-1][1] if r["curve"] else float("nan") for r in runs]
        print(f"{name:12s} {runs[0]['n_envs']:6d} {statistics.median(r['wall_s'] for r in runs):8.1f} "
              f"{rate[name]:8.1f} {str([round(f, 2) for f in finals]):>30s}")
    ratios = {} if args.side != "both" else {a: rate[f"ours/{a}"] / rate[f"sb3/{PAIRS[a]}"] for a in algos}
    for algo, ratio in ratios.items():
        print(f"steps/s ratio ours/{algo} / sb3/{PAIRS[algo]} = {ratio:.2f}x")
    for name, runs in results.items():
        for seed, r in zip(seeds, runs, strict=True):
            points = r["curve"][:: max(1, len(r["curve"]) // 8)]
            print(f"  {name} seed {seed} return vs frames: " + ", ".join(f"{int(f)}:{v:.1f}" for f, v in points))
    if args.out is not None:
        from trpo_lab.logging import atomic_write_text

        payload = {"env": args.env, "frames": args.frames, "agent_steps": steps, "seeds": seeds,
                   "threads": args.threads, "overrides": args.set, "side": args.side, "runs": results,
                   "steps_per_s_ratio": ratios}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(payload, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""PPO on Pong against this CPU's compute floor: which steps/s ratio over SB3 PPO is reachable.

    python benchmarks/atari_floor.py --updates 4 --repeats 3

Issue 15 asks for our PPO at >= 1.5x SB3 PPO's steps/s on Pong. Both run the same rl-zoo
settings (8 envs x 128 steps, 4 epochs of 256 frames, the Nature CNN with a shared trunk), so
both do the same arithmetic on the same frames; this script measures how much of our time
is that arithmetic and how fast this core can do it. One torch thread; per 1,024-step
iteration (one rollout and one update):

* ``emulator``: the same vector env (``make_vec_env``, 8 envs, the Atari wrappers) stepped
  128 times with random actions;
* ``flops``: the floating-point operations of one of our iterations (the rollout's forwards,
  the update's forward and backward passes, Adam), counted with
  ``torch.utils.flop_counter.FlopCounterMode``, and the same count for SB3's iteration;
* ``peak``: this core's float32 rate, the best of large square ``torch.mm`` products (the
  network's convolutions and products, timed alone, run below it);
* ``floor = emulator + flops / peak``: what our iteration's work would take with every
  operation at that rate (memory-bound ones cost time and no FLOPs, so the real bound is higher);
* measured: our iterations (rollout, update) and SB3 PPO's (``rollout_start`` to
  ``rollout_start``), interleaved, ``--repeats`` times, medians.

It prints the measured ratio and the largest ratio the floor allows, SB3's iteration time
over our floor. Neither agent learns anything in a few updates; this is for time only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

ENV_ID = "PongNoFrameskip-v4"
N_ENVS, N_STEPS = 8, 128
SB3_PPO: dict[str, Any] = {"n_steps": N_STEPS, "n_epochs": 4, "batch_size": 256, "learning_rate": 2.5e-4, "clip_range": 0.1,
           "ent_coef": 0.01, "vf_coef": 0.5}  # benchmarks/atari.py's rl-zoo values


def peak_gflops(sizes: tuple[int, ...] = (1024, 2048), repeats: int = 5) -> float:
    """The best float32 ``torch.mm`` rate (GFLOP/s, 2 per multiply-add) over ``sizes``."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def emulator_seconds(n_envs: int, n_steps: int, seed: int) -> float:
    """Seconds for ``n_steps`` random-action steps of our Atari vector env."""
    from trpo_lab.envs import make_vec_env

    env = make_vec_env(ENV_ID, n_envs, seed=seed)
    env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    actions = rng.integers(0, env.single_action_space.n, size=(n_steps, n_envs))  # type: ignore[attr-defined]
    start = time.perf_counter()
    for step in range(n_steps):
        env.step(actions[step])
    elapsed = time.perf_counter() - start
    env.close()
    return elapsed


class Ours:
    """Our PPO with its Pong preset; iterations timed by the training loop's own split."""

    def __init__(self, seed: int) -> None:
        from trpo_lab import PPO

        self.agent = PPO.from_preset(ENV_ID, seed=seed)
        self.per_iteration = self.agent.n_envs * self.agent.config.n_steps
        self.agent.learn(self.per_iteration, tensorboard=False)  # warm-up

    def iterations(self, updates: int) -> list[tuple[float, float]]:
        split: list[tuple[float, float]] = []
        self.agent.learn(self.agent.num_timesteps + updates * self.per_iteration, tensorboard=False,
                         callback=lambda _, m: split.append((m["time/rollout_s"], m["time/update_s"])))
        return split

    def flops(self) -> int:
        with FlopCounterMode(display=False) as counter:
            self.agent.learn(self.agent.num_timesteps + self.per_iteration, tensorboard=False)
        return int(counter.get_total_flops())


class Theirs:
    """SB3's PPO with the same settings (benchmarks/atari.py's environment and values)."""

    def __init__(self, seed: int) -> None:
        from stable_baselines3 import PPO
        from stable_baselines3.common.callbacks import BaseCallback
        from stable_baselines3.common.env_util import make_atari_env
        from stable_baselines3.common.vec_env import VecFrameStack

        from trpo_lab.envs.atari import register_atari

        register_atari()
        env = VecFrameStack(make_atari_env(ENV_ID, n_envs=N_ENVS, seed=seed), n_stack=4)
        self.model = PPO("CnnPolicy", env, seed=seed, device="cpu", verbose=0, **SB3_PPO)
        self.per_iteration = N_ENVS * N_STEPS
        self.marks: list[tuple[str, float]] = []
        marks = self.marks

        class Marks(BaseCallback):
            def _on_step(self) -> bool:
                return True

            def _on_rollout_start(self) -> None:
                marks.append(("start", time.perf_counter()))

            def _on_rollout_end(self) -> None:
                marks.append(("end", time.perf_counter()))

        self.callback = Marks()
        self.model.learn(self.per_iteration)  # warm-up

    def iterations(self, updates: int) -> list[tuple[float, float]]:
        """(rollout, update) seconds of ``updates`` iterations: rollout start to end, end to the next start."""
        self.marks.clear()
        # one rollout more than timed: its start closes the last timed update
        self.model.learn((updates + 1) * self.per_iteration, callback=self.callback, reset_num_timesteps=False)
        starts = [t for kind, t in self.marks if kind == "start"]
        ends = [t for kind, t in self.marks if kind == "end"]
        return [(ends[i] - starts[i], starts[i + 1] - ends[i]) for i in range(updates)]

    def flops(self) -> int:
        with FlopCounterMode(display=False) as counter:
            self.model.learn(self.per_iteration, reset_num_timesteps=False)
        return int(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=4, help="timed iterations per repeat and side (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON result file (written atomically)")
    args = parser.parse_args()
    if args.updates < 1 or args.repeats < 1:
        parser.error(f"invalid --updates {args.updates} / --repeats {args.repeats}; expected >= 1")
    torch.set_num_threads(1)

    ours, theirs = Ours(args.seed), Theirs(args.seed)
    flops_ours, flops_theirs = ours.flops(), theirs.flops()
    peaks, emulators = [], []
    ours_split: list[tuple[float, float]] = []
    theirs_split: list[tuple[float, float]] = []
    for _ in range(args.repeats):
        peaks.append(peak_gflops())
        emulators.append(emulator_seconds(N_ENVS, N_STEPS, args.seed))
        ours_split += ours.iterations(args.updates)
        theirs_split += theirs.iterations(args.updates)

    peak = max(peaks)
    emulator = statistics.median(emulators)

    def summary(split: list[tuple[float, float]]) -> dict[str, float]:
        rollout, update = statistics.median(r for r, _ in split), statistics.median(u for _, u in split)
        return {"rollout_s": rollout, "update_s": update, "iteration_s": statistics.median(r + u for r, u in split)}

    mine, peer = summary(ours_split), summary(theirs_split)
    floor = emulator + flops_ours / (peak * 1e9)
    result: dict[str, Any] = {
        "env": ENV_ID, "seed": args.seed, "updates": args.updates, "repeats": args.repeats, "threads": 1,
        "peak_gflops": peak, "emulator_s": emulator, "flops_ours": flops_ours, "flops_sb3": flops_theirs,
        "ours": mine, "sb3": peer, "floor_s": floor,
        "measured_ratio": peer["iteration_s"] / mine["iteration_s"],
        "max_ratio_at_floor": peer["iteration_s"] / floor,
        "ours_achieved_gflops": flops_ours / 1e9 / mine["iteration_s"],
        "splits": {"ours": ours_split, "sb3": theirs_split, "peaks": peaks, "emulators": emulators},
    }
    print(f"{ENV_ID}, PPO (rl-zoo settings), one thread, seed {args.seed}, "
          f"{args.repeats} x {args.updates} iterations of 1,024 steps per side, medians")
    print(f"  peak float32 rate (torch.mm): {peak:.1f} GFLOP/s")
    print(f"  FLOPs per iteration: ours {flops_ours / 1e9:.1f} G, SB3 {flops_theirs / 1e9:.1f} G")
    print(f"  emulator (random actions, same vector env): {emulator:.2f} s per iteration")
    for name, split in (("ours", mine), ("SB3 PPO", peer)):
        print(f"  {name:8s} rollout {split['rollout_s']:.2f} s + update {split['update_s']:.2f} s "
              f"= {split['iteration_s']:.2f} s per iteration")
    print(f"  floor: {emulator:.2f} s emulator + {flops_ours / 1e9 / peak:.2f} s of FLOPs at the peak rate = {floor:.2f} s")
    print(f"  measured steps/s ratio ours / SB3: {result['measured_ratio']:.2f}x; "
          f"largest ratio the floor allows: {result['max_ratio_at_floor']:.2f}x")
    if args.out is not None:
        from trpo_lab.logging import atomic_write_text

        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(result, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Does ACKTR's amortised K-FAC learn as well? ``stats_every``, ``stats_batch_size``, ``eigen_tolerance`` on pixels.

The Atari presets run the Fisher pass on every 4th update only (``stats_every = 4``) and on
a random subset of the rollout's frames (``stats_batch_size``), and skip the eigenvector
pairs of negligible curvature (``eigen_tolerance``), to cut K-FAC's cost on a CPU.
This trains ACKTR with the presets' shared Nature-CNN trunk on the two-choice pixel task
(:class:`trpo_lab.envs.visual.VisualChoiceEnv`, 36x36 frames, 8 envs x 32 steps = 256 frames
per update) under six settings, over seeds, and evaluates the greedy policy (40 episodes,
best score 8, random 4) after 4k, 8k and 12k steps:

- ``full``: the Fisher pass on every update, on all 256 frames;
- ``every4``: on every 4th update, all frames;
- ``every4_sub128`` / ``every4_sub64``: on every 4th update, 128 / 64 random frames;
- ``every4_sub128_tol``: as ``every4_sub128``, with K-FAC's ``eigen_tolerance = 1e-3`` (the
  eigenvector pairs of curvature below 1e-3 x damping left out, at most 0.1% error in the
  direction), the Atari presets' settings;
- ``every8_sub128_tol``: the same with the Fisher pass on every 8th update.

It prints the mean ± 95% Student-t interval over seeds and the worst seed per setting and
budget, and appends one JSON line per run to ``--out`` (a rerun skips the runs already there).

    python benchmarks/acktr_stats_subset.py --seeds 10
"""

from __future__ import annotations

import argparse
import functools
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from trpo_lab import ACKTR
from trpo_lab.envs.visual import VisualChoiceEnv
from trpo_lab.experiments.stats import mean_ci

SETTINGS: dict[str, dict[str, Any]] = {
    "full": {"stats_every": 1},
    "every4": {"stats_every": 4},
    "every4_sub128": {"stats_every": 4, "stats_batch_size": 128},
    "every4_sub64": {"stats_every": 4, "stats_batch_size": 64},
    "every4_sub128_tol": {"stats_every": 4, "stats_batch_size": 128, "eigen_tolerance": 1e-3},
    "every8_sub128_tol": {"stats_every": 8, "stats_batch_size": 128, "eigen_tolerance": 1e-3},
}
BUDGETS = (4096, 8192, 12288)


def run(setting: str, seed: int) -> dict[str, Any]:
    start = time.perf_counter()
    agent = ACKTR(
        functools.partial(VisualChoiceEnv, size=36), n_envs=8, seed=seed, n_steps=32,
        policy_kwargs={"share_features_extractor": True, "net_arch": []}, **SETTINGS[setting],
    )
    scores = []
    for budget in BUDGETS:
        agent.learn(budget, tensorboard=False)
        scores.append(float(agent.evaluate(40).mean()))
    agent.close()
    return {"setting": setting, "seed": seed, "scores": scores, "wall_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1 (default 10)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/acktr_stats_subset.jsonl"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="KFAC: no statistics recorded yet")
    done = {(r["setting"], r["seed"]): r for r in map(json.loads, args.out.read_text().splitlines())} if args.out.exists() else {}
    for seed in range(args.seeds):
        for setting in SETTINGS:
            if (setting, seed) not in done:
                record = done[(setting, seed)] = run(setting, seed)
                with args.out.open("a") as fh:
                    fh.write(json.dumps(record) + "\n")
    print(f"greedy score of 8 (random policy: 4), 40 episodes, seeds 0-{args.seeds - 1}: mean ± 95% CI (worst seed)")
    print(f"{'setting':15s}" + "".join(f"{f'{b:,} steps':>26s}" for b in BUDGETS))
    for setting in SETTINGS:
        runs = [done[(setting, seed)]["scores"] for seed in range(args.seeds)]
        cells = []
        for i in range(len(BUDGETS)):
            values = [r[i] for r in runs]
            mean, ci = mean_ci(values)
            cells.append(f"{mean:.2f} ± {ci:.2f} ({min(values):.2f})")
        print(f"{setting:15s}" + "".join(f"{c:>26s}" for c in cells))


if __name__ == "__main__":
    main()

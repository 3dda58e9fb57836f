"""The classic-control targets of issue 14, measured on reporting seeds with the presets.

* ACKTR on Pendulum-v1 with its preset (``agents/acktr.toml``: the adaptive step size,
  ``target_kl = 0.002``), 200k steps: mean >= -250 and no seed below -400;
* TRPO with ``curvature = "shampoo"`` and ``"kfac"`` and the default networks on
  CartPole-v1, 150k steps: >= 475.

Each run is ``ALGO.from_preset(env, seed=s, **overrides)`` trained for the budget, then
evaluated deterministically over 10 episodes (evaluation seed ``1000 + s``). ACKTR rows also
give the medians over the run of the measured KL per update (``train/kl``), the actor's step
size, the actor's KL-clip scale and the critic's explained variance. One row per run goes to
``--out``/runs.csv (written atomically after each run); the table to ``--out``/table.md.

Usage (about 15 CPU-minutes on an idle core)::

    OMP_NUM_THREADS=1 python benchmarks/classic_targets.py --seeds 0 1 2 3 4 --workers 2
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from trpo_lab.agents import agent_class
from trpo_lab.logging import atomic_write_text

#: (name, algo, env, overrides, steps, target)
CASES: list[tuple[str, str, str, dict[str, Any], int, str]] = [
    ("acktr-pendulum", "acktr", "Pendulum-v1", {}, 200_000, "mean >= -250, min >= -400"),
    ("trpo-shampoo-cartpole", "trpo", "CartPole-v1", {"curvature": "shampoo"}, 150_000, "every seed >= 475"),
    ("trpo-kfac-cartpole", "trpo", "CartPole-v1", {"curvature": "kfac"}, 150_000, "every seed >= 475"),
]
KEYS = ("train/kl", "train/actor_learning_rate", "kfac/actor/kl_scale", "train/explained_variance")


def run_one(case: str, seed: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    _, algo, env_id, overrides, steps, _ = next(c for c in CASES if c[0] == case)
    agent = agent_class(algo).from_preset(env_id, seed=seed, **overrides)
    seen: list[dict[str, float]] = []
    start = time.perf_counter()
    agent.learn(steps, callback=lambda a, m: seen.append(m) or None)
    seconds = time.perf_counter() - start
    returns = agent.evaluate(10, seed=1000 + seed)
    row: dict[str, Any] = {"case": case, "seed": seed, "steps": agent.num_timesteps,
                           "return": float(returns.mean()), "seconds": round(seconds, 1)}
    for key in KEYS:
        values = [m[key] for m in seen if key in m]
        row[key] = statistics.median(values) if values else ""
    agent.env.close()
    return row


def _write(out: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["case", "seed", "steps", "return", "seconds", *KEYS])
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda r: (r["case"], r["seed"])))
    atomic_write_text(out / "runs.csv", buffer.getvalue())
    lines = ["| case | seeds | returns | mean | min | target |", "|---|---|---|---|---|---|"]
    for name, *_, target in CASES:
        mine = sorted((r for r in rows if r["case"] == name), key=lambda r: r["seed"])
        if mine:
            values = [r["return"] for r in mine]
            lines.append(f"| {name} | {' '.join(str(r['seed']) for r in mine)} | "
                         f"{' '.join(f'{v:.0f}' for v in values)} | {statistics.mean(values):.0f} | "
                         f"{min(values):.0f} | {target} |")
    atomic_write_text(out / "table.md", "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--cases", nargs="+", default=[c[0] for c in CASES], choices=[c[0] for c in CASES])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("classic_targets"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(run_one, case, seed) for case in args.cases for seed in args.seeds]
        for future in futures:
            rows.append(future.result())
            print(rows[-1], flush=True)
            _write(args.out, rows)


if __name__ == "__main__":
    main()

"""TRPO with each curvature backend on the same problem: returns, speed, agreement with F⁻¹g.

``trpo-lab compare`` runs a grid of *algorithms* with their presets; it has no way to vary one
hyperparameter (``curvature``) of one algorithm, so this script drives the agents directly.
Every run is TRPO with the preset for its env (``agents/trpo.toml``), changed in two ways:

* ``curvature`` is the backend under test (``cg``, ``kfac``, ``shampoo``, ``exact``);
* the actor is ``pi=[16]`` for every backend (the critic keeps ``vf=[64, 64]``), because the
  dense ``exact`` solve needs a small actor (114 parameters on CartPole-v1, 82 on
  Pendulum-v1) and the backends should be compared on one network. This also lets every run
  log ``train/exact_cosine`` (``diagnostics.exact_every``).

Columns: the mean ± std over seeds of the deterministic evaluation return of the final agent
(10 episodes), the mean ``train/exact_cosine`` between the backend's direction and the exact
(F + γI)⁻¹g (every 5th update), milliseconds per update (natural step + line search + critic
fit, without the rollout, over the updates that did not run the diagnostic) and the
wall-clock seconds of a run (diagnostics included).

Usage (16 runs, about 4.5 CPU-minutes: 5 minutes on 2 idle cores, 10 on 2 shared ones)::

    python benchmarks/curvature_compare.py --seeds 2 --workers 2 --out curvature_compare
"""

from __future__ import annotations

import argparse
import csv
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

CURVATURES = ("cg", "kfac", "shampoo", "exact")
BUDGETS = {"CartPole-v1": 100_000, "Pendulum-v1": 100_000}
ACTOR = {"net_arch": {"pi": [16], "vf": [64, 64]}}
EXACT_EVERY = 5


def run_one(env_id: str, curvature: str, seed: int, steps: int) -> dict[str, Any]:
    """Train one TRPO agent and return its row of the table."""
    import torch

    torch.set_num_threads(1)
    from trpo_lab.agents.trpo import TRPO
    from trpo_lab.presets import load_preset

    hyperparameters, run = load_preset("trpo", env_id)
    agent = TRPO(
        env_id,
        n_envs=int(run.get("n_envs", 8)),
        seed=seed,
        **{
            **hyperparameters,
            "curvature": curvature,
            "policy_kwargs": ACTOR,
            "diagnostics": {"exact_every": EXACT_EVERY},
        },
    )
    cosines: list[float] = []
    update_seconds: list[float] = []

    def record(_: TRPO, metrics: dict[str, float]) -> None:
        if "train/exact_cosine" in metrics:
            cosines.append(metrics["train/exact_cosine"])
        else:  # time updates without the diagnostic's dense Fisher
            update_seconds.append(metrics["time/update_s"])

    start = time.perf_counter()
    agent.learn(steps, callback=record)
    wall = time.perf_counter() - start
    final = float(agent.evaluate(10).mean())
    agent.close()
    return {
        "env": env_id,
        "curvature": curvature,
        "seed": seed,
        "steps": agent.num_timesteps,
        "final_return": final,
        "exact_cosine": float(np.mean(cosines)),
        "update_ms": 1000.0 * float(np.mean(update_seconds)),
        "wall_s": wall,
    }


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table, one line per (env, curvature), mean ± std over seeds."""
    lines = [
        "| env | curvature | final return (mean ± std) | exact cosine | ms / update | wall s / run |",
        "|---|---|---|---|---|---|",
    ]
    for env_id in dict.fromkeys(r["env"] for r in rows):
        for curvature in dict.fromkeys(r["curvature"] for r in rows):
            group = [r for r in rows if r["env"] == env_id and r["curvature"] == curvature]
            if not group:
                continue
            returns = np.array([r["final_return"] for r in group])
            lines.append(
                f"| {env_id} | {curvature} | {returns.mean():.0f} ± {returns.std():.0f} (n={len(group)}) "
                f"| {np.mean([r['exact_cosine'] for r in group]):.2f} "
                f"| {np.mean([r['update_ms'] for r in group]):.0f} "
                f"| {np.mean([r['wall_s'] for r in group]):.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", default=",".join(BUDGETS), help="comma-separated env ids")
    parser.add_argument("--curvatures", default=",".join(CURVATURES), help="comma-separated backends")
    parser.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1")
    parser.add_argument("--steps", type=int, default=None, help="budget per run (default: per env, see BUDGETS)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--out", default=None, help="folder for results.csv and table.md")
    args = parser.parse_args()
    jobs = [
        (env_id, curvature, seed, args.steps or BUDGETS.get(env_id, 100_000))
        for env_id in args.envs.split(",")
        for curvature in args.curvatures.split(",")
        for seed in range(args.seeds)
    ]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        rows = list(pool.map(run_one, *zip(*jobs)))
    markdown = table(rows)
    print(markdown)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with (out / "results.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (out / "table.md").write_text(markdown + "\n")


if __name__ == "__main__":
    import sys

    sys.path.append(sys.path.pop(0))  # this folder last: its mujoco.py must not shadow the mujoco package
    main()

"""MuJoCo at 1M steps: our TRPO, NPG, PPO and ACKTR against sb3-contrib TRPO and SB3 PPO, side by side.

One invocation trains every (env, algorithm, seed) cell through ``trpo-lab compare``'s runner
(:func:`trpo_lab.experiments.run_experiment`): ours with their presets (``agents/*.toml`` on
the ``envs/mujoco.toml`` suite), the peers (``sb3-trpo``, ``sb3-ppo``) with
rl-baselines3-zoo's MuJoCo settings, copied from its ``hyperparams/trpo.yml`` and
``hyperparams/ppo.yml`` (:data:`trpo_lab.experiments.peers.ZOO_SETTINGS`). The runs are
interleaved: seed by seed, env by env, ours and a peer alternating, in ``--workers`` processes
of one torch thread each, so machine load hits both sides alike.

It resumes: finished runs (``result.json``) are skipped, unfinished ones continue from their
checkpoint, so the grid can be run in pieces (``--envs``, ``--algos``, ``--seeds``) into one
``--out``. The outputs always cover every finished run of the whole grid in ``--out`` (all
envs and algorithms, seeds up to ``max(--seeds, 5)``), whichever piece an invocation trained.
Outputs, in ``--out``: ``summary.csv`` (a row per run), ``report.md`` (per env: the
final deterministic return over 10 episodes, mean ± 95% CI over seeds, IQM, steps/s, wall
time), ``learning_curves.png`` (return against steps and against wall-clock), ``results.md``
(the README "Results" section) and, with ``--readme``, that section rewritten in README.md
between :data:`BEGIN` and :data:`END`.

    python benchmarks/mujoco.py --seeds 5 --workers 2                         # the full grid, hours
    nice -n 10 python benchmarks/mujoco.py --envs HalfCheetah-v5 --algos trpo,sb3-trpo --seeds 2 --workers 1
    python benchmarks/mujoco.py --report-only --readme                         # README's section from what finished
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this file's folder comes first on sys.path, where this file would shadow the
# real ``mujoco`` package (in the spawned workers too, which inherit sys.path): take it off.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from trpo_lab.experiments import Experiment, experiment_from_dict, finished_result, run_experiment  # noqa: E402
from trpo_lab.experiments.report import write_outputs  # noqa: E402
from trpo_lab.experiments.stats import AlgoSummary, summarize  # noqa: E402
from trpo_lab.logging import atomic_write_text  # noqa: E402

ENVS = ("HalfCheetah-v5", "Hopper-v5", "Walker2d-v5")
ALGOS = ("trpo", "sb3-trpo", "ppo", "sb3-ppo", "npg", "acktr")
"""Ours and the peers alternating, so the interleaved order pairs each of ours with a peer."""
PEER_OF = {"trpo": "sb3-trpo", "ppo": "sb3-ppo"}
BEGIN = "<!-- mujoco-results:begin -->"
END = "<!-- mujoco-results:end -->"
DEFAULT_SEEDS = 5
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "mujoco"


def _fmt(value: float, digits: int = 0) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{digits}f}"


def cpu_ratio(records: Sequence[Mapping[str, Any]], env_id: str, algo: str, peer: str) -> str:
    """Ours' training CPU time over the peer's, summed over the seeds where both recorded it
    (``"0.45x (2 seeds)"``; empty when none did)."""
    cpu: dict[str, dict[int, float]] = {algo: {}, peer: {}}
    for r in records:
        value = float(r.get("cpu_s", math.nan))
        if r["env"] == env_id and r["algo"] in cpu and math.isfinite(value):
            cpu[r["algo"]][int(r["seed"])] = value
    seeds = sorted(set(cpu[algo]) & set(cpu[peer]))
    if not seeds:
        return ""
    ratio = sum(cpu[algo][s] for s in seeds) / max(sum(cpu[peer][s] for s in seeds), 1e-9)
    return f"{ratio:.2f}x ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})"


def results_section(
    table: Mapping[str, Mapping[str, AlgoSummary]], steps: Mapping[str, int], eval_episodes: int, command: str,
    finished: int | None = None, total: int | None = None, records: Sequence[Mapping[str, Any]] = (),
) -> str:
    """The README "Results" section: one table per env, ours' wall time (and, from ``records``,
    CPU time) over the peer's in the same run; with ``finished`` and ``total``, how much of the
    grid the tables cover."""
    budgets = sorted(set(steps.values()))
    lines = [
        f"### Results: MuJoCo at {', '.join(f'{b:,}' for b in budgets)} steps",
        "",
        f"Made by `{command}` (`benchmarks/mujoco.py`; outputs in `benchmarks/results/mujoco/`). Final "
        f"return: the final agent's mean over {eval_episodes} deterministic episodes, mean over seeds ± the 95% "
        "Student-t interval; IQM over all evaluation episodes; wall time and steps/s of training, mean "
        "over seeds, one torch thread each; the grid runs in resumable pieces on one machine, ours and the "
        "peer interleaved within a piece, so wall time carries whatever else the machine ran. CPU time / peer's: "
        "the training's CPU seconds (`time.process_time`, which does not count the time other jobs held "
        "the core, the fairer figure on a shared machine) over the peer's, on the seeds both recorded "
        "(runs from before 2026-12-02 did not). sb3-trpo / "
        "sb3-ppo: sb3-contrib TRPO and SB3 PPO with rl-baselines3-zoo's MuJoCo settings.",
        "",
    ]
    if finished is not None and total is not None and finished < total:
        lines += [
            f"**{finished} of the grid's {total} runs have finished** (it runs in resumable pieces); the tables "
            "show those, and the seeds column says how many each row has.",
            "",
        ]
    if not table:
        return "\n".join(lines + ["No finished runs yet.", ""])
    for env_id, summaries in table.items():
        lines += [
            f"**{env_id}** ({steps.get(env_id, 0):,} steps)",
            "",
            "| algorithm | final return (mean ± 95% CI) | IQM | seeds | wall time (s) | steps/s | wall time / peer's "
            "| CPU time / peer's |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for algo, s in summaries.items():
            peer = summaries.get(PEER_OF.get(algo, ""))
            ratio = f"{s.wall_s / peer.wall_s:.2f}x" if peer is not None and peer.wall_s > 0 else ""
            cpu = cpu_ratio(records, env_id, algo, PEER_OF[algo]) if peer is not None else ""
            ci = "" if math.isnan(s.ci) else f" ± {_fmt(s.ci)}"
            lines.append(
                f"| {algo} | {_fmt(s.mean)}{ci} | {_fmt(s.iqm)} | {s.seeds} | {_fmt(s.wall_s)} | {_fmt(s.fps)} | {ratio} "
                f"| {cpu} |"
            )
        lines.append("")
    lines += ["![MuJoCo learning curves](benchmarks/results/mujoco/learning_curves.png)", ""]
    return "\n".join(lines)


def rewrite_readme(readme: Path, section: str) -> None:
    """Replace the text between :data:`BEGIN` and :data:`END` in ``readme`` with ``section``.

    Raises:
        ValueError: the markers are missing or out of order.
    """
    text = readme.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{readme} has no {BEGIN} ... {END} markers to rewrite between")
    atomic_write_text(readme, text[: start + len(BEGIN)] + "\n" + section.rstrip() + "\n" + text[end:])


def _names(value: str, option: str, allowed: Sequence[str]) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in allowed]
    if not names or bad:
        raise ValueError(f"Invalid {option}: {value!r}; expected a comma-separated list of {', '.join(allowed)}")
    return names


def _experiment(envs: Sequence[str], algos: Sequence[str], seeds: int, steps: int, eval_episodes: int) -> Experiment:
    """The grid (or a piece of it) as a ``trpo-lab compare`` experiment."""
    return experiment_from_dict(
        {"description": "MuJoCo v5 at the published scale, ours against sb3-contrib / SB3 with rl-zoo settings",
         "algos": list(algos), "suite": "mujoco", "envs": list(envs), "seeds": seeds, "steps": steps,
         "eval_episodes": eval_episodes},
        name="mujoco", origin="benchmarks/mujoco.py",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the grid, write the outputs; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", default=",".join(ENVS), help=f"comma-separated, of {', '.join(ENVS)}")
    parser.add_argument("--algos", default=",".join(ALGOS), help=f"comma-separated, of {', '.join(ALGOS)}")
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help=f"seeds 0..N-1 (default {DEFAULT_SEEDS})")
    parser.add_argument("--steps", type=int, default=1_000_000, help="env steps per run (default 1M)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--eval-episodes", type=int, default=10, help="deterministic evaluation episodes (default 10)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (default benchmarks/results/mujoco)")
    parser.add_argument("--readme", type=Path, nargs="?", const=ROOT / "README.md", default=None,
                        help="also rewrite the marked Results section of this README (default README.md)")
    parser.add_argument("--no-progress", action="store_true", help="no live progress bars")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: write the outputs from the runs of the grid already finished in --out")
    args = parser.parse_args(argv)
    try:
        envs = _names(args.envs, "--envs", ENVS)
        algos = _names(args.algos, "--algos", ALGOS)
        algos = [a for a in ALGOS if a in algos]  # the interleaving order
        for option, value in (("--seeds", args.seeds), ("--steps", args.steps), ("--workers", args.workers),
                              ("--eval-episodes", args.eval_episodes)):
            if value < 1:
                raise ValueError(f"Invalid {option}: {value}; expected an integer >= 1")
        piece = _experiment(envs, algos, args.seeds, args.steps, args.eval_episodes)
        # The outputs always cover every finished run of the whole grid in --out, not just this
        # piece's: a piece run alone would otherwise overwrite the report with its own runs only.
        grid = _experiment(list(ENVS), list(ALGOS), max(args.seeds, DEFAULT_SEEDS), args.steps, args.eval_episodes)
        failures: list[str] = []
        started = time.perf_counter()
        if not args.report_only:
            failures = run_experiment(piece, args.out, workers=args.workers, progress=not args.no_progress,
                                      interleave=True).failures
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / "experiment.toml", grid.to_toml())  # the grid the outputs describe
        specs = grid.runs(args.out)
        finished = [(s, r) for s, r in ((s, finished_result(s)) for s in specs) if r is not None]
        records = [r for _, r in finished]
        report = write_outputs(grid, [s for s, _ in finished], records, failures, time.perf_counter() - started,
                               args.workers, args.out)
        print(f"mujoco.py: {len(finished)} of {len(specs)} runs of the grid finished in {args.out}", file=sys.stderr)
        table = summarize(records, grid.algos)
        command = "python benchmarks/mujoco.py " + " ".join(
            f"--{k} {v}" for k, v in (("seeds", len(grid.seeds)), ("steps", args.steps), ("workers", args.workers)))
        section = results_section(table, grid.steps, grid.eval_episodes, command, finished=len(records),
                                  total=len(specs), records=records)
        atomic_write_text(args.out / "results.md", section)
        if args.readme is not None:
            rewrite_readme(args.readme, section)
    except ValueError as exc:
        print(f"mujoco.py: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # as trpo-lab compare: TrainingInterrupted names the signal
        print(f"mujoco.py: interrupted{f': {exc}' if str(exc) else ''}; the same command continues the unfinished "
              "runs from their checkpoints", file=sys.stderr)
        return 128 + getattr(exc, "signum", 2)
    print(report)
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

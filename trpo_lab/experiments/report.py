"""What a compare writes: ``summary.csv``, ``learning_curves.png`` and ``report.md``.

``summary.csv`` has one row per finished run (columns :data:`SUMMARY_COLUMNS`);
``learning_curves.png`` shows, per environment, the training return against environment
steps (top row) and against wall-clock seconds (bottom row), mean over seeds with a shaded
95% interval; ``report.md`` has a table per environment (final return and learning return,
each mean ± 95% CI; IQM, steps/s, wall time) and names the winner of each
(:func:`trpo_lab.experiments.stats.winner`), then the aggregate over environments of both:
the IQM of normalised scores with stratified-bootstrap intervals, the winner by those
intervals and the probability of improvement of every pair
(:func:`trpo_lab.experiments.stats.aggregate`). The learning return of a run
(:func:`trpo_lab.experiments.stats.learning_return`) is computed here from its
``progress.csv``, so older result files get one too.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trpo_lab.experiments.spec import Experiment, RunSpec
from trpo_lab.experiments.stats import (
    METRICS,
    Aggregate,
    AlgoSummary,
    aggregate,
    aggregate_winner,
    ci_half_width,
    learning_return,
    summarize,
    winner,
)
from trpo_lab.logging import atomic_write_bytes, atomic_write_text

__all__ = ["SUMMARY_COLUMNS", "read_curve", "write_summary", "plot_learning_curves", "write_report", "write_outputs"]

SUMMARY_COLUMNS = (
    "algo", "env", "seed", "final_return", "final_return_std", "eval_episodes", "timesteps", "updates",
    "wall_s", "fps", "train_return", "eval_s", "run_dir", "base_algo", "learning_return", "cpu_s",
)
"""``algo`` is the name a run is reported under (an algorithm or a variant), ``base_algo`` its algorithm."""


def read_curve(run_dir: str | Path) -> dict[str, np.ndarray]:
    """``timesteps``, ``wall_s`` and ``return_mean`` columns of a run's ``progress.csv`` (NaN when empty)."""
    columns: dict[str, list[float]] = {"timesteps": [], "wall_s": [], "return_mean": []}
    path = Path(run_dir) / "progress.csv"
    if path.exists():
        with path.open(newline="") as fh:
            for row in csv.DictReader(fh):
                for key, values in columns.items():
                    text = row.get(key) or ""
                    values.append(float(text) if text else math.nan)
    return {key: np.asarray(values, dtype=np.float64) for key, values in columns.items()}


def write_summary(records: Sequence[Mapping[str, Any]], path: Path) -> None:
    """``summary.csv``: one row per run, columns :data:`SUMMARY_COLUMNS`."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for record in records:
        row = dict(record)
        row["run_dir"] = f"runs/{record['env']}-{record['algo']}-seed{record['seed']}"
        writer.writerow(row)
    atomic_write_text(path, out.getvalue())


def _band(x_grid: np.ndarray, curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and 95% half-width over seeds of curves interpolated onto ``x_grid`` (held after their end)."""
    rows = []
    for x, y in curves:
        ok = np.isfinite(x) & np.isfinite(y)
        if ok.sum() == 0:
            continue
        rows.append(np.interp(x_grid, x[ok], y[ok], left=np.nan))
    if not rows:
        nan = np.full_like(x_grid, np.nan)
        return nan, nan
    ys = np.vstack(rows)
    count = np.isfinite(ys).sum(axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        mean = np.nanmean(ys, axis=0)
        std = np.nanstd(ys, axis=0, ddof=1) if ys.shape[0] > 1 else np.full_like(x_grid, np.nan)
    return mean, ci_half_width(std, count)


def plot_learning_curves(
    curves: Mapping[str, Mapping[str, list[dict[str, np.ndarray]]]], algos: Sequence[str], path: Path
) -> None:
    """``learning_curves.png``: row 1 return vs env steps, row 2 vs wall-clock seconds; a column per env.

    Args:
        curves: Env -> algo -> one :func:`read_curve` dict per seed.
        algos: Algorithm order (fixes the colours).
        path: Output PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env_ids = list(curves) or ["no finished runs"]
    fig, axes = plt.subplots(2, len(env_ids), figsize=(5.5 * len(env_ids), 8), squeeze=False)
    colors = {algo: f"C{i}" for i, algo in enumerate(algos)}
    for col, env_id in enumerate(env_ids):
        for row, (x_key, x_label) in enumerate((("timesteps", "environment steps"), ("wall_s", "wall-clock seconds"))):
            ax = axes[row][col]
            for algo, seeds in curves.get(env_id, {}).items():
                pairs = [(c[x_key], c["return_mean"]) for c in seeds]
                x_max = max((float(np.nanmax(x)) for x, _ in pairs if np.isfinite(x).any()), default=0.0)
                if x_max <= 0:
                    continue
                grid = np.linspace(0.0, x_max, 200)
                mean, half = _band(grid, pairs)
                ax.plot(grid, mean, color=colors.get(algo), label=f"{algo} ({len(seeds)} seeds)")
                ax.fill_between(grid, mean - half, mean + half, color=colors.get(algo), alpha=0.2, linewidth=0)
            ax.set_xlabel(x_label)
            ax.set_ylabel("training return (last 100 episodes)")
            ax.set_title(env_id)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="lower right", fontsize="small")
    fig.suptitle("mean over seeds, shaded: 95% confidence interval")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _fmt(value: float, digits: int = 1) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{digits}f}"


def write_report(
    experiment: Experiment,
    table: Mapping[str, Mapping[str, AlgoSummary]],
    failures: Sequence[str],
    elapsed_s: float,
    workers: int,
    path: Path,
    train_s: float = math.nan,
    overall: Sequence[Aggregate] = (),
) -> str:
    """``report.md``: a table per env (final and learning return, mean +- 95% CI; IQM, steps/s, wall
    time), the winner of each, and the aggregates over envs (``overall``: one per metric)."""
    lines = [f"# Compare: {experiment.name}", ""]
    if experiment.description:
        lines += [experiment.description, ""]
    lines += [
        f"Spec: `{experiment.origin}`. Algorithms {', '.join(experiment.algos)}; seeds "
        f"{', '.join(map(str, experiment.seeds))}; {workers} worker process(es), one torch thread each. "
        f"This invocation took {elapsed_s:,.0f} s of wall-clock time; the training time of all runs adds up "
        f"to {_fmt(train_s, 0)} s.",
        "",
        f"*Final return*: mean return of the final agent over {experiment.eval_episodes} deterministic "
        "evaluation episodes, averaged over seeds, ± the 95% Student-t interval over seeds. *IQM*: "
        "interquartile mean of all evaluation episodes of all seeds. *Learning return*: the mean of the "
        "training curve (the return of the last 100 training episodes) over the run's environment steps, "
        "i.e. the area under the learning curve divided by the budget, averaged over seeds ± the 95% "
        "Student-t interval: when every algorithm solves an environment, it says which got there sooner. "
        "*Steps/s* and *wall time*: training only (rollouts and updates), mean over seeds. The winner is the "
        "algorithm whose interval lies above every other's; when intervals overlap the report says there is "
        "no clear winner.",
        "",
    ]
    for env_id, summaries in table.items():
        entry = experiment.envs.get(env_id, {})
        lines += [
            f"## {env_id}",
            "",
            f"Budget {experiment.steps.get(env_id, 0):,} steps per run"
            + (f", normalize_obs={entry['normalize_obs']}" if "normalize_obs" in entry else "")
            + (f", normalize_reward={entry['normalize_reward']}" if "normalize_reward" in entry else "")
            + ".",
            "",
            "| algorithm | final return (mean ± 95% CI) | IQM | learning return (mean ± 95% CI) | seeds "
            "| steps/s | wall time (s) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for s in sorted(summaries.values(), key=lambda s: s.mean, reverse=True):
            lines.append(
                f"| {s.algo} | {_mean_ci(s.mean, s.ci)} | {_fmt(s.iqm)} | {_mean_ci(s.learning, s.learning_ci)} "
                f"| {s.seeds} | {_fmt(s.fps, 0)} | {_fmt(s.wall_s)} |"
            )
        fastest = max(summaries.values(), key=lambda s: s.fps)
        lines += [
            "",
            f"**Winner** (final return): {winner(summaries)}.",
            "",
            f"**Winner** (learning return): {winner(summaries, 'learning_return')}.",
            "",
            f"Most steps per second: {fastest.algo}.",
            "",
        ]
    for result in overall:
        lines += _aggregate_lines(result)
    lines += [
        "## Learning curves",
        "",
        "![learning curves: return against environment steps and against wall-clock seconds](learning_curves.png)",
        "",
    ]
    if failures:
        lines += ["## Failed runs", "", *[f"- {f}" for f in failures], ""]
    text = "\n".join(lines)
    atomic_write_text(path, text)
    return text


def _mean_ci(mean: float, ci: float) -> str:
    return _fmt(mean) + ("" if math.isnan(ci) else f" ± {_fmt(ci)}")


def _interval(value: float, low: float, high: float, digits: int = 2) -> str:
    return f"{_fmt(value, digits)} [{_fmt(low, digits)}, {_fmt(high, digits)}]"


def _aggregate_lines(overall: Aggregate) -> list[str]:
    """The report's "Aggregate over environments" section of one metric."""
    name = METRICS[overall.metric]
    lines = [f"## Aggregate over environments: {name.split(' (')[0]}", ""]
    if not overall.envs or len(overall.iqm) < 1:
        reason = "; ".join(overall.left_out) or "no finished runs"
        return lines + [f"No aggregate: {reason}.", ""]
    refs = ", ".join(f"{env} ({low:g} → {high:g})" for env, (low, high) in overall.references.items())
    lines += [
        f"Each run's {name} is normalised per environment, (return − random) / (solved − random), "
        f"with the reference scores (random → solved) {refs}: 0 is a random policy, 1 solved. *IQM*: the "
        "interquartile mean of the normalised scores of all runs on all these environments; *P(row > column)*: "
        "the probability that a run of the row's algorithm beats one of the column's on an environment drawn "
        "at random (Agarwal et al., 2021). Brackets: 95% stratified-bootstrap intervals (runs resampled "
        "within each environment).",
        "",
    ]
    if overall.left_out:
        lines += [f"Left out: {'; '.join(overall.left_out)}.", ""]
    lines += ["| algorithm | IQM of normalised scores [95% CI] |", "|---|---:|"]
    ranked = sorted(overall.iqm.items(), key=lambda item: item[1].value, reverse=True)
    for algo, interval in ranked:
        lines.append(f"| {algo} | {_interval(interval.value, interval.low, interval.high)} |")
    lines += ["", f"**Winner over all environments**: {aggregate_winner(overall)}.", ""]
    names = [algo for algo, _ in ranked]
    if len(names) > 1:
        lines += ["| P(row > column) | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for x in names:
            cells = [
                "—" if x == y else _interval(overall.improvement[(x, y)].value, overall.improvement[(x, y)].low,
                                              overall.improvement[(x, y)].high)
                for y in names
            ]
            lines.append(f"| {x} | " + " | ".join(cells) + " |")
        sure = [f"{x} over {y}" for (x, y), p in overall.improvement.items() if p.low > 0.5]
        lines += [
            "",
            "Improvements whose interval lies above 0.5: " + (", ".join(sure) if sure else "none") + ".",
            "",
        ]
    return lines


def write_outputs(
    experiment: Experiment,
    finished: Sequence[RunSpec],
    records: Sequence[Mapping[str, Any]],
    failures: Sequence[str],
    elapsed_s: float,
    workers: int,
    out_dir: Path,
) -> str:
    """Write ``summary.csv``, ``learning_curves.png`` and ``report.md`` into ``out_dir``.

    Args:
        experiment: The spec that was run.
        finished: The finished runs, in grid order.
        records: Their result records, in the same order.
        failures: One line per failed run.
        elapsed_s: Wall-clock seconds of this invocation.
        workers: Worker processes used (for the report).
        out_dir: The compare folder.

    Returns:
        The text of ``report.md``.
    """
    by_run = {(s.env_id, s.name, s.seed): read_curve(s.run_dir) for s in finished}
    curves = {
        env_id: {
            algo: [by_run[(s.env_id, s.name, s.seed)] for s in finished if s.env_id == env_id and s.name == algo]
            for algo in experiment.algos
        }
        for env_id in experiment.envs
    }
    curves = {env_id: {a: c for a, c in by_algo.items() if c} for env_id, by_algo in curves.items()}
    records = [
        {**r, "learning_return": learning_return(curve["timesteps"], curve["return_mean"])}
        if (curve := by_run.get((r["env"], r["algo"], r["seed"]))) is not None else dict(r)
        for r in records
    ]
    write_summary(records, out_dir / "summary.csv")
    plot_learning_curves(curves, experiment.algos, out_dir / "learning_curves.png")
    table = summarize(records, experiment.algos)
    train_s = float(sum(r["wall_s"] for r in records))
    overall = [aggregate(records, experiment.algos, metric=metric) for metric in METRICS]
    return write_report(experiment, table, failures, elapsed_s, workers, out_dir / "report.md", train_s, overall)

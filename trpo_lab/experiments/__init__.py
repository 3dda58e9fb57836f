"""The compare runner: a grid of algorithms x environments x seeds, and what it shows.

``trpo-lab compare [EXPERIMENT]`` reads an experiment spec (``experiments/<name>.toml``, a
TOML file, or the built-in ``default``), trains every run in worker processes (one torch
thread each), evaluates each final agent deterministically and writes into the output
folder::

    runs/<ENV>-<algo>-seed<S>/   the normal run directory (config.toml, progress.csv,
                                 TensorBoard events, checkpoint.pt, final.pt) plus
                                 spec.json (what the run was asked to do) and
                                 result.json (its evaluation, written last, atomically)
    summary.csv                  one row per run
    learning_curves.png          return vs env steps and vs wall-clock seconds, per env
    report.md                    per-env tables (mean +- 95% CI, IQM, steps/s, wall time), winner
    experiment.toml              the resolved spec

The pieces:

- :mod:`~trpo_lab.experiments.spec`: the TOML spec, validated, and its grid of runs;
- :mod:`~trpo_lab.experiments.runner`: one run in a worker, the workers' lifecycle and
  interrupt handling, the local process pool, and :func:`run_experiment`;
- :mod:`~trpo_lab.experiments.ray_executor`: the same runs as Ray tasks;
- :mod:`~trpo_lab.experiments.stats`: mean and 95% Student-t interval, IQM, the winner;
- :mod:`~trpo_lab.experiments.report`: ``summary.csv``, ``learning_curves.png``, ``report.md``;
- :mod:`~trpo_lab.experiments.tune`: ``trpo-lab tune``, hyperparameter search with Optuna.
"""

from __future__ import annotations

from trpo_lab.experiments.report import (
    SUMMARY_COLUMNS,
    plot_learning_curves,
    read_curve,
    write_outputs,
    write_report,
    write_summary,
)
from trpo_lab.experiments.runner import (
    RESULT_FILE,
    SPEC_FILE,
    CompareResult,
    execute_run,
    finished_result,
    resume_run,
    run_experiment,
)
from trpo_lab.experiments.spec import DEFAULT_TIMESTEPS, Experiment, RunSpec, experiment_from_dict, load_experiment
from trpo_lab.experiments.stats import AlgoSummary, ci_half_width, iqm, mean_ci, summarize, t_critical, winner

__all__ = [
    "DEFAULT_TIMESTEPS",
    "SPEC_FILE",
    "RESULT_FILE",
    "SUMMARY_COLUMNS",
    "Experiment",
    "RunSpec",
    "CompareResult",
    "AlgoSummary",
    "load_experiment",
    "experiment_from_dict",
    "run_experiment",
    "execute_run",
    "finished_result",
    "resume_run",
    "read_curve",
    "mean_ci",
    "ci_half_width",
    "t_critical",
    "iqm",
    "summarize",
    "winner",
    "write_summary",
    "plot_learning_curves",
    "write_report",
    "write_outputs",
]

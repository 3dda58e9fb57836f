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

A run is finished when its ``final.pt`` and ``result.json`` exist; rerunning a compare
skips finished runs and continues unfinished ones from their ``checkpoint.pt``. Ctrl-C or
SIGTERM stops every running run at a fresh checkpoint (exit status 130 / 143); a rerun with
other settings into the same folder is refused rather than mixing results.

An experiment spec has the keys::

    description = "..."                  # optional, shown in the report
    algos = ["trpo", "acktr", "ppo"]
    suite = "classic"                    # envs/classic.toml: per-env budget, n_envs, normalization
    envs = ["CartPole-v1"]               # optional subset of the suite (default: all of it)
    seeds = 3                            # or a list of seeds, e.g. [0, 1, 2]
    steps = 50000                        # optional budget for every env, or a table per env id
    eval_episodes = 10                   # deterministic evaluation episodes per final agent
    workers = 2                          # optional default for --workers
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trpo_lab.logging import atomic_write_text
from trpo_lab.presets import (
    BUILTIN_EXPERIMENTS,
    experiment_names,
    load_preset,
    load_suite,
    preset_file,
    suite_entry,
)

if TYPE_CHECKING:
    from trpo_lab.agents.base import OnPolicyAgent
    from trpo_lab.distributed import DistributedContext

__all__ = [
    "DEFAULT_TIMESTEPS",
    "Experiment",
    "RunSpec",
    "CompareResult",
    "load_experiment",
    "run_experiment",
    "execute_run",
    "resume_run",
    "read_curve",
    "mean_ci",
    "t_critical",
    "iqm",
    "winner",
    "write_summary",
    "plot_learning_curves",
    "write_report",
]

DEFAULT_TIMESTEPS = 100_000
SPEC_FILE = "spec.json"
RESULT_FILE = "result.json"
SUMMARY_COLUMNS = (
    "algo", "env", "seed", "final_return", "final_return_std", "eval_episodes", "timesteps", "updates",
    "wall_s", "fps", "train_return", "eval_s", "run_dir",
)
_EXPERIMENT_KEYS = ("description", "algos", "suite", "envs", "seeds", "steps", "eval_episodes", "workers")


# ---------------------------------------------------------------------------- specs
@dataclass(kw_only=True)
class RunSpec:
    """One cell of the grid: everything a worker needs to train and evaluate one agent."""

    algo: str
    env_id: str
    seed: int
    total_timesteps: int
    n_envs: int
    vectorization: str
    hyperparameters: dict[str, Any]
    eval_episodes: int
    run_dir: Path

    @property
    def key(self) -> str:
        return f"{self.env_id}-{self.algo}-seed{self.seed}"

    def settings(self) -> dict[str, Any]:
        """What the run was asked to do, as JSON data (stored in ``spec.json``, compared on rerun)."""
        data = asdict(self)
        del data["run_dir"]
        result: dict[str, Any] = json.loads(json.dumps(data))
        return result


@dataclass(kw_only=True)
class Experiment:
    """A validated experiment spec (see the module docstring for the TOML keys).

    Attributes:
        envs: Env id -> its suite entry (budget, ``n_envs``, normalization), in run order.
        steps: Env id -> the budget every algorithm gets on it.
    """

    name: str
    origin: str
    description: str = ""
    suite: str | None = None
    algos: list[str]
    envs: dict[str, dict[str, Any]]
    seeds: list[int]
    steps: dict[str, int]
    eval_episodes: int = 10
    workers: int | None = None

    def __post_init__(self) -> None:
        from trpo_lab.config import config_class
        from trpo_lab.envs import check_env_id

        where = f"experiment {self.origin}"
        if not self.algos:
            raise ValueError(f"Invalid {where}: algos is empty; expected at least one of trpo, npg, acktr, ppo")
        for algo in self.algos:
            config_class(algo)
        if len(set(self.algos)) != len(self.algos):
            raise ValueError(f"Invalid {where}: algos {self.algos} has duplicates")
        if not self.envs:
            raise ValueError(f"Invalid {where}: no environments")
        for env_id in self.envs:
            check_env_id(env_id)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"Invalid {where}: seeds {self.seeds}; expected distinct integers")
        for env_id, budget in self.steps.items():
            if not _is_int(budget) or budget < 1:
                raise ValueError(f"Invalid {where}: steps for {env_id} is {budget!r}; expected an integer >= 1")
        if not _is_int(self.eval_episodes) or self.eval_episodes < 1:
            raise ValueError(f"Invalid {where}: eval_episodes {self.eval_episodes!r}; expected an integer >= 1")
        if self.workers is not None and (not _is_int(self.workers) or self.workers < 1):
            raise ValueError(f"Invalid {where}: workers {self.workers!r}; expected an integer >= 1")

    def with_overrides(
        self,
        algos: Sequence[str] | None = None,
        envs: Sequence[str] | None = None,
        seeds: int | None = None,
        steps: int | None = None,
        eval_episodes: int | None = None,
    ) -> Experiment:
        """The same experiment with command-line overrides applied (``seeds=N`` means 0..N-1)."""
        changes: dict[str, Any] = {}
        if algos is not None:
            changes["algos"] = [a.lower() for a in algos]
        if envs is not None:
            changes["envs"] = {
                env_id: self.envs[env_id] if env_id in self.envs else _any_suite_entry(env_id) for env_id in envs
            }
            changes["steps"] = {env_id: _budget(env_id, changes["envs"][env_id], self.steps) for env_id in envs}
            if not set(envs) <= set(self.envs):
                changes["suite"] = None  # the envs now come from whichever suite lists them
        if seeds is not None:
            if seeds < 1:
                raise ValueError(f"Invalid --seeds: {seeds}; expected >= 1")
            changes["seeds"] = list(range(seeds))
        if steps is not None:
            changes["steps"] = {env_id: steps for env_id in changes.get("envs", self.envs)}
        if eval_episodes is not None:
            changes["eval_episodes"] = eval_episodes
        return replace(self, **changes)

    def runs(self, out_dir: str | Path) -> list[RunSpec]:
        """The grid, env-major, resolved against the agent presets."""
        out = Path(out_dir)
        specs = []
        for env_id, entry in self.envs.items():
            for algo in self.algos:
                hyperparameters, run = load_preset(algo, env_id, suite=entry)
                for seed in self.seeds:
                    spec = RunSpec(
                        algo=algo,
                        env_id=env_id,
                        seed=seed,
                        total_timesteps=self.steps[env_id],
                        n_envs=int(run.get("n_envs", 8)),
                        vectorization=str(run.get("vectorization", "sync")),
                        hyperparameters=hyperparameters,
                        eval_episodes=self.eval_episodes,
                        run_dir=out / "runs" / f"{env_id}-{algo}-seed{seed}",
                    )
                    specs.append(spec)
        return specs

    def to_toml(self) -> str:
        import tomli_w

        data: dict[str, Any] = {"description": self.description, "algos": self.algos}
        if self.suite is not None:
            data["suite"] = self.suite
        data.update(envs=list(self.envs), seeds=self.seeds, eval_episodes=self.eval_episodes, steps=self.steps)
        return f"# {self.name}, resolved from {self.origin} and the command line\n" + tomli_w.dumps(data)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _any_suite_entry(env_id: str) -> dict[str, Any]:
    from trpo_lab.envs import check_env_id

    check_env_id(env_id)
    return suite_entry(env_id)


def _budget(env_id: str, entry: Mapping[str, Any], steps: Mapping[str, int]) -> int:
    if env_id in steps:
        return steps[env_id]
    return int(entry.get("total_timesteps", DEFAULT_TIMESTEPS))


def load_experiment(source: str | Path | None = None) -> Experiment:
    """Read an experiment: a TOML file path, a name in ``experiments/``, or ``None`` for ``default``.

    Raises:
        ValueError: missing or unreadable file, unknown name, key, algorithm, suite or env.
    """
    from trpo_lab.config import load_toml

    name = "default" if source is None else str(source)
    path = Path(name)
    if source is not None and (path.suffix == ".toml" or path.exists() or os.sep in name):
        data, origin, name = load_toml(path), str(path), path.stem
    else:
        found = preset_file("experiments", name)
        if found is not None:
            data, origin = load_toml(found), str(found)
        elif name in BUILTIN_EXPERIMENTS:
            data, origin = BUILTIN_EXPERIMENTS[name], f"built-in experiment {name!r}"
        else:
            raise ValueError(
                f"Unknown experiment {name!r}; expected a TOML file or one of {', '.join(experiment_names())}"
            )
    return experiment_from_dict(data, name=name, origin=origin)


def experiment_from_dict(data: Mapping[str, Any], name: str, origin: str) -> Experiment:
    """Validate the TOML data of an experiment spec."""
    unknown = sorted(set(data) - set(_EXPERIMENT_KEYS))
    if unknown:
        raise ValueError(f"Invalid experiment {origin}: unknown key(s) {unknown}; expected some of {list(_EXPERIMENT_KEYS)}")
    algos = data.get("algos")
    if not isinstance(algos, list) or not all(isinstance(a, str) for a in algos):
        raise ValueError(f"Invalid experiment {origin}: algos must be a list of names, got {algos!r}")
    suite: dict[str, dict[str, Any]] = {}
    if "suite" in data:
        if not isinstance(data["suite"], str):
            raise ValueError(f"Invalid experiment {origin}: suite must be the name of a file in envs/, got {data['suite']!r}")
        suite, _ = load_suite(data["suite"])
    env_ids = data.get("envs", list(suite))
    if not isinstance(env_ids, list) or not all(isinstance(e, str) for e in env_ids):
        raise ValueError(f"Invalid experiment {origin}: envs must be a list of environment ids, got {env_ids!r}")
    envs: dict[str, dict[str, Any]] = {}
    for env_id in env_ids:
        if suite and env_id not in suite:
            raise ValueError(
                f"Invalid experiment {origin}: env {env_id!r} is not in suite {data['suite']!r} "
                f"({', '.join(suite)})"
            )
        envs[env_id] = dict(suite[env_id]) if suite else _any_suite_entry(env_id)
    seeds_value = data.get("seeds", 3)
    if _is_int(seeds_value):
        if seeds_value < 1:
            raise ValueError(f"Invalid experiment {origin}: seeds {seeds_value}; expected >= 1 or a list")
        seeds = list(range(seeds_value))
    elif isinstance(seeds_value, list) and all(_is_int(s) for s in seeds_value):
        seeds = list(seeds_value)
    else:
        raise ValueError(f"Invalid experiment {origin}: seeds {seeds_value!r}; expected a count or a list of integers")
    steps_value = data.get("steps", {})
    if _is_int(steps_value):
        explicit = {env_id: steps_value for env_id in envs}
    elif isinstance(steps_value, Mapping):
        explicit = dict(steps_value)
        stray = sorted(set(explicit) - set(envs))
        if stray:
            raise ValueError(f"Invalid experiment {origin}: steps given for {stray}, which it does not run")
    else:
        raise ValueError(f"Invalid experiment {origin}: steps {steps_value!r}; expected an integer or a table per env")
    steps = {env_id: _budget(env_id, entry, explicit) for env_id, entry in envs.items()}
    return Experiment(
        name=name,
        origin=origin,
        description=str(data.get("description", "")),
        suite=data.get("suite"),
        algos=[a.lower() for a in algos],
        envs=envs,
        seeds=seeds,
        steps=steps,
        eval_episodes=data.get("eval_episodes", 10),
        workers=data.get("workers"),
    )


# ---------------------------------------------------------------------------- one run
def resume_run(
    run_dir: str | Path, device: str = "cpu", dist: DistributedContext | None = None
) -> tuple[OnPolicyAgent, int]:
    """Load a run's ``checkpoint.pt`` to continue it with ``agent.learn(total, run_dir=run_dir)``.

    ``learn`` trims ``progress.csv`` to the checkpoint (rows a killed run logged after it, and
    a row cut short, go), so the continued file has no gap or duplicate. With ``dist`` (every
    rank calls this), rank 0 reads the run directory and every rank continues from it.

    Returns:
        ``(agent, total_timesteps)``, the budget recorded in the run's ``config.toml``.
    """
    from trpo_lab.agents.base import OnPolicyAgent
    from trpo_lab.config import load_toml

    run_dir = Path(run_dir)

    def recorded_budget() -> int:
        if not run_dir.is_dir():
            raise ValueError(f"Run directory not found: {run_dir}")
        return int(load_toml(run_dir / "config.toml").get("total_timesteps", DEFAULT_TIMESTEPS))

    budget = recorded_budget() if dist is None else dist.run_on_main(recorded_budget)
    agent = OnPolicyAgent.load(run_dir / "checkpoint.pt", device=device, dist=dist)
    return agent, budget


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def finished_result(spec: RunSpec) -> dict[str, Any] | None:
    """The result record of a finished run with these settings, else ``None``."""
    if not (spec.run_dir / "final.pt").is_file():
        return None
    record = _read_json(spec.run_dir / RESULT_FILE)
    if record is None or record.get("settings") != spec.settings():
        return None
    return record


_progress_queue: Any = None
_busy = threading.Event()  # set while this worker runs a task


def _init_worker(queue: Any) -> None:
    """Worker set-up: one torch thread, progress queue, signals (see :func:`run_experiment`).

    SIGINT is ignored: Ctrl-C reaches the whole process group, and the main process answers
    it by sending each worker one SIGTERM, on which ``learn`` finishes its update, writes
    ``checkpoint.pt`` and stops. Outside ``learn`` SIGTERM does nothing: killing an idle
    worker could leave the executor's shared call-queue lock held and deadlock the others,
    which then exit normally on the executor's shutdown. A watchdog stops the run the same
    way if the main process dies, then exits instead of waiting forever for tasks.
    """
    import torch

    global _progress_queue
    _progress_queue = queue
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _ignore_signal)  # a handler, not SIG_IGN: learn() replaces it while training
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _ignore_signal(signum: int, frame: Any) -> None:
    pass


def _exit_with_parent(parent_pid: int, grace_s: float = 300.0) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    if _busy.is_set():
        os.kill(os.getpid(), signal.SIGTERM)  # learn() checkpoints and stops
        deadline = time.monotonic() + grace_s
        while _busy.is_set() and time.monotonic() < deadline:
            time.sleep(0.1)
    os._exit(1)


def _report(message: tuple[Any, ...]) -> None:
    if _progress_queue is not None:
        _progress_queue.put(message)


def _start_or_resume(spec: RunSpec) -> OnPolicyAgent:
    from trpo_lab.agents import agent_class
    from trpo_lab.agents.base import OnPolicyAgent

    run_dir = spec.run_dir
    stored = _read_json(run_dir / SPEC_FILE)
    if stored == spec.settings() and (run_dir / "checkpoint.pt").is_file():
        return OnPolicyAgent.load(run_dir / "checkpoint.pt")
    if run_dir.exists():  # started but never checkpointed: start over
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    atomic_write_text(run_dir / SPEC_FILE, json.dumps(spec.settings(), indent=2))
    return agent_class(spec.algo)(
        spec.env_id,
        n_envs=spec.n_envs,
        seed=spec.seed,
        vectorization=spec.vectorization,
        **spec.hyperparameters,
    )


def execute_run(spec: RunSpec) -> dict[str, Any]:
    """Train, evaluate and record one run (in a worker process); returns its result record."""
    import torch

    torch.set_num_threads(1)
    _busy.set()
    try:
        return _train_and_evaluate(spec)
    finally:
        _busy.clear()


def _train_and_evaluate(spec: RunSpec) -> dict[str, Any]:
    agent = _start_or_resume(spec)
    _report(("start", spec.key, agent.num_timesteps))

    def on_update(trained: OnPolicyAgent, metrics: dict[str, float]) -> None:
        _report(("progress", spec.key, trained.num_timesteps))

    try:
        agent.learn(spec.total_timesteps, run_dir=spec.run_dir, callback=on_update)
        eval_start = time.perf_counter()
        returns = agent.evaluate(spec.eval_episodes)
        eval_s = time.perf_counter() - eval_start
    finally:
        agent.close()
    train_returns = list(agent.episode_returns)
    record = {
        "algo": spec.algo,
        "env": spec.env_id,
        "seed": spec.seed,
        "final_return": float(np.mean(returns)),
        "final_return_std": float(np.std(returns)),
        "eval_returns": [float(r) for r in returns],
        "eval_episodes": spec.eval_episodes,
        "timesteps": agent.num_timesteps,
        "updates": agent.num_updates,
        "wall_s": agent.wall_time,
        "fps": agent.num_timesteps / max(agent.wall_time, 1e-9),
        "train_return": float(np.mean(train_returns)) if train_returns else math.nan,
        "eval_s": eval_s,
        "settings": spec.settings(),
    }
    atomic_write_text(spec.run_dir / RESULT_FILE, json.dumps(record, indent=2))
    return record


# ---------------------------------------------------------------------------- statistics
# Two-sided 95% quantiles of Student's t, t_{0.975, df} for df = 1..30.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)


def t_critical(df: int) -> float:
    """``t_{0.975, df}``: a table up to 30 degrees of freedom, then the Cornish-Fisher expansion

        t ≈ z + (z³ + z) / (4 df) + (5z⁵ + 16z³ + 3z) / (96 df²),   z = 1.959964

    (within 1e-4 beyond 30), so scipy is not needed.
    """
    if df < 1:
        raise ValueError(f"Invalid degrees of freedom: {df}; expected >= 1")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """``(mean, half width of the 95% t-interval)``; the half width is NaN for fewer than 2 values."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan
    if x.size < 2:
        return float(x.mean()), math.nan
    return float(x.mean()), t_critical(x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)


def iqm(values: Sequence[float]) -> float:
    """Interquartile mean: the mean of the middle 50% (``scipy.stats.trim_mean(x, 0.25)``)."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    if x.size == 0:
        return math.nan
    cut = int(0.25 * x.size)
    return float(x[cut : x.size - cut].mean())


@dataclass
class AlgoSummary:
    """The aggregate of one algorithm's seeds on one environment."""

    algo: str
    seeds: int
    mean: float
    ci: float
    iqm: float
    fps: float
    wall_s: float
    timesteps: float

    @property
    def low(self) -> float:
        return self.mean - self.ci

    @property
    def high(self) -> float:
        return self.mean + self.ci


def summarize(records: Sequence[Mapping[str, Any]], algos: Sequence[str]) -> dict[str, dict[str, AlgoSummary]]:
    """Env -> algo -> :class:`AlgoSummary`, over the seeds present in ``records``."""
    grouped: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
    for record in records:
        grouped.setdefault(record["env"], {}).setdefault(record["algo"], []).append(record)
    table: dict[str, dict[str, AlgoSummary]] = {}
    for env_id, by_algo in grouped.items():
        table[env_id] = {}
        for algo in [a for a in algos if a in by_algo]:
            runs = by_algo[algo]
            mean, ci = mean_ci([r["final_return"] for r in runs])
            episodes = [x for r in runs for x in r["eval_returns"]]
            table[env_id][algo] = AlgoSummary(
                algo=algo,
                seeds=len(runs),
                mean=mean,
                ci=ci,
                iqm=iqm(episodes),
                fps=float(np.mean([r["fps"] for r in runs])),
                wall_s=float(np.mean([r["wall_s"] for r in runs])),
                timesteps=float(np.mean([r["timesteps"] for r in runs])),
            )
    return table


def winner(summaries: Mapping[str, AlgoSummary]) -> str:
    """One sentence: the algorithm whose 95% CI lies above every other's, or "no clear winner"."""
    ranked = sorted(summaries.values(), key=lambda s: s.mean, reverse=True)
    if len(ranked) < 2:
        return "only one algorithm: no comparison"
    best = ranked[0]
    if any(math.isnan(s.ci) for s in ranked):
        return f"no clear winner (fewer than 2 seeds for a confidence interval; highest mean: {best.algo})"
    overlapping = [s.algo for s in ranked[1:] if s.high >= best.low]
    if overlapping:
        return (
            f"no clear winner: the 95% CI of {best.algo} (highest mean) overlaps "
            f"that of {', '.join(overlapping)}"
        )
    return f"{best.algo} (its 95% CI lies above every other algorithm's)"


# ---------------------------------------------------------------------------- outputs
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
    t = np.array([t_critical(int(n) - 1) if n >= 2 else np.nan for n in count])
    return mean, t * std / np.sqrt(np.maximum(count, 1))


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
    from trpo_lab.logging import atomic_write_bytes

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
) -> str:
    """``report.md``: a table per env (final return mean +- 95% CI, IQM, steps/s, wall time), the winner."""
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
        "interquartile mean of all evaluation episodes of all seeds. *Steps/s* and *wall time*: training "
        "only (rollouts and updates), mean over seeds. The winner is the algorithm whose interval lies above "
        "every other's; when intervals overlap the report says there is no clear winner.",
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
            "| algorithm | final return (mean ± 95% CI) | IQM | seeds | steps/s | wall time (s) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for s in sorted(summaries.values(), key=lambda s: s.mean, reverse=True):
            ci = "" if math.isnan(s.ci) else f" ± {_fmt(s.ci)}"
            lines.append(
                f"| {s.algo} | {_fmt(s.mean)}{ci} | {_fmt(s.iqm)} | {s.seeds} | {_fmt(s.fps, 0)} | {_fmt(s.wall_s)} |"
            )
        fastest = max(summaries.values(), key=lambda s: s.fps)
        lines += ["", f"**Winner**: {winner(summaries)}. Most steps per second: {fastest.algo}.", ""]
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


# ---------------------------------------------------------------------------- the runner
@dataclass
class CompareResult:
    """What :func:`run_experiment` did."""

    out_dir: Path
    records: list[dict[str, Any]]
    skipped: list[str]
    failures: list[str] = field(default_factory=list)
    report: str = ""
    elapsed_s: float = 0.0


class _Display:
    """Overall progress (rich) plus one printed line per finished or skipped run."""

    def __init__(self, total_steps: int, done_steps: int, n_runs: int, enabled: bool) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not enabled,
        )
        self.n_runs = n_runs
        self.finished = 0
        self.overall = self.progress.add_task("compare", total=max(total_steps, 1), completed=done_steps, info="")
        self.tasks: dict[str, Any] = {}
        self.steps: dict[str, int] = {}
        self.base = done_steps

    def __enter__(self) -> _Display:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def line(self, text: str) -> None:
        self.progress.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def count(self) -> None:
        self.finished += 1
        self.progress.update(self.overall, info=f"{self.finished}/{self.n_runs} runs")

    def message(self, message: tuple[Any, ...], budgets: Mapping[str, int]) -> None:
        kind, key, steps = message
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(f"  {key}", total=budgets[key], completed=steps, info="")
        self.steps[key] = max(self.steps.get(key, 0), min(int(steps), budgets[key]))
        self.progress.update(self.tasks[key], completed=self.steps[key])
        self.progress.update(self.overall, completed=self.base + sum(self.steps.values()))

    def done(self, key: str, budget: int) -> None:
        if key in self.tasks:
            self.progress.remove_task(self.tasks.pop(key))
        self.steps[key] = budget
        self.progress.update(self.overall, completed=self.base + sum(self.steps.values()))
        self.count()


def _drain(queue: Any, display: _Display, budgets: Mapping[str, int]) -> None:
    import queue as queue_module

    while True:
        try:
            message = queue.get_nowait()
        except (queue_module.Empty, OSError, EOFError):
            return
        display.message(message, budgets)


def _stop_workers(pool: ProcessPoolExecutor, timeout_s: float = 300.0) -> None:
    """Cancel queued runs and SIGTERM the workers: a training one checkpoints and stops, an idle
    one ignores it (see :func:`_init_worker`); all then leave on the executor's shutdown."""
    # ProcessPoolExecutor has no public handle on its processes.
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + timeout_s
    for process in processes:
        process.join(timeout=max(deadline - time.monotonic(), 0.0))
        if process.is_alive():
            process.kill()


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """In the main thread, turn SIGTERM into KeyboardInterrupt so it stops the workers cleanly."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    from trpo_lab.agents.base import TrainingInterrupted

    def handler(signum: int, frame: Any) -> None:
        raise TrainingInterrupted(f"{signal.Signals(signum).name} received", signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ValueError("Invalid executor 'ray': Ray is not installed; pip install 'trpo-lab[ray]'") from None
    return ray


def _run_on_ray(
    pending: Sequence[RunSpec],
    max_in_flight: int | None,
    address: str | None,
    finish: Callable[[RunSpec, Callable[[], dict[str, Any]]], None],
    say: Callable[[str], None],
) -> None:
    """Run ``pending`` as Ray tasks (one CPU each, no retries) and ``finish`` each as it ends.

    Uses the Ray instance this process has already initialised, else ``ray.init(address)``
    (``num_cpus = max_in_flight`` for a new local instance), shut down again at the end. The
    runs write into their ``run_dir`` (made absolute) exactly as local workers do, so a rerun
    skips finished runs and continues unfinished ones from their checkpoints. On Ctrl-C the
    running tasks are cancelled; they continue from their last periodic checkpoint on a rerun.
    """
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        local_cpus = max_in_flight if address is None and "RAY_ADDRESS" not in os.environ else None
        ray.init(address=address, num_cpus=local_cpus, include_dashboard=False, logging_level="ERROR")
    try:
        limit = max_in_flight or max(1, int(ray.cluster_resources().get("CPU", 1)))
        say(f"ray: {len(pending)} run(s) as tasks, at most {limit} at once, on {ray.cluster_resources().get('CPU', 0):g} CPUs")
        task = ray.remote(num_cpus=1, max_retries=0)(execute_run)
        waiting = [replace(spec, run_dir=spec.run_dir.resolve()) for spec in pending]
        running: dict[Any, RunSpec] = {}

        def result_of(ref: Any) -> Callable[[], dict[str, Any]]:
            def result() -> dict[str, Any]:
                try:
                    record: dict[str, Any] = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:  # re-raise the run's own error
                    cause = getattr(exc, "cause", None)
                    raise (cause if isinstance(cause, Exception) else exc) from None
                return record
            return result

        try:
            while waiting or running:
                while waiting and len(running) < limit:
                    spec = waiting.pop(0)
                    running[task.remote(spec)] = spec
                done, _ = ray.wait(list(running), num_returns=1, timeout=0.25)
                for ref in done:
                    finish(running.pop(ref), result_of(ref))
        except BaseException:
            say(f"stopping: cancelling {len(running)} Ray task(s); run the same command again to continue them")
            for ref in running:
                ray.cancel(ref)
            raise
    finally:
        if started:
            ray.shutdown()


def _check_existing(specs: Sequence[RunSpec]) -> None:
    for spec in specs:
        stored = _read_json(spec.run_dir / SPEC_FILE)
        if stored is not None and stored != spec.settings():
            changed = sorted(k for k in set(stored) | set(spec.settings()) if stored.get(k) != spec.settings().get(k))
            raise ValueError(
                f"{spec.run_dir} holds a run with other settings ({', '.join(changed)} differ); "
                "use another --out or delete it"
            )


def run_experiment(
    experiment: Experiment,
    out_dir: str | Path,
    workers: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    executor: str = "local",
    ray_address: str | None = None,
) -> CompareResult:
    """Run every unfinished cell of the grid in ``workers`` processes, then write the outputs.

    Args:
        experiment: The validated spec (:func:`load_experiment`).
        out_dir: The compare folder (created); finished runs already in it are skipped.
        workers: Worker processes (default: the spec's ``workers``, else the CPU count); with
            Ray, the most runs in flight at once (default: all, as the cluster's CPUs allow).
        progress: Show the rich progress display (on stderr).
        log: Where the per-run lines go (default: the display's console).
        executor: ``"local"`` (a process pool on this machine) or ``"ray"``: each run is a Ray
            task of one CPU (:func:`_run_on_ray`), on the Ray instance already initialised in
            this process, the cluster at ``ray_address``, or a local one started here. Every
            Ray node must have trpo_lab installed and see ``out_dir`` at the same path (a
            shared filesystem), where the runs write as they would locally.
        ray_address: ``ray.init`` address (``"auto"``, ``"ray://head:10001"``...); ``None``
            starts a local instance (or joins ``RAY_ADDRESS``).

    Raises:
        ValueError: bad spec, an algorithm this install cannot run, ``workers < 1``, an
            unknown executor or Ray not installed, or an output folder holding runs with
            other settings.
    """
    import multiprocessing

    from trpo_lab.agents import agent_class

    if executor not in ("local", "ray"):
        raise ValueError(f"Invalid executor: {executor!r}; expected 'local' or 'ray'")
    if ray_address is not None and executor != "ray":
        raise ValueError(f"Invalid ray_address: {ray_address!r}; it needs executor 'ray'")
    workers_given = workers if workers is not None else experiment.workers
    workers = workers if workers is not None else (experiment.workers or os.cpu_count() or 1)
    if not _is_int(workers) or workers < 1:
        raise ValueError(f"Invalid workers: {workers!r}; expected an integer >= 1")
    if executor == "ray":
        _import_ray()  # fail before starting anything if Ray is missing
    for algo in experiment.algos:
        agent_class(algo)  # fail before starting anything if an algorithm is unavailable
    out = Path(out_dir)
    specs = experiment.runs(out)
    _check_existing(specs)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "experiment.toml", experiment.to_toml())
    start = time.perf_counter()
    records: dict[str, dict[str, Any]] = {}
    skipped: list[str] = []
    failures: list[str] = []
    pending: list[RunSpec] = []
    for spec in specs:
        record = finished_result(spec)
        if record is not None:
            records[spec.key] = record
            skipped.append(spec.key)
        else:
            pending.append(spec)
    budgets = {spec.key: spec.total_timesteps for spec in specs}
    done_steps = sum(budgets[key] for key in skipped)
    display = _Display(sum(budgets.values()), done_steps, len(specs), enabled=progress)
    say = log or display.line
    say(
        f"compare {experiment.name}: {len(specs)} runs ({len(experiment.algos)} algos x {len(experiment.envs)} envs "
        f"x {len(experiment.seeds)} seeds), {len(skipped)} already finished, {len(pending)} to run "
        f"on {min(workers, max(len(pending), 1))} worker(s); output {out}"
    )
    for key in skipped:
        say(f"skipped {key}: finished earlier (final return {records[key]['final_return']:.1f})")

    def finish(spec: RunSpec, result: Callable[[], dict[str, Any]]) -> None:
        display.done(spec.key, spec.total_timesteps)
        try:
            record = result()
        except Exception as exc:  # a failed run must not lose the others
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            failures.append(f"{spec.key}: {type(exc).__name__}: {message}")
            say(f"FAILED  {failures[-1]}")
            return
        records[spec.key] = record
        say(
            f"done    {spec.key}: final return {record['final_return']:.1f} "
            f"({record['wall_s']:.0f} s, {record['fps']:,.0f} steps/s)"
        )

    with display, _sigterm_as_interrupt():
        for _ in skipped:
            display.count()
        if pending and executor == "ray":
            _run_on_ray(pending, workers_given, ray_address, finish, say)
        elif pending:
            context = multiprocessing.get_context("spawn")
            queue = context.Queue()
            pool = ProcessPoolExecutor(
                max_workers=min(workers, len(pending)), mp_context=context,
                initializer=_init_worker, initargs=(queue,),
            )
            futures: dict[Future[dict[str, Any]], RunSpec] = {}
            try:
                futures.update({pool.submit(execute_run, s): s for s in pending})
                while futures:
                    done, _ = wait(futures, timeout=0.25, return_when=FIRST_COMPLETED)
                    _drain(queue, display, budgets)
                    for future in done:
                        finish(futures.pop(future), future.result)
            except BaseException:
                say(
                    f"stopping: {len(futures)} unfinished run(s) stop at a checkpoint; "
                    "run the same command again to continue them"
                )
                _stop_workers(pool)
                raise
            pool.shutdown(wait=True)
            queue.close()
    ordered = [records[s.key] for s in specs if s.key in records]
    elapsed = time.perf_counter() - start
    write_summary(ordered, out / "summary.csv")
    curves = {
        env_id: {
            algo: [read_curve(s.run_dir) for s in specs if s.env_id == env_id and s.algo == algo and s.key in records]
            for algo in experiment.algos
        }
        for env_id in experiment.envs
    }
    curves = {env_id: {a: c for a, c in by_algo.items() if c} for env_id, by_algo in curves.items()}
    plot_learning_curves(curves, experiment.algos, out / "learning_curves.png")
    table = summarize(ordered, experiment.algos)
    train_s = float(sum(r["wall_s"] for r in ordered))
    report = write_report(experiment, table, failures, elapsed, workers, out / "report.md", train_s)
    return CompareResult(out, ordered, skipped, failures, report, elapsed)

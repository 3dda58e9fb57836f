"""Statistics over seeds: mean with a 95% Student-t interval, interquartile mean, the winner.

With ``n`` seeds of sample mean ``x̄`` and sample standard deviation ``s`` (``ddof=1``), the
two-sided 95% confidence interval of the mean is

    x̄ ± t_{0.975, n-1} · s / √n,

with ``t_{0.975, n-1}`` the 0.975 quantile of Student's t with ``n - 1`` degrees of freedom
(``scipy.stats.t.ppf``). The interquartile mean (IQM) is the mean of the middle 50% of the
values, the aggregate Agarwal et al. (2021, "Deep Reinforcement Learning at the Edge of the
Statistical Precipice") recommend over the mean or median for few runs. An algorithm wins on
an environment only when its interval lies entirely above every other algorithm's.

Two scores are compared per run: the *final return* (the final agent's deterministic
evaluation) and the *learning return* (:func:`learning_return`), the mean of the training
curve over the run's environment steps, i.e. the area under the learning curve divided by the
steps it spans. When every algorithm solves an environment by the end of its budget, the final
returns tie and only the learning return tells which got there sooner.

Across environments (:func:`aggregate`, after Agarwal et al., 2021), each run's final return
``x`` on env ``m`` is normalised by the env's reference scores (:data:`REFERENCE_SCORES`:
a uniformly random policy's mean return and the "solved" score),

    x̃ = (x − random_m) / (solved_m − random_m),

so 0 is random and 1 solved. The aggregate of an algorithm is the IQM of its normalised
scores over all runs on all envs, and the probability of improvement of X over Y is

    P(X > Y) = 1/M Σ_m 1/(N_m K_m) Σ_i Σ_j S(x_{m,i}, y_{m,j}),   S(x, y) = 1[x > y] + ½ 1[x = y],

the Mann–Whitney statistic per env, averaged over the M envs. Both get 95% percentile
intervals from a *stratified* bootstrap: each replicate resamples the runs with replacement
within every env (and, for P(X > Y), X's and Y's runs independently). An algorithm wins the
aggregate when its IQM interval lies above every other algorithm's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from trpo_lab.validation import check_int

__all__ = [
    "CONFIDENCE", "t_critical", "ci_half_width", "mean_ci", "iqm", "learning_return", "AlgoSummary", "summarize",
    "winner", "METRICS",
    "REFERENCE_SCORES", "normalized_score", "probability_of_improvement", "stratified_bootstrap", "Interval",
    "Aggregate", "aggregate", "aggregate_winner",
]

CONFIDENCE = 0.95
_QUANTILE = 1.0 - (1.0 - CONFIDENCE) / 2.0  # two-sided: 0.975


def t_critical(df: int) -> float:
    """``t_{0.975, df}``, the two-sided 95% quantile of Student's t with ``df >= 1`` degrees of freedom."""
    from scipy import stats

    check_int("degrees of freedom", df, minimum=1)
    return float(stats.t.ppf(_QUANTILE, df))


def ci_half_width(std: Any, count: Any) -> np.ndarray:
    """``t_{0.975, n-1} · s / √n`` elementwise (NaN where ``n < 2``): the half width of the 95% interval.

    Args:
        std: Sample standard deviations ``s`` (``ddof=1``), a number or an array.
        count: Sample sizes ``n``, broadcastable against ``std``.
    """
    from scipy import stats

    s = np.asarray(std, dtype=np.float64)
    n = np.asarray(count, dtype=np.float64)
    enough = n >= 2
    t = np.where(enough, stats.t.ppf(_QUANTILE, np.where(enough, n - 1, 1)), np.nan)
    return np.asarray(t * s / np.sqrt(np.maximum(n, 1)))


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """``(mean, half width of the 95% t-interval)``; the half width is NaN for fewer than 2 values."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan
    if x.size < 2:
        return float(x.mean()), math.nan
    return float(x.mean()), float(ci_half_width(x.std(ddof=1), x.size))


def iqm(values: Sequence[float]) -> float:
    """Interquartile mean: the mean of the middle 50% (``scipy.stats.trim_mean(x, 0.25)``)."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    if x.size == 0:
        return math.nan
    cut = int(0.25 * x.size)
    return float(x[cut : x.size - cut].mean())


def learning_return(timesteps: Any, returns: Any) -> float:
    """The mean of a training curve over environment steps: the area under it (trapezoids
    between its logged points) divided by the steps from its first to its last point.

    Args:
        timesteps: Environment steps of the logged points (increasing).
        returns: The training return at each point (e.g. the mean of the last 100 episodes);
            NaN where none had finished yet: those points are left out.

    Returns:
        NaN when fewer than two points have a return; their return when they span no steps.
    """
    t = np.asarray(timesteps, dtype=np.float64)
    r = np.asarray(returns, dtype=np.float64)
    ok = np.isfinite(t) & np.isfinite(r)
    t, r = t[ok], r[ok]
    if t.size < 2:
        return math.nan
    span = float(t[-1] - t[0])
    if span <= 0:
        return float(r.mean())
    return float(np.sum((r[1:] + r[:-1]) * np.diff(t)) / 2.0 / span)


METRICS: dict[str, str] = {
    "final_return": "final return",
    "learning_return": "learning return (mean training return over the run)",
}
"""The per-run scores the report compares (a result record's key -> how the report names it)."""


@dataclass
class AlgoSummary:
    """The aggregate of one algorithm's seeds on one environment.

    ``mean`` / ``ci`` are over the seeds' final returns, ``learning`` / ``learning_ci`` over
    their learning returns (:func:`learning_return`; NaN for records without one).
    """

    algo: str
    seeds: int
    mean: float
    ci: float
    iqm: float
    fps: float
    wall_s: float
    timesteps: float
    learning: float = math.nan
    learning_ci: float = math.nan
    cpu_s: float = math.nan
    """Mean training CPU seconds over the seeds that recorded them (NaN: none did)."""

    def interval(self, metric: str = "final_return") -> tuple[float, float]:
        """``(mean, 95% half width)`` of ``metric`` (a key of :data:`METRICS`) over the seeds."""
        if metric == "final_return":
            return self.mean, self.ci
        if metric == "learning_return":
            return self.learning, self.learning_ci
        raise ValueError(f"Unknown metric {metric!r}; expected one of {', '.join(METRICS)}")

    @property
    def low(self) -> float:
        """Lower end of the 95% interval of the mean final return."""
        return self.mean - self.ci

    @property
    def high(self) -> float:
        """Upper end of the 95% interval of the mean final return."""
        return self.mean + self.ci


def summarize(records: Sequence[Mapping[str, Any]], algos: Sequence[str]) -> dict[str, dict[str, AlgoSummary]]:
    """Env -> algo -> :class:`AlgoSummary`, over the seeds present in ``records``.

    The interval is over the seeds' final returns (each the mean of its evaluation episodes);
    the IQM is over all evaluation episodes of all seeds; the learning return's interval is over
    the seeds' ``learning_return`` (missing in a record: NaN).
    """
    grouped: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
    for record in records:
        grouped.setdefault(record["env"], {}).setdefault(record["algo"], []).append(record)
    table: dict[str, dict[str, AlgoSummary]] = {}
    for env_id, by_algo in grouped.items():
        table[env_id] = {}
        for algo in [a for a in algos if a in by_algo]:
            runs = by_algo[algo]
            mean, ci = mean_ci([r["final_return"] for r in runs])
            learning = [float(r.get("learning_return", math.nan)) for r in runs]
            learning_mean, learning_ci = mean_ci(learning) if all(np.isfinite(learning)) else (math.nan, math.nan)
            episodes = [x for r in runs for x in r["eval_returns"]]
            cpu = [float(r["cpu_s"]) for r in runs if np.isfinite(float(r.get("cpu_s", math.nan)))]
            table[env_id][algo] = AlgoSummary(
                algo=algo,
                seeds=len(runs),
                mean=mean,
                ci=ci,
                iqm=iqm(episodes),
                fps=float(np.mean([r["fps"] for r in runs])),
                wall_s=float(np.mean([r["wall_s"] for r in runs])),
                timesteps=float(np.mean([r["timesteps"] for r in runs])),
                learning=learning_mean,
                learning_ci=learning_ci,
                cpu_s=float(np.mean(cpu)) if cpu else math.nan,
            )
    return table


def winner(summaries: Mapping[str, AlgoSummary], metric: str = "final_return") -> str:
    """One sentence: the algorithm whose 95% CI of ``metric`` (a key of :data:`METRICS`) lies
    above every other's, or "no clear winner"."""
    entries = [(s.algo, *s.interval(metric)) for s in summaries.values()]
    ranked = sorted(entries, key=lambda e: -math.inf if math.isnan(e[1]) else e[1], reverse=True)
    if len(ranked) < 2:
        return "only one algorithm: no comparison"
    best = ranked[0][0]
    if any(math.isnan(mean) for _, mean, _ in ranked):
        return "no clear winner (some runs have no value of it)"
    if any(math.isnan(ci) for _, _, ci in ranked):
        return f"no clear winner (fewer than 2 seeds for a confidence interval; highest mean: {best})"
    best_low = ranked[0][1] - ranked[0][2]
    overlapping = [algo for algo, mean, ci in ranked[1:] if mean + ci >= best_low]
    if overlapping:
        return (
            f"no clear winner: the 95% CI of {best} (highest mean) overlaps "
            f"that of {', '.join(overlapping)}"
        )
    return f"{best} (its 95% CI lies above every other algorithm's)"


# ---------------------------------------------------------------------------- across environments
REFERENCE_SCORES: dict[str, tuple[float, float]] = {
    "CartPole-v1": (22.7, 475.0),
    "Acrobot-v1": (-497.4, -100.0),
    "Pendulum-v1": (-1255.5, 0.0),
}
"""Env id -> ``(random, solved)`` return, the ends of the normalised score.

``random``: the mean return of a uniformly random policy over 200 episodes (seeds 0-199;
``benchmarks/reference_scores.py`` prints them). ``solved``: Gymnasium's registered
``reward_threshold`` (CartPole-v1 475, Acrobot-v1 -100); Pendulum-v1 registers none, and its
best possible return, 0 (upright from the start, no torque), stands in.
"""

BOOTSTRAP_REPS = 2000


def normalized_score(env_id: str, score: Any, references: Mapping[str, tuple[float, float]] | None = None) -> Any:
    """``(score − random) / (solved − random)`` with the env's :data:`REFERENCE_SCORES`.

    Raises:
        KeyError: an env without reference scores.
    """
    low, high = (REFERENCE_SCORES if references is None else references)[env_id]
    return (np.asarray(score, dtype=np.float64) - low) / (high - low)


def _iqm_rows(x: np.ndarray) -> np.ndarray:
    """:func:`iqm` of every row of a 2-D array."""
    x = np.sort(x, axis=-1)
    cut = int(0.25 * x.shape[-1])
    return np.asarray(x[..., cut : x.shape[-1] - cut].mean(axis=-1))


def probability_of_improvement(x_by_env: Sequence[Any], y_by_env: Sequence[Any]) -> float:
    """``P(X > Y)``: the Mann–Whitney statistic of X's over Y's scores per env, averaged over envs.

    Args:
        x_by_env: Per env, X's scores (one per run).
        y_by_env: Per env (same order), Y's scores.
    """
    per_env = []
    for x, y in zip(x_by_env, y_by_env, strict=True):
        diff = np.asarray(x, dtype=np.float64)[:, None] - np.asarray(y, dtype=np.float64)[None, :]
        per_env.append(float(np.mean((diff > 0) + 0.5 * (diff == 0))))
    return float(np.mean(per_env))


def stratified_bootstrap(by_env: Sequence[Any], reps: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``reps`` resamples of every env's runs (with replacement, within the env): per env ``(reps, n)``."""
    out = []
    for scores in by_env:
        x = np.asarray(scores, dtype=np.float64)
        out.append(x[rng.integers(0, x.size, size=(reps, x.size))])
    return out


@dataclass
class Interval:
    """A point estimate and its 95% stratified-bootstrap percentile interval."""

    value: float
    low: float
    high: float


@dataclass
class Aggregate:
    """The aggregate over environments of a compare (see the module docstring).

    Attributes:
        envs: The envs aggregated (those with reference scores that every algorithm ran on).
        left_out: Envs of the records that are not aggregated, each with the reason.
        iqm: Algorithm -> IQM of its normalised scores.
        improvement: ``(x, y)`` -> ``P(x > y)``, for every ordered pair of algorithms.
        references: Env -> the ``(random, solved)`` scores used.
        metric: The per-run score aggregated (a key of :data:`METRICS`).
    """

    envs: list[str]
    left_out: list[str]
    iqm: dict[str, Interval]
    improvement: dict[tuple[str, str], Interval]
    references: dict[str, tuple[float, float]]
    metric: str = "final_return"


def aggregate(
    records: Sequence[Mapping[str, Any]],
    algos: Sequence[str],
    references: Mapping[str, tuple[float, float]] | None = None,
    reps: int = BOOTSTRAP_REPS,
    seed: int = 0,
    metric: str = "final_return",
) -> Aggregate:
    """IQM of normalised scores and pairwise probabilities of improvement, with stratified-bootstrap CIs.

    Each run contributes its ``metric`` (a key of :data:`METRICS`: the final return, or the
    learning return, normalised by the same reference scores). Envs without reference scores,
    or on which some algorithm has no run (or a run without a finite value of ``metric``), are
    left out (and listed). The bootstrap is seeded, so a report is reproducible.
    """
    if metric not in METRICS:
        raise ValueError(f"Unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    refs = dict(REFERENCE_SCORES if references is None else references)
    check_int("reps", reps, minimum=1)
    scores: dict[str, dict[str, list[float]]] = {}
    for record in records:
        value = float(record.get(metric, math.nan))
        if math.isfinite(value):
            scores.setdefault(record["env"], {}).setdefault(record["algo"], []).append(value)
    algos = [a for a in algos if any(a in by_algo for by_algo in scores.values())]
    envs, left_out = [], []
    for env_id, by_algo in scores.items():
        missing = [a for a in algos if a not in by_algo]
        if env_id not in refs:
            left_out.append(f"{env_id} (no reference scores)")
        elif missing:
            what = "finished run" if metric == "final_return" else "learning return"
            left_out.append(f"{env_id} (no {what} of {', '.join(missing)})")
        else:
            envs.append(env_id)
    normalized = {
        algo: [normalized_score(env_id, scores[env_id][algo], refs) for env_id in envs] for algo in algos
    }
    rng = np.random.default_rng(seed)
    iqms: dict[str, Interval] = {}
    samples: dict[str, list[np.ndarray]] = {}
    for algo in algos if envs else []:
        samples[algo] = stratified_bootstrap(normalized[algo], reps, rng)
        point = iqm(np.concatenate(normalized[algo]).tolist())
        boot = _iqm_rows(np.concatenate(samples[algo], axis=1))
        iqms[algo] = Interval(point, *_percentiles(boot))
    improvement: dict[tuple[str, str], Interval] = {}
    for x in iqms:
        for y in iqms:
            if x == y:
                continue
            point = probability_of_improvement(normalized[x], normalized[y])
            per_env = []
            for xb, yb in zip(samples[x], samples[y], strict=True):
                diff = xb[:, :, None] - yb[:, None, :]
                per_env.append(((diff > 0) + 0.5 * (diff == 0)).mean(axis=(1, 2)))
            improvement[(x, y)] = Interval(point, *_percentiles(np.mean(per_env, axis=0)))
    return Aggregate(envs, left_out, iqms, improvement, {e: refs[e] for e in envs}, metric)


def _percentiles(boot: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(boot, [100 * (1 - _QUANTILE), 100 * _QUANTILE])
    return float(low), float(high)


def aggregate_winner(result: Aggregate) -> str:
    """One sentence: the algorithm whose aggregate IQM interval lies above every other's, or why there is none."""
    if not result.envs:
        return "no aggregate: no environment with reference scores that every algorithm ran on"
    ranked = sorted(result.iqm.items(), key=lambda item: item[1].value, reverse=True)
    if len(ranked) < 2:
        return "only one algorithm: no comparison"
    best, interval = ranked[0]
    overlapping = [algo for algo, other in ranked[1:] if other.high >= interval.low]
    if overlapping:
        return (
            f"no clear winner: the 95% interval of {best}'s IQM (the highest) overlaps "
            f"that of {', '.join(overlapping)}"
        )
    return f"{best} (its IQM's 95% interval lies above every other algorithm's)"

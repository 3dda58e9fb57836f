"""Statistics over seeds: mean with a 95% Student-t interval, interquartile mean, the winner.

With ``n`` seeds of sample mean ``x̄`` and sample standard deviation ``s`` (``ddof=1``), the
two-sided 95% confidence interval of the mean is

    x̄ ± t_{0.975, n-1} · s / √n,

with ``t_{0.975, n-1}`` the 0.975 quantile of Student's t with ``n - 1`` degrees of freedom
(``scipy.stats.t.ppf``). The interquartile mean (IQM) is the mean of the middle 50% of the
values, the aggregate Agarwal et al. (2021, "Deep Reinforcement Learning at the Edge of the
Statistical Precipice") recommend over the mean or median for few runs. An algorithm wins on
an environment only when its interval lies entirely above every other algorithm's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from trpo_lab.validation import check_int

__all__ = ["CONFIDENCE", "t_critical", "ci_half_width", "mean_ci", "iqm", "AlgoSummary", "summarize", "winner"]

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
        """Lower end of the 95% interval of the mean final return."""
        return self.mean - self.ci

    @property
    def high(self) -> float:
        """Upper end of the 95% interval of the mean final return."""
        return self.mean + self.ci


def summarize(records: Sequence[Mapping[str, Any]], algos: Sequence[str]) -> dict[str, dict[str, AlgoSummary]]:
    """Env -> algo -> :class:`AlgoSummary`, over the seeds present in ``records``.

    The interval is over the seeds' final returns (each the mean of its evaluation episodes);
    the IQM is over all evaluation episodes of all seeds.
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

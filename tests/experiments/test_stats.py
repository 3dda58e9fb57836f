"""trpo_lab.experiments.stats: the t quantile, the 95% interval, the IQM and the winner, by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trpo_lab.experiments import AlgoSummary, ci_half_width, iqm, mean_ci, summarize, t_critical, winner


@pytest.mark.parametrize(
    ("df", "quantile"),
    # known values of t_{0.975, df}, to 6 decimals (the 3-decimal textbook table: 12.706, 4.303, 3.182, ...)
    [(1, 12.706205), (2, 4.302653), (3, 3.182446), (4, 2.776445), (10, 2.228139), (30, 2.042272), (100, 1.983972)],
)
def test_t_critical_matches_the_printed_table(df: int, quantile: float) -> None:
    assert t_critical(df) == pytest.approx(quantile, abs=1e-6)


def test_t_critical_tends_to_the_normal_quantile_and_refuses_df_below_one() -> None:
    assert t_critical(10**7) == pytest.approx(1.959964, abs=1e-6)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="Invalid degrees of freedom"):
            t_critical(bad)  # type: ignore[arg-type]


def test_mean_ci_and_iqm_by_hand() -> None:
    mean, half = mean_ci([1.0, 2.0, 3.0])
    # s = 1, n = 3: half width = t_{0.975,2} / sqrt(3) = 4.302653 / 1.732051
    assert mean == 2.0 and half == pytest.approx(4.302653 / math.sqrt(3), abs=1e-6)
    mean, half = mean_ci([2.0, 4.0, 4.0, 4.0, 6.0])
    # mean 4, s^2 = (4 + 0 + 0 + 0 + 4) / 4 = 2, n = 5: half width = t_{0.975,4} * sqrt(2) / sqrt(5)
    assert mean == 4.0 and half == pytest.approx(2.776445 * math.sqrt(2 / 5), abs=1e-6)
    assert math.isnan(mean_ci([5.0])[1]) and mean_ci([5.0])[0] == 5.0
    assert all(math.isnan(x) for x in mean_ci([]))
    # 8 values: drop the 2 lowest and 2 highest
    assert iqm([100, 1, 2, 3, 4, 5, 6, -50]) == pytest.approx((2 + 3 + 4 + 5) / 4)
    assert iqm([7.0]) == 7.0
    assert math.isnan(iqm([]))


def test_the_elementwise_half_width_equals_the_scalar_definition() -> None:
    std = np.array([1.0, 2.0, 0.5, 3.0, 1.0])
    count = np.array([0, 1, 2, 5, 31])
    half = ci_half_width(std, count)
    assert np.isnan(half[:2]).all()
    for s, n, h in zip(std[2:], count[2:], half[2:]):
        assert h == pytest.approx(t_critical(int(n) - 1) * s / math.sqrt(n), rel=1e-12)


def _summary(algo: str, mean: float, ci: float) -> AlgoSummary:
    return AlgoSummary(algo=algo, seeds=3, mean=mean, ci=ci, iqm=mean, fps=1.0, wall_s=1.0, timesteps=1.0)


def test_winner_needs_separated_intervals() -> None:
    clear = {"ppo": _summary("ppo", 500, 5), "trpo": _summary("trpo", 300, 50)}
    assert winner(clear) == "ppo (its 95% CI lies above every other algorithm's)"
    overlap = {"ppo": _summary("ppo", 500, 150), "trpo": _summary("trpo", 400, 50), "acktr": _summary("acktr", 100, 1)}
    text = winner(overlap)
    assert text.startswith("no clear winner") and "trpo" in text and "acktr" not in text
    single_seed = {"ppo": _summary("ppo", 500, math.nan), "trpo": _summary("trpo", 100, math.nan)}
    assert winner(single_seed).startswith("no clear winner")
    assert winner({"ppo": _summary("ppo", 1, 1)}) == "only one algorithm: no comparison"


def test_summarize_aggregates_the_seeds_of_each_algorithm_per_env() -> None:
    def record(algo: str, seed: int, final: float, episodes: list[float]) -> dict[str, object]:
        return {"algo": algo, "env": "E", "seed": seed, "final_return": final, "eval_returns": episodes,
                "fps": 100.0 * (seed + 1), "wall_s": 10.0, "timesteps": 1000}

    records = [record("ppo", 0, 1.0, [0.0, 2.0]), record("ppo", 1, 2.0, [2.0, 2.0]), record("ppo", 2, 3.0, [3.0, 3.0]),
               record("trpo", 0, 9.0, [9.0])]
    table = summarize(records, ["trpo", "ppo", "npg"])
    assert list(table) == ["E"] and list(table["E"]) == ["trpo", "ppo"]  # the algos' order; absent ones left out
    ppo = table["E"]["ppo"]
    assert (ppo.seeds, ppo.mean, ppo.fps, ppo.wall_s, ppo.timesteps) == (3, 2.0, 200.0, 10.0, 1000.0)
    assert ppo.ci == pytest.approx(4.302653 / math.sqrt(3), abs=1e-6)
    assert ppo.iqm == pytest.approx(2.25)  # episodes 0 2 2 2 3 3: int(0.25 * 6) = 1 cut each side, mean of 2 2 2 3

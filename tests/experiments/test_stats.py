"""trpo_lab.experiments.stats: the t quantile, the 95% interval, the IQM and the winner, by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trpo_lab.experiments import AlgoSummary, ci_half_width, iqm, mean_ci, summarize, t_critical, winner
from trpo_lab.experiments.stats import (
    Interval,
    aggregate,
    aggregate_winner,
    learning_return,
    normalized_score,
    probability_of_improvement,
)


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


def test_learning_return_is_the_mean_of_the_curve_over_steps() -> None:
    # a curve 0 -> 10 over 100 steps, then flat at 10 for 300 more: area 500 + 3000 over 400 steps
    assert learning_return([0, 100, 400], [0.0, 10.0, 10.0]) == pytest.approx(3500 / 400)
    # points without a return yet are left out: the curve starts at its first finite point
    assert learning_return([0, 100, 200, 300], [math.nan, 2.0, 4.0, 4.0]) == pytest.approx((3.0 * 100 + 4.0 * 100) / 200)
    assert math.isnan(learning_return([0, 100], [math.nan, 1.0]))
    assert math.isnan(learning_return([], []))
    assert learning_return([5, 5], [1.0, 3.0]) == 2.0  # no span: the mean


def test_winner_by_learning_return_uses_its_own_intervals() -> None:
    tie = {
        "trpo": AlgoSummary("trpo", 5, 500.0, 0.0, 500.0, 1.0, 1.0, 1.0, learning=330.0, learning_ci=6.0),
        "ppo": AlgoSummary("ppo", 5, 500.0, 0.0, 500.0, 1.0, 1.0, 1.0, learning=200.0, learning_ci=40.0),
    }
    assert winner(tie).startswith("no clear winner")  # both solved: the final returns tie
    assert winner(tie, "learning_return") == "trpo (its 95% CI lies above every other algorithm's)"
    tie["ppo"].learning = math.nan  # a record without a curve
    assert winner(tie, "learning_return").startswith("no clear winner (some runs")
    with pytest.raises(ValueError, match="Unknown metric 'speed'"):
        winner(tie, "speed")


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


# ---------------------------------------------------------------------- across environments
TINY_REFS = {"A-v0": (0.0, 10.0), "B-v0": (0.0, 100.0)}


def _records(scores: dict[str, dict[str, list[float]]]) -> list[dict[str, object]]:
    return [
        {"algo": algo, "env": env_id, "seed": seed, "final_return": value}
        for env_id, by_algo in scores.items()
        for algo, values in by_algo.items()
        for seed, value in enumerate(values)
    ]


def test_normalized_score_by_hand() -> None:
    assert normalized_score("A-v0", 2.5, TINY_REFS) == 0.25
    np.testing.assert_allclose(normalized_score("CartPole-v1", [22.7, 475.0]), [0.0, 1.0])
    with pytest.raises(KeyError):
        normalized_score("Unknown-v0", 1.0, TINY_REFS)


def test_aggregate_iqm_and_probability_of_improvement_by_hand() -> None:
    # x normalised: A .2 .4 .6 .8, B .1 .3 .5 .7 -> sorted .1 ... .8, middle four .3 .4 .5 .6 -> IQM .45
    # P(x > y): A: x (.2 .4 .6 .8) vs y (.3 .3 .3 .3): 3 of 4 wins -> .75; B: x vs y = .5 everywhere:
    # .5 > .5 never, .7 > .5, the tie .5 = .5 counts 1/2 -> (0 + 0 + .5 + 1) / 4 = .375; mean .5625
    scores = {"A-v0": {"x": [2, 4, 6, 8], "y": [3, 3, 3, 3]}, "B-v0": {"x": [10, 30, 50, 70], "y": [50, 50, 50, 50]}}
    result = aggregate(_records(scores), ["x", "y"], references=TINY_REFS, reps=200)
    assert result.envs == ["A-v0", "B-v0"] and result.left_out == []
    assert result.iqm["x"].value == pytest.approx(0.45)
    assert result.iqm["y"].value == pytest.approx(0.4)  # .3 .3 .3 .3 .5 .5 .5 .5 -> middle .3 .3 .5 .5
    assert result.improvement[("x", "y")].value == pytest.approx(0.5625)
    assert result.improvement[("y", "x")].value == pytest.approx(1 - 0.5625)  # S(x, y) + S(y, x) = 1
    assert probability_of_improvement([[0.2, 0.4]], [[0.3, 0.4]]) == pytest.approx(1.5 / 4)
    for interval in (*result.iqm.values(), *result.improvement.values()):
        assert interval.low <= interval.value <= interval.high or math.isclose(interval.low, interval.high)


def test_the_bootstrap_is_stratified_and_equals_a_plain_loop() -> None:
    scores = {"A-v0": {"x": [1, 2, 9], "y": [3, 4]}, "B-v0": {"x": [50, 60], "y": [10, 20, 90]}}
    reps = 300
    result = aggregate(_records(scores), ["x", "y"], references=TINY_REFS, reps=reps, seed=7)
    # the same stream, one replicate at a time: per algorithm (in order), per env, resample within the env
    rng = np.random.default_rng(7)
    norm = {a: [normalized_score(e, scores[e][a], TINY_REFS) for e in ("A-v0", "B-v0")] for a in ("x", "y")}
    draws = {a: [x[rng.integers(0, x.size, size=(reps, x.size))] for x in norm[a]] for a in ("x", "y")}
    iqm_x = [iqm(np.concatenate([d[r] for d in draws["x"]]).tolist()) for r in range(reps)]
    poi = []
    for r in range(reps):
        poi.append(probability_of_improvement([d[r] for d in draws["x"]], [d[r] for d in draws["y"]]))
    assert (result.iqm["x"].low, result.iqm["x"].high) == pytest.approx(tuple(np.percentile(iqm_x, [2.5, 97.5])))
    assert (result.improvement[("x", "y")].low, result.improvement[("x", "y")].high) == pytest.approx(
        tuple(np.percentile(poi, [2.5, 97.5]))
    )
    # every replicate keeps each env's number of runs: an env whose runs all agree has no spread
    same = aggregate(_records({"A-v0": {"x": [5, 5], "y": [1, 1]}}), ["x", "y"], references=TINY_REFS, reps=50)
    assert same.iqm["x"] == Interval(0.5, 0.5, 0.5) and same.improvement[("x", "y")] == Interval(1.0, 1.0, 1.0)


def test_aggregate_winner_needs_separated_intervals_on_synthetic_summaries() -> None:
    rng = np.random.default_rng(0)
    clear = {
        env_id: {algo: list(high * (q + 0.02 * rng.standard_normal(5))) for algo, q in (("a", 0.9), ("b", 0.5), ("c", 0.4))}
        for env_id, (_, high) in TINY_REFS.items()
    }
    result = aggregate(_records(clear), ["a", "b", "c"], references=TINY_REFS)
    assert aggregate_winner(result) == "a (its IQM's 95% interval lies above every other algorithm's)"
    assert result.improvement[("a", "b")].low > 0.5
    close = {env_id: {"a": [1.0, 5.0, 9.0], "b": [2.0, 5.0, 8.0]} for env_id in TINY_REFS}
    verdict = aggregate_winner(aggregate(_records(close), ["a", "b"], references=TINY_REFS))
    assert verdict.startswith("no clear winner: the 95% interval of ")


def test_aggregate_leaves_out_envs_without_references_or_runs() -> None:
    scores = {"A-v0": {"x": [1.0], "y": [2.0]}, "C-v0": {"x": [1.0], "y": [1.0]}, "B-v0": {"x": [3.0]}}
    result = aggregate(_records(scores), ["x", "y"], references=TINY_REFS, reps=10)
    assert result.envs == ["A-v0"]
    assert result.left_out == ["C-v0 (no reference scores)", "B-v0 (no finished run of y)"]
    nothing = aggregate(_records({"C-v0": {"x": [1.0], "y": [1.0]}}), ["x", "y"], references=TINY_REFS)
    assert nothing.iqm == {} and aggregate_winner(nothing).startswith("no aggregate")
    assert "no clear winner" not in aggregate_winner(aggregate(_records({"A-v0": {"x": [1.0]}}), ["x"], TINY_REFS))


def test_aggregate_of_the_learning_return_reads_that_key() -> None:
    records = [
        {"algo": algo, "env": "A-v0", "seed": seed, "final_return": 10.0, "learning_return": value}
        for algo, values in {"fast": [8.0, 9.0, 8.5], "slow": [2.0, 3.0, 2.5]}.items()
        for seed, value in enumerate(values)
    ]
    final = aggregate(records, ["fast", "slow"], references=TINY_REFS)
    learning = aggregate(records, ["fast", "slow"], references=TINY_REFS, metric="learning_return")
    assert final.iqm["fast"].value == final.iqm["slow"].value == 1.0
    assert learning.metric == "learning_return" and learning.iqm["fast"].value == pytest.approx(0.85)
    assert aggregate_winner(learning).startswith("fast (")
    without = [{k: v for k, v in r.items() if k != "learning_return"} for r in records]
    assert aggregate(without, ["fast", "slow"], references=TINY_REFS, metric="learning_return").envs == []
    with pytest.raises(ValueError, match="Unknown metric"):
        aggregate(records, ["fast"], references=TINY_REFS, metric="auc")

"""trpo_lab.experiments.report: summary.csv, learning_curves.png and report.md from hand-made results."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trpo_lab.experiments import SUMMARY_COLUMNS, experiment_from_dict, read_curve, write_outputs


def _record(algo: str, seed: int, final: float) -> dict[str, Any]:
    return {
        "algo": algo, "env": "CartPole-v1", "seed": seed, "final_return": final, "final_return_std": 0.0,
        "eval_returns": [final, final], "eval_episodes": 2, "timesteps": 1000, "updates": 4, "wall_s": 2.0,
        "fps": 500.0 if algo == "ppo" else 250.0, "train_return": final / 2, "eval_s": 0.1, "settings": {},
    }


def _write_progress(run_dir: Path, final: float) -> None:
    run_dir.mkdir(parents=True)
    rows = ["timesteps,episodes,return_mean,kl,fps,wall_s"]
    rows += [f"{250 * k},{k},{'' if k == 1 else final * k / 4},0.01,500,{0.5 * k}" for k in range(1, 5)]
    (run_dir / "progress.csv").write_text("\n".join(rows) + "\n")


def test_outputs_of_a_hand_made_compare(tmp_path: Path) -> None:
    import matplotlib.image

    experiment = experiment_from_dict(
        {"algos": ["trpo", "ppo"], "envs": ["CartPole-v1"], "seeds": 3, "steps": 1000, "eval_episodes": 2,
         "description": "hand-made"},
        name="hand", origin="test",
    )
    finished = experiment.runs(tmp_path)
    finals = {"trpo": [1.0, 2.0, 3.0], "ppo": [100.0, 101.0, 102.0]}
    records = [_record(s.algo, s.seed, finals[s.algo][s.seed]) for s in finished]
    for spec, record in zip(finished, records):
        _write_progress(spec.run_dir, record["final_return"])

    report = write_outputs(experiment, finished, records, ["CartPole-v1-npg-seed0: ValueError: boom"], 12.0, 2, tmp_path)

    with (tmp_path / "summary.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert tuple(reader.fieldnames or ()) == SUMMARY_COLUMNS
    assert [(r["algo"], r["seed"], r["run_dir"]) for r in rows] == [
        (s.algo, str(s.seed), f"runs/{s.key}") for s in finished
    ]
    assert (tmp_path / "report.md").read_text() == report
    half = 4.302653 / math.sqrt(3)  # s = 1, n = 3 for both algorithms
    # learning return of a run: its curve (no return at 250 steps, then f/2, 3f/4, f at 500, 750,
    # 1000) by trapezoids over 500 steps: (0.625 f + 0.875 f) * 250 / 500 = 0.75 f
    for row, record in zip(rows, records):
        assert float(row["learning_return"]) == pytest.approx(0.75 * record["final_return"])
    assert f"| ppo | 101.0 ± {half:.1f} | 101.0 | {0.75 * 101:.1f} ± {0.75 * half:.1f} | 3 | 500 | 2.0 |" in report
    assert f"| trpo | 2.0 ± {half:.1f} | 2.0 | {0.75 * 2:.1f} ± {0.75 * half:.1f} | 3 | 250 | 2.0 |" in report
    assert report.index("| ppo |") < report.index("| trpo |")  # best mean first
    assert "**Winner** (final return): ppo (its 95% CI lies above every other algorithm's)." in report
    assert "**Winner** (learning return): ppo (its 95% CI lies above every other algorithm's)." in report
    assert "Most steps per second: ppo." in report
    assert "hand-made" in report and "Budget 1,000 steps per run" in report
    assert "the training time of all runs adds up to 12 s" in report  # 6 runs x 2 s
    assert "## Failed runs\n\n- CartPole-v1-npg-seed0: ValueError: boom" in report
    # the aggregate: CartPole-v1 normalised by (22.7, 475): ppo (101 - 22.7) / 452.3 = 0.173, trpo below 0
    assert "## Aggregate over environments: final return" in report and "CartPole-v1 (22.7 → 475)" in report
    assert "## Aggregate over environments: learning return" in report
    assert f"| ppo | {(101 - 22.7) / 452.3:.2f} [" in report
    assert "**Winner over all environments**: ppo (its IQM's 95% interval lies above every other algorithm's)." in report
    assert "| ppo | — | 1.00 [1.00, 1.00] |" in report  # every ppo run beats every trpo run
    assert "Improvements whose interval lies above 0.5: ppo over trpo." in report
    image = matplotlib.image.imread(tmp_path / "learning_curves.png")
    assert image.ndim == 3 and np.ptp(image[..., :3]) > 0


def test_read_curve_keeps_empty_cells_as_nan(tmp_path: Path) -> None:
    _write_progress(tmp_path / "run", 8.0)
    curve = read_curve(tmp_path / "run")
    assert curve["timesteps"].tolist() == [250, 500, 750, 1000]
    assert math.isnan(curve["return_mean"][0]) and curve["return_mean"][1:].tolist() == [4.0, 6.0, 8.0]
    assert all(values.size == 0 for values in read_curve(tmp_path / "missing").values())


@pytest.mark.parametrize("finished_runs", [0, 1])
def test_a_compare_with_few_finished_runs_still_writes_every_file(tmp_path: Path, finished_runs: int) -> None:
    experiment = experiment_from_dict({"algos": ["ppo"], "envs": ["CartPole-v1"], "seeds": 1}, name="x", origin="test")
    finished = experiment.runs(tmp_path)[:finished_runs]
    records = [_record("ppo", 0, 5.0)][:finished_runs]
    for spec in finished:
        _write_progress(spec.run_dir, 5.0)
    report = write_outputs(experiment, finished, records, [], 1.0, 1, tmp_path)
    assert (tmp_path / "summary.csv").is_file() and (tmp_path / "learning_curves.png").is_file()
    assert ("only one algorithm: no comparison" in report) == bool(finished_runs)

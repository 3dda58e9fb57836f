"""benchmarks/mujoco.py through compare's runner: ours and an SB3 peer side by side, resume, the
README section; the peer run's checkpoint and resume (trpo_lab/experiments/peers.py)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from trpo_lab.agents.signals import TrainingInterrupted
from trpo_lab.experiments import experiment_from_dict, peers

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "mujoco.py"


def _load() -> ModuleType:
    # Not on sys.path under its own name: it would shadow the real mujoco package.
    spec = importlib.util.spec_from_file_location("mujoco_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_ours_and_a_peer_side_by_side_then_a_rerun_skips_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _load()
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{bench.BEGIN}\nold text\n{bench.END}\n\ntail\n")
    args = ["--envs", "Hopper-v5", "--algos", "sb3-trpo,trpo", "--seeds", "1", "--steps", "2048", "--workers", "2",
            "--eval-episodes", "2", "--out", str(tmp_path / "out"), "--no-progress", "--readme", str(readme)]
    assert bench.main(args) == 0
    first = capsys.readouterr()
    assert "2 to run" in first.err
    with (tmp_path / "out" / "summary.csv").open(newline="") as fh:
        rows = {row["algo"]: row for row in csv.DictReader(fh)}
    assert set(rows) == {"trpo", "sb3-trpo"}
    for algo, row in rows.items():
        assert row["env"] == "Hopper-v5" and int(row["timesteps"]) >= 2048 and float(row["wall_s"]) > 0
        assert 0 < float(row["cpu_s"]) <= 1.5 * float(row["wall_s"]) + 1, row  # one thread: CPU time <= wall time
        assert float(row["final_return"]) > 0  # Hopper pays for staying alive
        with (tmp_path / "out" / row["run_dir"] / "progress.csv").open(newline="") as fh:
            curve = list(csv.DictReader(fh))
        assert curve and {"timesteps", "wall_s", "return_mean", "episodes", "fps"} <= set(curve[0]), algo
    record = json.loads((tmp_path / "out" / rows["sb3-trpo"]["run_dir"] / "result.json").read_text())
    assert len(record["eval_returns"]) == 2 and record["settings"]["hyperparameters"]["n_critic_updates"] == 20
    section = (tmp_path / "out" / "results.md").read_text()
    assert "| trpo |" in section and "| sb3-trpo |" in section and "x |" in section  # wall time over the peer's
    cpu = float(rows["trpo"]["cpu_s"]) / float(rows["sb3-trpo"]["cpu_s"])
    assert f"| {cpu:.2f}x (1 seed) |" in section  # CPU time over the peer's, on the seeds both recorded
    text = readme.read_text()
    assert "old text" not in text and section.strip() in text and text.endswith(f"{bench.END}\n\ntail\n")
    assert (tmp_path / "out" / "learning_curves.png").stat().st_size > 0

    assert bench.main(args) == 0
    second = capsys.readouterr()
    assert "0 to run" in second.err and "skipped Hopper-v5-sb3-trpo-seed0" in second.err
    assert "skipped Hopper-v5-trpo-seed0" in second.err

    # A piece of the grid (one algorithm here) leaves the other finished runs in the outputs:
    # summary, report and README always cover every finished run of the whole grid in --out.
    piece = [*args[: args.index("--algos") + 1], "trpo", *args[args.index("--algos") + 2 :]]
    assert bench.main(piece) == 0
    third = capsys.readouterr()
    assert "0 to run" in third.err and "2 of 90 runs of the grid finished" in third.err
    with (tmp_path / "out" / "summary.csv").open(newline="") as fh:
        assert {row["algo"] for row in csv.DictReader(fh)} == {"trpo", "sb3-trpo"}
    assert "| sb3-trpo |" in (tmp_path / "out" / "results.md").read_text()
    assert "| sb3-trpo |" in (tmp_path / "out" / "report.md").read_text()
    assert '"Walker2d-v5"' in (tmp_path / "out" / "experiment.toml").read_text()  # the grid's spec, not the piece's

    report_only = [*args[: args.index("--seeds") + 1], "2", *args[args.index("--seeds") + 2 :], "--report-only"]
    assert bench.main(report_only) == 0  # trains nothing: reports the 2 finished runs of the grid
    fourth = capsys.readouterr()
    assert "2 of 90 runs of the grid finished" in fourth.err and "| trpo | " in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.slow
def test_a_stopped_peer_run_resumes_from_its_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peers, "CHECKPOINT_EVERY", 512)
    experiment = experiment_from_dict(
        {"algos": ["sb3-ppo"], "envs": ["Hopper-v5"], "seeds": 1, "steps": 1024, "eval_episodes": 1},
        name="t", origin="test",
    )
    (spec,) = experiment.runs(tmp_path)
    assert spec.hyperparameters == peers.ZOO_SETTINGS["sb3-ppo"]["Hopper-v5"] and spec.n_envs == 1
    sent: list[Any] = []

    def stop_after_first_rollout(message: tuple[Any, ...]) -> None:
        if message[0] == "progress" and not sent:
            sent.append(message)
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted):
        peers.execute_peer_run(spec, stop_after_first_rollout)
    state = json.loads((spec.run_dir / "checkpoint.json").read_text())
    assert state["timesteps"] == 512 and not (spec.run_dir / "result.json").exists()
    assert state["cpu_s"] > 0

    record = peers.execute_peer_run(spec)
    assert record["timesteps"] == 1024 and record["updates"] == 2
    assert record["cpu_s"] > state["cpu_s"]  # the resumed piece adds to the first one's
    with (spec.run_dir / "progress.csv").open(newline="") as fh:
        steps = [int(row["timesteps"]) for row in csv.DictReader(fh)]
    assert steps == [512, 1024]  # continued, no gap and no duplicate
    assert (spec.run_dir / "final.zip").is_file()


def test_bad_command_lines_exit_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load()
    for args, message in (
        (["--envs", "Ant-v5"], "Invalid --envs: 'Ant-v5'; expected a comma-separated list of HalfCheetah-v5"),
        (["--algos", "a2c"], "Invalid --algos: 'a2c'"),
        (["--seeds", "0"], "Invalid --seeds: 0; expected an integer >= 1"),
    ):
        assert bench.main(args) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_rewrite_readme_needs_the_markers(tmp_path: Path) -> None:
    bench = _load()
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="has no <!-- mujoco-results:begin -->"):
        bench.rewrite_readme(readme, "x")


def test_the_grid_is_interleaved_seed_by_seed_ours_next_to_the_peer(tmp_path: Path) -> None:
    from trpo_lab.experiments.runner import interleaved

    experiment = experiment_from_dict(
        {"algos": ["trpo", "sb3-trpo"], "envs": ["Hopper-v5", "Walker2d-v5"], "seeds": 2, "steps": 2048},
        name="t", origin="test",
    )
    order = [s.key for s in interleaved(experiment, experiment.runs(tmp_path))]
    assert order == [
        "Hopper-v5-trpo-seed0", "Hopper-v5-sb3-trpo-seed0", "Walker2d-v5-trpo-seed0", "Walker2d-v5-sb3-trpo-seed0",
        "Hopper-v5-trpo-seed1", "Hopper-v5-sb3-trpo-seed1", "Walker2d-v5-trpo-seed1", "Walker2d-v5-sb3-trpo-seed1",
    ]
    assert [s.key for s in experiment.runs(tmp_path)][:2] == ["Hopper-v5-trpo-seed0", "Hopper-v5-trpo-seed1"]


def test_a_signal_stops_the_grid_with_one_line_and_the_signal_exit_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _load()

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise TrainingInterrupted("SIGTERM received", signal.SIGTERM)

    monkeypatch.setattr(bench, "run_experiment", interrupted)
    assert bench.main(["--envs", "Hopper-v5", "--algos", "trpo", "--seeds", "1", "--out", str(tmp_path)]) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mujoco.py: interrupted: SIGTERM received; the same command continues the unfinished runs from "
                   "their checkpoints"]

"""`trpo-lab train --resume`: a run killed with SIGKILL continues to a complete progress.csv."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

N_ENVS, N_STEPS, BUDGET, CHECKPOINT_EVERY = 2, 16, 12_000, 20


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "progress.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_sigkilled_run_resumes_to_a_complete_progress_csv(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "trpo_lab", "train", "ppo", "CartPole-v1", "--steps", str(BUDGET),
        "--n-envs", str(N_ENVS), "--run-dir", str(run_dir), "--quiet",
        "--set", f"n_steps={N_STEPS}", "--set", "batch_size=32", "--set", "n_epochs=1",
        "--set", f"checkpoint_every={CHECKPOINT_EVERY}",
    ]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoint.pt").exists():
            assert process.poll() is None, process.communicate()[1].decode()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        # Kill a few updates past the checkpoint (and well before the next one): those rows
        # are in progress.csv but not in checkpoint.pt, and the resume must drop them.
        while len(_rows(run_dir)) < CHECKPOINT_EVERY + 5:
            assert process.poll() is None, "the run finished before it could be killed; raise BUDGET"
            assert time.monotonic() < deadline, "too slow"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (run_dir / "final.pt").exists()
    killed_rows = len(_rows(run_dir))
    from trpo_lab.agents.base import read_checkpoint

    checkpointed = read_checkpoint(run_dir / "checkpoint.pt")["counters"]["num_updates"]
    assert checkpointed % CHECKPOINT_EVERY == 0 and checkpointed < killed_rows

    resumed = subprocess.run(
        [sys.executable, "-m", "trpo_lab", "train", "--resume", str(run_dir), "--quiet"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert (run_dir / "final.pt").exists()

    rows = _rows(run_dir)
    assert len(rows) > killed_rows > 0
    updates = [int(float(r["updates"])) for r in rows]
    assert updates == list(range(1, len(rows) + 1)), "updates must go 1, 2, 3, ... without gap or duplicate"
    timesteps = [int(float(r["timesteps"])) for r in rows]
    steps_per_update = [b - a for a, b in zip([0, *timesteps], timesteps)]
    # each update adds its valid transitions: at least one, at most n_envs * n_steps
    assert all(0 < d <= N_ENVS * N_STEPS for d in steps_per_update), steps_per_update
    assert BUDGET <= timesteps[-1] < BUDGET + N_ENVS * N_STEPS

    final = read_checkpoint(run_dir / "final.pt")
    assert final["counters"]["num_timesteps"] == timesteps[-1]
    assert final["counters"]["num_updates"] == len(rows)
    assert "optimizer" in final["optimizers"] and final["optimizers"]["optimizer"]["state"]

    # TensorBoard shows the same history: the killed run's points after the checkpoint are
    # purged, not drawn twice.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))  # what the TensorBoard UI reads
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("time/updates")]
    assert [step for step, _ in logged] == timesteps
    assert [int(value) for _, value in logged] == updates


def test_resume_of_a_missing_run_directory_exits_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trpo_lab", "train", "--resume", str(tmp_path / "nothing")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "nothing" in result.stderr


def test_resume_with_set_changes_what_can_change(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from trpo_lab import PPO
    from trpo_lab.cli import main
    from trpo_lab.schedules import Schedule

    run_dir = tmp_path / "run"
    base = ["--quiet", "--set", "n_steps=16", "--set", "batch_size=32", "--set", "n_epochs=1"]
    assert main(["train", "ppo", "CartPole-v1", "--steps", "64", "--n-envs", "2", "--run-dir", str(run_dir), *base]) == 0
    assert main(["train", "--resume", str(run_dir), "--steps", "128", "--quiet", "--set", "ent_coef=0.01",
                 "--set", "learning_rate=linear", "--set", "nan_policy=skip"]) == 0, capsys.readouterr().err
    config = (run_dir / "config.toml").read_text()
    assert "ent_coef = 0.01" in config and 'learning_rate = "linear:0.001:0.0"' in config  # from the preset's start
    agent = PPO.load(run_dir / "final.pt")
    try:
        assert agent.num_timesteps >= 128 and agent.config.ent_coef == 0.01 and agent.config.nan_policy == "skip"
        assert agent.config.learning_rate == Schedule(initial=1e-3, final=0.0)
        assert agent.current_values["learning_rate"] == 0.0  # the schedule ended with the resumed run
    finally:
        agent.close()
    rows = _rows(run_dir)
    assert [float(r["timesteps"]) for r in rows] == sorted(float(r["timesteps"]) for r in rows)
    assert main(["train", "--resume", str(run_dir), "--steps", "256", "--set", "optimizer=\"sgd\""]) == 2
    assert "Invalid --set optimizer on resume: optimizer cannot change" in capsys.readouterr().err

"""The CLI as a user runs it: subprocesses, exit codes, the run directory."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trpo_lab", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_train_writes_run_directory_and_eval_reads_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = _run(
        "train", "trpo", "CartPole-v1", "--steps", "3000", "--n-envs", "2", "--run-dir", str(run_dir),
        "--set", "n_steps=128", "--set", "checkpoint_every=2", "--set", "policy_kwargs.net_arch=[16]",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    for name in ("config.toml", "progress.csv", "checkpoint.pt", "final.pt"):
        assert (run_dir / name).is_file(), name
    assert list(run_dir.glob("events.out.tfevents.*"))
    with (run_dir / "progress.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {"timesteps", "episodes", "return_mean", "kl", "fps", "wall_s"} <= set(rows[0])
    assert int(float(rows[-1]["timesteps"])) >= 3000
    config = (run_dir / "config.toml").read_text()
    assert 'algo = "trpo"' in config and "n_steps = 128" in config and "net_arch = [\n    16,\n]" in config
    result = _run("eval", str(run_dir), "--episodes", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "over 3 episodes" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "trpo", "CartPol-v1"], "Unknown environment id 'CartPol-v1'; did you mean CartPole-v1"),
        (["train", "sac", "CartPole-v1"], "Unknown algorithm 'sac'"),
        (["train", "trpo", "CartPole-v1", "--set", "gama=0.9"], "Unknown hyperparameter 'gama'"),
        (["train", "trpo", "CartPole-v1", "--set", "gamma=2"], "Invalid gamma: 2.0"),
        (["train", "trpo", "CartPole-v1", "--set", "gamma"], "expected key=value"),
        (["train", "trpo", "CartPole-v1", "--set", "gamma=none"], "Invalid gamma: 'none'"),  # not optional
        (["train", "trpo", "CartPole-v1", "--n-envs", "0"], "Invalid n_envs: 0"),
        (["train", "trpo", "CartPole-v1", "--steps", "x"], "invalid int value"),
        (["train", "trpo", "CartPole-v1", "--device", "cuda:7"] , "Invalid device"),
        (["train"], "ALGO and ENV are required"),
        (["eval", "no/such/run"], "Run directory not found"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = _run(*args, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr


def test_train_device_auto_and_a_device_that_does_not_exist(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = _run(
        "train", "trpo", "CartPole-v1", "--steps", "64", "--n-envs", "1", "--set", "n_steps=64",
        "--device", "auto", "--run-dir", str(run_dir), "--quiet", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    picked = "cuda" if torch.cuda.is_available() else "cpu"
    assert f'device = "{picked}"' in (run_dir / "config.toml").read_text()
    result = _run("train", "trpo", "CartPole-v1", "--device", "tpu", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "trpo-lab: error: Invalid device: 'tpu'; expected 'cpu', 'cuda', 'cuda:N' or 'auto'"
    ]


def test_set_none_switches_an_optional_preset_value_off(tmp_path: Path) -> None:
    """TOML has no null: ``--set key=none`` (or ``key = "none"`` in a file) turns off what a preset set."""
    from trpo_lab.config import ACKTRConfig, PPOConfig

    assert PPOConfig.from_dict({"target_kl": "none"}).target_kl is None
    assert PPOConfig.from_dict({"target_kl": "None"}).target_kl is None
    assert ACKTRConfig.from_dict({"vf_kl_clip": "none"}).vf_kl_clip is None
    run_dir = tmp_path / "run"
    result = _run(  # the ACKTR Pendulum-v1 preset sets target_kl = 0.002
        "train", "acktr", "Pendulum-v1", "--steps", "512", "--n-envs", "2", "--run-dir", str(run_dir),
        "--set", "target_kl=none", "--quiet", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "target_kl" not in (run_dir / "config.toml").read_text()

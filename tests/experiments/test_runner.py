"""`trpo-lab compare` (trpo_lab.experiments.runner): end to end in a subprocess, rerun skipping, interrupts, bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trpo_lab.cli import main
from trpo_lab.experiments import Experiment, experiment_from_dict, finished_result, run_experiment

ROOT = Path(__file__).resolve().parents[2]
TINY = """
description = "tiny smoke experiment"
algos = ["trpo", "ppo"]
envs = ["CartPole-v1"]
seeds = 2
steps = 2000
eval_episodes = 2
"""
RUN_FILES = ("config.toml", "progress.csv", "checkpoint.pt", "final.pt", "result.json", "spec.json")


def _compare(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TRPO_LAB_PRESETS": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "trpo_lab", "compare", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.slow
def test_compare_writes_every_promised_file_and_a_rerun_skips_finished_runs(tmp_path: Path) -> None:
    import matplotlib.image

    (tmp_path / "tiny.toml").write_text(TINY)
    out = tmp_path / "out"
    first = _compare(tmp_path, "tiny.toml", "--out", "out", "--workers", "2")
    assert first.returncode == 0, first.stderr
    assert "4 to run" in first.stderr

    with (out / "summary.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4
    assert {(r["algo"], r["seed"]) for r in rows} == {("trpo", "0"), ("trpo", "1"), ("ppo", "0"), ("ppo", "1")}
    for row in rows:
        assert {"algo", "env", "seed", "final_return", "wall_s", "fps"} <= set(row)
        assert row["env"] == "CartPole-v1"
        assert 8 <= float(row["final_return"]) <= 500 and float(row["wall_s"]) > 0 and float(row["fps"]) > 0
        assert int(row["timesteps"]) >= 2000
        run_dir = out / row["run_dir"]
        for name in RUN_FILES:
            assert (run_dir / name).is_file(), f"{run_dir / name} is missing"
        assert list(run_dir.glob("events.out.tfevents.*")), "no TensorBoard events"

    image = matplotlib.image.imread(out / "learning_curves.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    assert np.ptp(image[..., :3]) > 0  # not a blank canvas

    report = (out / "report.md").read_text()
    assert "## CartPole-v1" in report and "| trpo |" in report and "| ppo |" in report
    assert "IQM" in report and "steps/s" in report and "Winner" in report
    assert "](learning_curves.png)" in report

    results = sorted(out.glob("runs/*/result.json"))
    mtimes = {p: p.stat().st_mtime_ns for p in results}
    second = _compare(tmp_path, "tiny.toml", "--out", "out", "--workers", "2")
    assert second.returncode == 0, second.stderr
    assert "4 already finished, 0 to run" in second.stderr
    assert second.stderr.count("skipped ") == 4
    assert {p: p.stat().st_mtime_ns for p in results} == mtimes
    with (out / "summary.csv").open(newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 4

    # An interrupted run (checkpoint but no result yet) is resumed, not restarted; the others are kept.
    partial = out / "runs" / "CartPole-v1-ppo-seed1"
    rows_before = (partial / "progress.csv").read_text()
    (partial / "result.json").unlink()
    (partial / "final.pt").unlink()
    third = _compare(tmp_path, "tiny.toml", "--out", "out", "--workers", "1", "--quiet")
    assert third.returncode == 0, third.stderr
    assert "3 already finished, 1 to run" in third.stderr
    assert (partial / "result.json").is_file() and (partial / "final.pt").is_file()
    assert (partial / "progress.csv").read_text() == rows_before
    assert {p: p.stat().st_mtime_ns for p in results if p.parent != partial} == {
        p: m for p, m in mtimes.items() if p.parent != partial
    }


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "killpg"), reason="needs POSIX process groups")
@pytest.mark.parametrize(
    ("workers", "group"), [(2, False), (1, False), (1, True)],
    ids=["every run running", "runs queued behind one worker", "the whole process group signalled"],
)
def test_sigterm_checkpoints_every_running_run_and_leaves_no_process(tmp_path: Path, workers: int, group: bool) -> None:
    """SIGTERM: the running runs stop at a checkpoint, and no queued run starts. With one worker
    for four runs the executor has already handed that worker its next run, which must not
    start either (it used to, and trained until the shutdown's grace period killed it). With the
    signal sent to the process group (``kill -- -PGID``, a job scheduler) the worker gets it
    twice, from the kernel and from the main process, and stops at once; it must not start its
    next run either (it did: the second signal's plain KeyboardInterrupt was not noted)."""
    import signal
    import time

    seeds = "seeds = 1" if workers == 2 else "seeds = 2"
    (tmp_path / "long.toml").write_text(TINY.replace("steps = 2000", "steps = 1000000").replace("seeds = 2", seeds))
    env = {**os.environ, "TRPO_LAB_PRESETS": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "trpo_lab", "compare", "long.toml", "--out", "out", "--workers", str(workers), "--quiet"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while len(list((tmp_path / "out").glob("runs/*/checkpoint.pt"))) < workers:
            assert process.poll() is None and time.monotonic() < deadline, process.stderr and process.stderr.read()
            time.sleep(0.1)
        if group:
            os.killpg(process.pid, signal.SIGTERM)
        else:
            process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "run the same command again" in stderr
    assert stderr.count("writing a checkpoint") == workers  # each worker finished its update and checkpointed
    deadline = time.monotonic() + 30
    with pytest.raises(ProcessLookupError):  # no worker outlives the compare (for long)
        while time.monotonic() < deadline:
            os.killpg(process.pid, 0)
            time.sleep(0.2)
    started = list((tmp_path / "out" / "runs").iterdir())
    assert len(started) == workers  # the queued runs never started
    for run_dir in started:
        assert (run_dir / "checkpoint.pt").is_file() and not (run_dir / "result.json").exists()


def test_changed_settings_in_an_existing_output_folder_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "out" / "runs" / "CartPole-v1-ppo-seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "spec.json").write_text('{"algo": "ppo", "total_timesteps": 1}')
    assert main(["compare", "--algos", "ppo", "--envs", "CartPole-v1", "--seeds", "1", "--steps", "500",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "other settings" in err and "total_timesteps" in err


def test_a_speed_only_setting_keeps_the_finished_runs_and_others_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``compile`` changes how fast PPO runs, not what it computes (``PPOConfig.speed_only``):
    turning it on in a rerun skips the finished run; another hyperparameter is refused."""
    out = tmp_path / "out"
    args = ["compare", "--algos", "ppo", "--envs", "CartPole-v1", "--seeds", "1", "--steps", "256", "--out", str(out)]
    assert main(args) == 0
    result = out / "runs" / "CartPole-v1-ppo-seed0" / "result.json"
    before = result.read_bytes(), result.stat().st_mtime_ns
    assert main([*args, "--set", "ppo.compile=true"]) == 0
    assert (result.read_bytes(), result.stat().st_mtime_ns) == before  # skipped, not trained again
    capsys.readouterr()
    assert main([*args, "--set", "ppo.n_epochs=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "other settings (hyperparameters differ)" in err


def test_a_resumed_run_takes_a_changed_speed_only_setting(tmp_path: Path) -> None:
    """A run checkpointed without ``compile`` and resumed with it goes on compiled, from its
    checkpoint, and its ``spec.json`` records the setting it now runs with."""
    from trpo_lab import PPO
    from trpo_lab.experiments.runner import _start_or_resume
    from trpo_lab.experiments.spec import RunSpec

    run_dir = tmp_path / "runs" / "CartPole-v1-ppo-seed0"
    spec = RunSpec(algo="ppo", env_id="CartPole-v1", seed=0, total_timesteps=1024, n_envs=2, vectorization="sync",
                   hyperparameters={"n_steps": 32}, eval_episodes=2, run_dir=run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "spec.json").write_text(json.dumps(spec.settings()))
    agent = PPO("CartPole-v1", n_envs=2, seed=0, n_steps=32)
    agent.learn(128, tensorboard=False)
    agent.save(run_dir / "checkpoint.pt")
    agent.close()
    spec.hyperparameters["compile"] = True
    resumed = _start_or_resume(spec)
    try:
        assert resumed.config.compile and resumed.num_timesteps == agent.num_timesteps
        assert json.loads((run_dir / "spec.json").read_text())["hyperparameters"]["compile"] is True
        resumed.save(run_dir / "checkpoint.pt")  # now the checkpoint says compile = true
    finally:
        resumed.close()
    del spec.hyperparameters["compile"]  # turned off again: the default, not the checkpoint's true
    resumed = _start_or_resume(spec)
    try:
        assert not resumed.config.compile and resumed.num_timesteps == agent.num_timesteps
        assert "compile" not in json.loads((run_dir / "spec.json").read_text())["hyperparameters"]
    finally:
        resumed.close()


def test_a_result_without_its_agent_file_is_refused_not_retrained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A finished run whose ``final.pt`` is missing (copied without it) is refused with one
    line; the run folder, its ``result.json`` included, is left as it was."""
    out = tmp_path / "out"
    args = ["compare", "--algos", "ppo", "--envs", "CartPole-v1", "--seeds", "1", "--steps", "256", "--out", str(out)]
    assert main(args) == 0
    run_dir = out / "runs" / "CartPole-v1-ppo-seed0"
    (run_dir / "final.pt").unlink()
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "result.json but no final.pt" in err and str(run_dir) in err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_seeds_option_runs_the_seeds_it_names(tmp_path: Path) -> None:
    """``--seeds 3,5-6`` runs those seeds only (a count, ``--seeds 2``, is 0..1); a later call with
    other seeds adds their runs to the same folder and skips the finished ones."""
    spec = tmp_path / "spec.toml"
    spec.write_text('algos = ["ppo"]\nenvs = ["CartPole-v1"]\nseeds = [1, 2]\nsteps = 256\neval_episodes = 1\n')
    out = tmp_path / "out"
    common = ["compare", str(spec), "--set", "n_steps=32", "--workers", "1", "--quiet", "--out", str(out)]
    assert main([*common, "--seeds", "3,5-6"]) == 0
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["CartPole-v1-ppo-seed3", "CartPole-v1-ppo-seed5", "CartPole-v1-ppo-seed6"]
    assert all((out / "runs" / name / "final.pt").is_file() for name in runs)
    mtimes = {name: (out / "runs" / name / "final.pt").stat().st_mtime_ns for name in runs}
    assert main([*common, "--seeds", "6,0"]) == 0
    assert {p.name for p in (out / "runs").iterdir()} == {*runs, "CartPole-v1-ppo-seed0"}
    assert (out / "runs" / "CartPole-v1-ppo-seed6" / "final.pt").stat().st_mtime_ns == mtimes["CartPole-v1-ppo-seed6"]


@pytest.mark.parametrize(
    ("spec", "args", "message"),
    [
        ('algos = ["trpo"]\nenvs = ["CartPole-v1"]\n', ["--seeds", "5-3"], "Invalid --seeds: '5-3'; expected a count N >= 1"),
        ('algos = ["trpo"]\nenvs = ["CartPole-v1"]\n', ["--seeds", "0"], "Invalid --seeds: '0'; expected a count N >= 1"),
        ('algos = ["trpo"]\nenvs = ["CartPole-v1"]\n', ["--seeds", "ten"], "Invalid --seeds: 'ten'"),
        ('algos = ["trpo"]\nenvs = ["CartPole-v1"]\n', ["--seeds", "1,2-3,3"], "'1,2-3,3'; a seed is given twice"),
        ('algos = ["trpo", "sac"]\nenvs = ["CartPole-v1"]\n', [], "Unknown algorithm 'sac'"),
        ('algos = ["trpo"]\nenvs = ["CartPole-v7"]\n', [], "Unknown environment id 'CartPole-v7'"),
        ('algos = ["trpo"]\nsuite = "nosuch"\n', [], "Unknown env suite 'nosuch'"),
        ('algos = ["trpo"]\nenvs = ["CartPole-v1"]\nbudget = 5\n', [], "unknown key(s) ['budget']"),
        ('algos = ["trpo"\n', [], "Unreadable TOML"),
        ('algos = ["trpo"]\nenvs = ["CartPole-v1"]\n', ["--workers", "0"], "Invalid --workers: 0"),
        ('algos = ["trpo"]\nenvs = ["CartPole-v1"]\n', ["--algos", "trpo,xyz"], "Unknown algorithm 'xyz'"),
        ('algos = ["trpo"]\nenvs = ["CartPole-v1"]\nseeds = 0\n', [], "seeds 0"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], spec: str, args: list[str], message: str
) -> None:
    path = tmp_path / "spec.toml"
    path.write_text(spec)
    assert main(["compare", str(path), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_missing_experiment_file_and_unknown_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "no/such/file.toml"]) == 2
    assert "TOML file not found" in capsys.readouterr().err
    assert main(["compare", "nosuchexperiment"]) == 2
    assert "Unknown experiment 'nosuchexperiment'" in capsys.readouterr().err


def _tiny_experiment() -> Experiment:
    return experiment_from_dict(
        {"algos": ["ppo"], "envs": ["CartPole-v1"], "seeds": 1, "steps": 500, "eval_episodes": 1}, "tiny", "test"
    )


def test_a_run_is_finished_only_with_final_pt_and_a_result_of_the_same_settings(tmp_path: Path) -> None:
    (spec,) = _tiny_experiment().runs(tmp_path)
    spec.run_dir.mkdir(parents=True)
    record = {"final_return": 1.0, "settings": spec.settings()}
    (spec.run_dir / "result.json").write_text(json.dumps(record))
    assert finished_result(spec) is None  # no final.pt yet
    (spec.run_dir / "final.pt").write_bytes(b"")
    assert finished_result(spec) == record
    (spec.run_dir / "result.json").write_text(json.dumps({**record, "settings": {**spec.settings(), "seed": 7}}))
    assert finished_result(spec) is None
    (spec.run_dir / "result.json").write_text("{not json")
    assert finished_result(spec) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"executor": "dask"}, "Invalid executor: 'dask'; expected 'local' or 'ray'"),
        ({"ray_address": "auto"}, "Invalid ray_address: 'auto'; it needs executor 'ray'"),
        ({"workers": 0}, "Invalid workers: 0; expected an integer >= 1"),
        ({"workers": True}, "Invalid workers: True; expected an integer >= 1"),
    ],
)
def test_run_experiment_refuses_bad_arguments_before_writing_anything(
    tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError) as error:
        run_experiment(_tiny_experiment(), tmp_path / "out", progress=False, **kwargs)
    assert str(error.value) == message
    assert not (tmp_path / "out").exists()


VARIANTS = """
algos = ["trpo", "trpo-kfac", "ppo"]
envs = ["CartPole-v1"]
seeds = 1
steps = 512
eval_episodes = 1

[hyperparameters]
n_steps = 32

[hyperparameters.ppo]
n_epochs = 2

[variants.trpo-kfac]
algo = "trpo"
curvature = "kfac"
"""


def test_variants_and_set_overrides_are_their_own_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "variants.toml").write_text(VARIANTS)
    out = tmp_path / "out"
    args = ["compare", str(tmp_path / "variants.toml"), "--out", str(out), "--workers", "2", "--quiet",
            "--set", "trpo.target_kl=0.02", "--set", "gamma=0.98", "--set", "trpo-kfac.cg_damping=0.2"]
    assert main(args) == 0, capsys.readouterr().err
    with (out / "summary.csv").open(newline="") as fh:
        rows = {row["algo"]: row for row in csv.DictReader(fh)}
    assert set(rows) == {"trpo", "trpo-kfac", "ppo"}
    assert rows["trpo-kfac"]["base_algo"] == "trpo" and rows["trpo-kfac"]["run_dir"] == "runs/CartPole-v1-trpo-kfac-seed0"
    settings = {name: json.loads((out / row["run_dir"] / "spec.json").read_text()) for name, row in rows.items()}
    hp = {name: s["hyperparameters"] for name, s in settings.items()}
    assert settings["trpo-kfac"]["algo"] == "trpo" and settings["trpo-kfac"]["label"] == "trpo-kfac"
    assert hp["trpo-kfac"]["curvature"] == "kfac" and hp["trpo-kfac"]["cg_damping"] == 0.2
    assert hp["trpo"]["target_kl"] == 0.02 and "curvature" not in hp["trpo"]
    assert hp["trpo-kfac"]["target_kl"] != 0.02  # a name's table is its own
    assert hp["ppo"]["n_epochs"] == 2 and all(h["gamma"] == 0.98 and h["n_steps"] == 32 for h in hp.values())
    config = (out / "runs" / "CartPole-v1-trpo-kfac-seed0" / "config.toml").read_text()
    assert 'curvature = "kfac"' in config
    report = (out / "report.md").read_text()
    assert "| trpo-kfac |" in report and "## Aggregate over environments" in report and "P(row > column)" in report
    assert "[variants.trpo-kfac]" in (out / "experiment.toml").read_text()


@pytest.mark.parametrize(
    ("spec", "args", "message"),
    [
        (VARIANTS, ["--set", "tpro.target_kl=0.02"], "hyperparameter 'tpro' is a field of none of trpo, trpo-kfac, ppo"),
        (VARIANTS, ["--set", "ppo.kl_clip=0.1"], "hyperparameters of ppo: Unknown hyperparameter 'kl_clip' for ppo"),
        (VARIANTS, ["--set", "target_kl=-1"], "hyperparameters of trpo: Invalid target_kl: -1.0; expected > 0"),
        (VARIANTS, ["--set", "trpo"], "Invalid --set 'trpo'; expected key=value"),
        (VARIANTS, ["--algos", "trpo,trpo-cg"], "Unknown algorithm 'trpo-cg' in algos"),
        (VARIANTS.replace('algo = "trpo"', 'algo = "trpx"'), [], "[variants.trpo-kfac] needs algo = one of"),
        (VARIANTS.replace('curvature = "kfac"', 'curvature = "kfc"'), [], "[variants.trpo-kfac]: Invalid curvature: 'kfc'"),
        (VARIANTS.replace("[variants.trpo-kfac]", "[variants.ppo]"), [], "variant 'ppo' has an algorithm's name"),
        ('algos = ["ppo"]\nenvs = ["CartPole-v1"]\nvariants = 3\n', [], "variants must be a table, got 3"),
    ],
)
def test_bad_variants_and_overrides_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], spec: str, args: list[str], message: str
) -> None:
    path = tmp_path / "spec.toml"
    path.write_text(spec)
    assert main(["compare", str(path), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_the_live_display_is_quiet_without_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    from trpo_lab.experiments import runner

    assert not runner._Display(100, 0, 1, enabled=True).live  # pytest captures stdout: not a TTY
    monkeypatch.setattr(runner.sys.stdout, "isatty", lambda: True)
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    display = runner._Display(100, 0, 1, enabled=True)
    if not display.console.is_terminal:
        pytest.skip("rich cannot be made to see a terminal here")
    assert display.live and not display.progress.disable
    assert not runner._Display(100, 0, 1, enabled=False).live  # --quiet

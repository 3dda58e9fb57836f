"""Hyperparameter search (trpo_lab/experiments/tune.py): studies finish, resume, prune and write a usable preset."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

optuna = pytest.importorskip("optuna")

from trpo_lab.config import load_toml  # noqa: E402
from trpo_lab.experiments.tune import (  # noqa: E402
    BUILTIN_SPACES,
    Dimension,
    _Job,
    _objective,
    load_space,
    open_storage,
    parse_space,
    sampled_hyperparameters,
    space_to_dict,
    tune,
)
from trpo_lab.presets import resolve_preset  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"trials": 3, "steps": 1024, "n_envs": 4, "evaluations": 2, "eval_episodes": 2, "verbose": False}
SPACE = {
    "learning_rate": {"low": 1e-4, "high": 3e-3, "log": True},
    "n_epochs": {"low": 1, "high": 4},
    "policy_kwargs": {"net_arch": {"choices": [[16], [32, 32]]}},
}


def test_study_of_3_trials_finishes_and_a_rerun_continues_it(tmp_path: Path) -> None:
    first = tune("ppo", "CartPole-v1", out=tmp_path, space=SPACE, **SMALL)
    assert (first.n_trials, first.new_trials) == (3, 3)
    assert first.n_complete + first.n_pruned == 3 and first.n_failed == 0
    assert (tmp_path / "study.journal").is_file() and first.plot_path.stat().st_size > 10_000

    # best.toml is a preset table that loads as agents/ppo.toml would, with the best trial's values
    table = load_toml(first.preset_path)
    hyperparameters, run = resolve_preset("ppo", "CartPole-v1", table)
    assert run == {"n_envs": 4, "total_timesteps": 1024}
    study = optuna.load_study(study_name="ppo-CartPole-v1", storage=open_storage(str(tmp_path / "study.journal")))
    best = study.best_trial
    assert first.best_value == best.value and first.best_trial == best.number
    assert hyperparameters["learning_rate"] == best.params["learning_rate"]
    assert hyperparameters["n_epochs"] == best.params["n_epochs"]
    assert hyperparameters["policy_kwargs"]["net_arch"] in ([16], [32, 32])
    assert hyperparameters["gae_lambda"] == 0.8, "the env's preset table is kept for unsearched keys"
    # every trial reported one value per evaluation budget to the pruner
    for trial in study.trials:
        assert sorted(trial.intermediate_values) == [1, 2]
        assert trial.user_attrs["eval_budgets"] == [512, 1024]

    second = tune("ppo", "CartPole-v1", out=tmp_path, space=SPACE, **{**SMALL, "trials": 2})
    assert (second.n_trials, second.new_trials) == (5, 2)
    study = optuna.load_study(study_name="ppo-CartPole-v1", storage=open_storage(str(tmp_path / "study.journal")))
    params = [tuple(sorted((k, str(v)) for k, v in t.params.items())) for t in study.trials]
    assert params[3] not in params[:3], "the rerun replayed the first run's random trials"
    with (tmp_path / "trials.csv").open(newline="") as fh:
        assert [int(row["number"]) for row in csv.DictReader(fh)] == [0, 1, 2, 3, 4]

    with pytest.raises(ValueError, match=r"was run with other settings \(steps differ\)"):
        tune("ppo", "CartPole-v1", out=tmp_path, space=SPACE, **{**SMALL, "steps": 2048})


def test_timeout_stops_starting_trials(tmp_path: Path) -> None:
    result = tune("ppo", "CartPole-v1", out=tmp_path, space=SPACE, **{**SMALL, "trials": 50}, timeout=1e-3)
    assert result.new_trials == 1, "Optuna checks the timeout after each trial, so exactly one ran"


class _PruneAtOnce(optuna.trial.FixedTrial):
    """A trial with fixed parameters whose pruner says stop at the first report."""

    def __init__(self, params: dict[str, Any]) -> None:
        super().__init__(params)
        self.reports: list[tuple[float, int]] = []
        self.attrs: dict[str, Any] = {}

    def report(self, value: float, step: int) -> None:
        self.reports.append((value, step))

    def should_prune(self) -> bool:
        return True

    def set_user_attr(self, key: str, value: Any) -> None:
        self.attrs[key] = value


def test_a_pruned_trial_stops_training_at_its_first_evaluation() -> None:
    space = parse_space("ppo", {"n_steps": {"choices": [32]}})
    job = _Job(algo="ppo", env_id="CartPole-v1", storage="unused.journal", study_name="s", space=space,
               fixed={"n_epochs": 1}, n_envs=2, vectorization="sync", steps=2048, evaluations=4, eval_episodes=1,
               seed=0, verbose=False)
    trial = _PruneAtOnce({"n_steps": 32})
    with pytest.raises(optuna.TrialPruned, match="evaluation 1 of 4"):
        _objective(job, trial)  # type: ignore[arg-type]
    assert [step for _, step in trial.reports] == [1]
    assert 512 <= trial.attrs["timesteps"] < 512 + 64, "training went on after the pruner said stop"


def test_dimensions_sample_what_they_say() -> None:
    space = parse_space("trpo", {
        "n_steps": {"low": 8, "high": 64, "step": 8},
        "learning_rate": {"low": 1e-5, "high": 1e-2, "log": True},
        "gamma": {"choices": [0.9, 0.99]},
        "policy_kwargs": {"net_arch": {"choices": [[8], {"pi": [8], "vf": [16]}]}},
    })
    assert space["n_steps"].is_int and not space["learning_rate"].is_int and space["policy_kwargs.net_arch"].encoded
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = []
    for _ in range(20):
        trial = study.ask()
        values = {name: dim.suggest(trial) for name, dim in space.items()}
        assert values["n_steps"] in range(8, 65, 8) and 1e-5 <= values["learning_rate"] <= 1e-2
        assert values["gamma"] in (0.9, 0.99)
        seen.append(values["policy_kwargs.net_arch"])
        assert sampled_hyperparameters(space, trial.params)["policy_kwargs"]["net_arch"] == values["policy_kwargs.net_arch"]
        study.tell(trial, 0.0)
    assert [8] in seen and {"pi": [8], "vf": [16]} in seen
    assert Dimension(name="x", low=1, high=2).is_int and not Dimension(name="x", low=1, high=2.0).is_int


@pytest.mark.parametrize("algo", sorted(BUILTIN_SPACES))
def test_builtin_spaces_equal_the_toml_files(algo: str) -> None:
    space, origin = load_space(algo)
    assert origin == str(ROOT / "agents" / "tune" / f"{algo}.toml")
    assert space_to_dict(space) == space_to_dict(parse_space(algo, BUILTIN_SPACES[algo]))


@pytest.mark.slow
def test_cli_two_workers_share_one_rdb_study(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    space = tmp_path / "space.toml"
    space.write_text("learning_rate = { low = 1e-4, high = 3e-3, log = true }\n")
    command = [sys.executable, "-m", "trpo_lab", "tune", "ppo", "CartPole-v1", "--trials", "2", "--workers", "2",
               "--steps", "512", "--n-envs", "2", "--evaluations", "1", "--eval-episodes", "1", "--storage", url,
               "--study", "shared", "--space", str(space), "--out", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "on 2 worker(s)" in result.stdout and "['CartPole-v1']" not in result.stdout
    study = optuna.load_study(study_name="shared", storage=url)
    assert len(study.trials) == 2 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert (tmp_path / "out" / "best.toml").is_file() and not (tmp_path / "out" / "study.journal").exists()

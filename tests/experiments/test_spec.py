"""trpo_lab.experiments.spec: experiment specs, their validation, command-line overrides, the grid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from trpo_lab.config import load_toml
from trpo_lab.experiments import experiment_from_dict, load_experiment

ROOT = Path(__file__).resolve().parents[2]


def test_command_line_overrides_reshape_the_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRPO_LAB_PRESETS", str(ROOT))
    experiment = load_experiment(None).with_overrides(algos=["PPO", "npg"], envs=["Acrobot-v1"], seeds=2, steps=1234)
    runs = experiment.runs("out")
    assert [(r.algo, r.env_id, r.seed) for r in runs] == [
        ("ppo", "Acrobot-v1", 0), ("ppo", "Acrobot-v1", 1), ("npg", "Acrobot-v1", 0), ("npg", "Acrobot-v1", 1)
    ]
    assert {r.total_timesteps for r in runs} == {1234}
    # Acrobot's settings come from its suite entry (envs/classic.toml), the agent tables on top
    ppo = runs[0]
    assert ppo.hyperparameters["normalize_obs"] is True and ppo.n_envs == 16
    assert ppo.run_dir == Path("out/runs/Acrobot-v1-ppo-seed0")
    assert ppo.key == "Acrobot-v1-ppo-seed0"
    assert "run_dir" not in ppo.settings() and ppo.settings()["total_timesteps"] == 1234


def test_a_list_of_seeds_replaces_the_specs_in_its_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRPO_LAB_PRESETS", str(ROOT))
    spec = {"algos": ["trpo"], "envs": ["CartPole-v1"], "seeds": [10, 11, 12]}
    experiment = experiment_from_dict(spec, name="x", origin="test")
    assert [r.seed for r in experiment.with_overrides(seeds=[15, 12]).runs("out")] == [15, 12]
    assert [r.seed for r in experiment.with_overrides(seeds=2).runs("out")] == [0, 1]  # a count: 0..N-1
    for bad in ([], [3, 3], [-1], [1.5]):
        with pytest.raises(ValueError, match=r"Invalid --seeds: .*; expected distinct integers >= 0"):
            experiment.with_overrides(seeds=bad)  # type: ignore[arg-type]


def test_budgets_come_from_the_experiment_then_the_suite(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRPO_LAB_PRESETS", str(ROOT))
    spec = {"algos": ["trpo"], "suite": "classic", "envs": ["CartPole-v1", "Pendulum-v1"],
            "steps": {"CartPole-v1": 777}, "seeds": [5, 9]}
    experiment = experiment_from_dict(spec, name="x", origin="test")
    assert experiment.steps == {"CartPole-v1": 777, "Pendulum-v1": 200_000}
    assert experiment.seeds == [5, 9]
    with pytest.raises(ValueError, match="not in suite"):
        experiment_from_dict({**spec, "envs": ["Hopper-v5"]}, name="x", origin="test")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"steps": 0}, "steps for CartPole-v1 is 0; expected an integer >= 1"),
        ({"steps": {"CartPole-v1": True}}, "steps for CartPole-v1 is True; expected an integer >= 1"),
        ({"steps": {"Acrobot-v1": 5}}, "steps given for ['Acrobot-v1'], which it does not run"),
        ({"eval_episodes": 0}, "eval_episodes 0; expected an integer >= 1"),
        ({"workers": 1.5}, "workers 1.5; expected an integer >= 1"),
        ({"seeds": [1, 1]}, "seeds [1, 1]; expected distinct integers"),
        ({"seeds": True}, "seeds True; expected a count or a list of integers"),
        ({"algos": ["ppo", "PPO"]}, "has duplicates"),
        ({"algos": []}, "algos is empty"),
    ],
)
def test_bad_values_are_refused_naming_the_key_and_the_value(changes: dict[str, Any], message: str) -> None:
    spec = {"algos": ["ppo"], "envs": ["CartPole-v1"], **changes}
    with pytest.raises(ValueError) as error:
        experiment_from_dict(spec, name="x", origin="test")
    assert str(error.value).startswith("Invalid experiment test: ") and message in str(error.value)


def test_the_resolved_spec_round_trips_through_toml(tmp_path: Path) -> None:
    experiment = experiment_from_dict(
        {"algos": ["ppo", "trpo"], "envs": ["CartPole-v1"], "seeds": [3, 4], "steps": 900, "eval_episodes": 2,
         "description": "round trip"},
        name="x", origin="test",
    )
    path = tmp_path / "resolved.toml"
    path.write_text(experiment.to_toml())
    again = load_experiment(path)
    assert (again.algos, again.seeds, again.steps, again.eval_episodes, again.description) == (
        experiment.algos, experiment.seeds, experiment.steps, experiment.eval_episodes, experiment.description
    )


def test_variants_and_overrides_layer_most_specific_last(tmp_path: Path) -> None:
    data = {
        "algos": ["ppo", "ppo-small", "acktr"],
        "envs": ["CartPole-v1"],
        "seeds": 1,
        "hyperparameters": {"gamma": 0.97, "clip_range_vf": 0.5, "ppo-small": {"gamma": 0.95}},
        "variants": {"ppo-small": {"algo": "ppo", "n_epochs": 3, "gamma": 0.9, "learning_rate": "linear"}},
    }
    experiment = experiment_from_dict(data, name="v", origin="test").with_overrides(
        hyperparameters={"ppo-small": {"n_epochs": 4}, "ent_coef": 0.01}
    )
    runs = {r.name: r for r in experiment.runs(tmp_path)}
    assert [r.key for r in runs.values()] == ["CartPole-v1-ppo-seed0", "CartPole-v1-ppo-small-seed0",
                                              "CartPole-v1-acktr-seed0"]
    small, ppo, acktr = runs["ppo-small"].hyperparameters, runs["ppo"].hyperparameters, runs["acktr"].hyperparameters
    assert runs["ppo-small"].algo == "ppo" and runs["ppo-small"].run_dir == tmp_path / "runs" / "CartPole-v1-ppo-small-seed0"
    # preset < variant < shared keys < the name's table < --set
    assert small["gamma"] == 0.95 and small["n_epochs"] == 4 and small["ent_coef"] == 0.01
    assert small["learning_rate"] == "linear:0.001:0.0"  # "linear" starts where the preset's schedule starts
    assert ppo["gamma"] == 0.97 and ppo["clip_range_vf"] == 0.5 and ppo["n_epochs"] == 20  # the CartPole preset's
    assert acktr["gamma"] == 0.97 and "clip_range_vf" not in acktr  # ACKTR has no clip_range_vf: not applied
    assert "label" not in runs["ppo"].settings() and runs["ppo-small"].settings()["label"] == "ppo-small"
    (tmp_path / "resolved.toml").write_text(experiment.to_toml())
    data = load_toml(tmp_path / "resolved.toml")
    again = experiment_from_dict({k: v for k, v in data.items() if k != "steps"}, name="v", origin="round trip")
    assert again.variants == experiment.variants and again.hyperparameters == experiment.hyperparameters


def test_a_variant_sets_the_run_settings_n_envs_and_vectorization(tmp_path: Path) -> None:
    variants = {"ppo-wide": {"algo": "ppo", "n_envs": 16, "vectorization": "async", "n_steps": 64}}
    experiment = experiment_from_dict({"algos": ["ppo", "ppo-wide"], "envs": ["CartPole-v1"], "seeds": 1,
                                       "variants": variants}, name="v", origin="test")
    runs = {r.name: r for r in experiment.runs(tmp_path)}
    assert (runs["ppo"].n_envs, runs["ppo"].vectorization) == (8, "sync")  # the CartPole preset's
    assert (runs["ppo-wide"].n_envs, runs["ppo-wide"].vectorization) == (16, "async")
    wide = runs["ppo-wide"].hyperparameters
    assert wide["n_steps"] == 64 and "n_envs" not in wide and "vectorization" not in wide  # run settings, not fields
    assert runs["ppo-wide"].settings()["n_envs"] == 16  # in spec.json: a resume with other settings is refused
    for bad, message in ((0, "Invalid n_envs: 0; expected an integer >= 1"),
                         (2.0, "Invalid n_envs: 2.0; expected an integer >= 1"),
                         ("threads", "Invalid vectorization: 'threads'; expected one of sync, async, vector_entry_point")):
        key = "vectorization" if isinstance(bad, str) else "n_envs"
        with pytest.raises(ValueError) as error:
            experiment_from_dict({"algos": ["ppo-x"], "envs": ["CartPole-v1"],
                                  "variants": {"ppo-x": {"algo": "ppo", key: bad}}}, name="v", origin="test")
        assert str(error.value) == f"Invalid experiment test: [variants.ppo-x]: {message}"

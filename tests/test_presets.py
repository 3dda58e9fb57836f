"""The preset zoo (agents/, envs/, experiments/) and the built-in defaults that mirror part of it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from trpo_lab.config import CONFIGS, config_class, load_toml
from trpo_lab.experiments import load_experiment
from trpo_lab.presets import (
    BUILTIN_AGENTS,
    BUILTIN_EXPERIMENTS,
    BUILTIN_SUITES,
    RUN_KEYS,
    SUITE_KEYS,
    load_preset,
    load_suite,
    resolve_preset,
)

ROOT = Path(__file__).resolve().parent.parent
AGENT_FILES = sorted((ROOT / "agents").glob("*.toml"))
SUITE_FILES = sorted((ROOT / "envs").glob("*.toml"))
EXPERIMENT_FILES = sorted((ROOT / "experiments").glob("*.toml"))


@pytest.fixture(autouse=True)
def _checkout_presets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read the checkout's folders whatever the current directory holds."""
    monkeypatch.setenv("TRPO_LAB_PRESETS", str(ROOT))


def test_the_zoo_is_there() -> None:
    assert {p.stem for p in AGENT_FILES} >= {"trpo", "npg", "ppo"}
    assert {p.stem for p in SUITE_FILES} >= {"classic", "mujoco"}
    assert {p.stem for p in EXPERIMENT_FILES} >= {"default", "classic"}


@pytest.mark.parametrize("path", AGENT_FILES, ids=lambda p: p.name)
def test_every_agent_preset_key_is_a_real_hyperparameter(path: Path) -> None:
    data = load_toml(path)
    cls = config_class(path.stem)
    assert "default" in data, f"{path} has no [default] table"
    allowed = set(cls.field_names()) | set(RUN_KEYS)
    for table_name, table in data.items():
        assert isinstance(table, dict), f"{path}: [{table_name}] is not a table"
        if table_name != "default":
            assert table_name in gym.registry, f"{path}: [{table_name}] is not a registered env id"
        unknown = set(table) - allowed
        assert not unknown, f"{path} [{table_name}]: {sorted(unknown)} are not {cls.__name__} fields or run keys"
        # every table, layered on the defaults, builds a valid config
        hyperparameters, run = load_preset(path.stem, None if table_name == "default" else table_name)
        cls.from_dict(hyperparameters)
        assert set(run) <= set(RUN_KEYS)


@pytest.mark.parametrize("algo", ["trpo", "npg", "ppo"])
def test_my_agent_presets_cover_every_suite_env(algo: str) -> None:
    data = load_toml(ROOT / "agents" / f"{algo}.toml")
    for suite in ("classic", "mujoco"):
        for env_id in load_suite(suite)[0]:
            assert env_id in data, f"agents/{algo}.toml has no table for {env_id}"


@pytest.mark.parametrize("path", SUITE_FILES, ids=lambda p: p.name)
def test_every_suite_env_is_registered_and_keys_are_known(path: Path) -> None:
    data = load_toml(path)
    assert data, f"{path} lists no environments"
    for env_id, entry in data.items():
        assert env_id in gym.registry, f"{path}: {env_id} is not a registered Gymnasium id"
        assert set(entry) <= set(SUITE_KEYS), f"{path} [{env_id}]: unknown keys {set(entry) - set(SUITE_KEYS)}"
        assert isinstance(entry.get("total_timesteps"), int) and entry["total_timesteps"] > 0
        assert isinstance(entry.get("n_envs"), int) and entry["n_envs"] > 0
        for flag in ("normalize_obs", "normalize_reward"):
            assert isinstance(entry.get(flag), bool), f"{path} [{env_id}]: {flag} must be set"
    load_suite(path.stem)


def test_suites_hold_what_the_issue_asks_for() -> None:
    assert list(load_suite("classic")[0]) == ["CartPole-v1", "Acrobot-v1", "Pendulum-v1", "MountainCarContinuous-v0"]
    assert set(load_suite("mujoco")[0]) == {"HalfCheetah-v5", "Hopper-v5", "Walker2d-v5", "Swimmer-v5",
                                             "InvertedPendulum-v5"}


@pytest.mark.parametrize("path", EXPERIMENT_FILES, ids=lambda p: p.name)
def test_every_experiment_references_existing_presets_and_suites(path: Path) -> None:
    data = load_toml(path)
    experiment = load_experiment(path)  # validates algos, the suite, env ids and budgets
    if "suite" in data:
        assert (ROOT / "envs" / f"{data['suite']}.toml").is_file()
    for algo in experiment.algos:
        assert algo in CONFIGS
        assert (ROOT / "agents" / f"{algo}.toml").is_file(), f"{path} uses {algo}, which has no agents/{algo}.toml"
    runs = experiment.runs(Path("unused"))
    assert len(runs) == len(experiment.algos) * len(experiment.envs) * len(experiment.seeds)


def test_builtin_default_experiment_equals_experiments_default_toml() -> None:
    from_file = load_experiment(ROOT / "experiments" / "default.toml")
    builtin = BUILTIN_EXPERIMENTS["default"]
    assert load_toml(ROOT / "experiments" / "default.toml") == builtin
    assert from_file.algos == ["trpo", "acktr", "ppo"]
    assert list(from_file.envs) == ["CartPole-v1", "Acrobot-v1", "Pendulum-v1"]
    assert from_file.seeds == [0, 1, 2, 3, 4]
    # the presets' full budgets (the suite's)
    assert from_file.steps == {"CartPole-v1": 100_000, "Acrobot-v1": 200_000, "Pendulum-v1": 200_000}


def test_builtin_suites_agree_with_the_suite_files() -> None:
    for name, suite in BUILTIN_SUITES.items():
        from_file, _ = load_suite(name)
        for env_id, entry in suite.items():
            assert from_file[env_id] == entry, f"built-in suite {name} [{env_id}] differs from envs/{name}.toml"


@pytest.mark.parametrize("algo", sorted(BUILTIN_AGENTS))
def test_builtin_agent_presets_agree_with_the_toml_files(algo: str) -> None:
    """Where both exist, the resolved built-in preset equals the resolved TOML preset."""
    path = ROOT / "agents" / f"{algo}.toml"
    if not path.is_file():
        pytest.skip(f"agents/{algo}.toml is not in this checkout")
    tables = load_toml(path)
    default_envs = list(BUILTIN_EXPERIMENTS["default"]["envs"])
    for env_id in default_envs:
        suite = BUILTIN_SUITES["classic"][env_id]
        file_hp, file_run = resolve_preset(algo, env_id, tables, suite)
        builtin_hp, builtin_run = resolve_preset(algo, env_id, BUILTIN_AGENTS[algo], suite)
        cls = config_class(algo)
        assert cls.from_dict(builtin_hp) == cls.from_dict(file_hp), (
            f"built-in {algo} hyperparameters for {env_id} differ from {path.name}"
        )
        assert builtin_run == file_run, f"built-in {algo} run settings for {env_id} differ from {path.name}"


def test_builtins_alone_run_the_default_compare(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With no preset folders at all (a plain pip install) the default experiment resolves."""
    import trpo_lab.presets as presets

    monkeypatch.setattr(presets, "preset_dirs", lambda kind="agents": [])
    experiment = load_experiment(None)
    runs = experiment.runs(tmp_path)
    assert {(r.algo, r.env_id) for r in runs} == {
        (a, e) for a in ("trpo", "acktr", "ppo") for e in ("CartPole-v1", "Acrobot-v1", "Pendulum-v1")
    }
    trpo_cartpole = next(r for r in runs if (r.algo, r.env_id) == ("trpo", "CartPole-v1"))
    assert trpo_cartpole.hyperparameters["cg_max_steps"] == 10


def test_preset_typos_fail_loudly_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "agents").mkdir()
    (tmp_path / "agents" / "ppo.toml").write_text('[default]\nn_epoch = 3\n')
    monkeypatch.setenv("TRPO_LAB_PRESETS", str(tmp_path))
    with pytest.raises(ValueError, match=r"ppo\.toml.*n_epoch.*n_epochs"):
        load_preset("ppo", "CartPole-v1")


def test_layering_default_then_suite_then_env_table() -> None:
    tables = {"default": {"n_envs": 8, "gamma": 0.9, "normalize_obs": False}, "Hopper-v5": {"gamma": 0.95}}
    suite = {"n_envs": 1, "normalize_obs": True, "total_timesteps": 1000}
    hyperparameters, run = resolve_preset("ppo", "Hopper-v5", tables, suite)
    assert hyperparameters == {"gamma": 0.95, "normalize_obs": True}
    assert run == {"n_envs": 1, "total_timesteps": 1000}


def test_unreadable_toml_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("algos = [\n")
    with pytest.raises(ValueError, match="bad.toml"):
        load_experiment(bad)


# --- the config dataclasses behind every preset are frozen ------------------------------------


@pytest.mark.parametrize("algo", sorted(CONFIGS))
def test_configs_are_frozen_and_replace_returns_a_validated_copy(algo: str) -> None:
    config = CONFIGS[algo]()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.gamma = 0.5  # type: ignore[misc]
    changed = config.replace(gamma=0.9, n_steps=np.int64(32))
    assert changed is not config and changed.gamma == 0.9 and config.gamma != 0.9
    assert type(changed.n_steps) is int and changed.n_steps == 32  # numpy integers coerced
    assert type(changed).from_dict(changed.to_dict()) == changed
    with pytest.raises(ValueError, match=r"Invalid gamma: 1.5; expected in \(0, 1\]"):
        config.replace(gamma=1.5)
    with pytest.raises(ValueError, match=r"Invalid n_steps: 1.5 \(float\); expected an integer"):
        config.replace(n_steps=1.5)


@pytest.mark.parametrize("algo", sorted(CONFIGS))
def test_from_preset_builds_what_trpo_lab_train_builds(algo: str) -> None:
    """``ALGO.from_preset(env)`` gets the CLI's hyperparameters, n_envs and budget."""
    from trpo_lab.agents import agent_class
    from trpo_lab.cli import _settings, build_parser

    for env_id in ("CartPole-v1", "Pendulum-v1"):
        args = build_parser().parse_args(["train", algo, env_id, "--set", "gamma=0.97"])
        hyperparameters, run, n_envs, steps = _settings(args)
        agent = agent_class(algo).from_preset(env_id, seed=3, gamma=0.97)
        try:
            assert agent.config == config_class(algo).from_dict(hyperparameters)
            assert agent.config.gamma == 0.97
            assert agent.n_envs == n_envs and agent.seed == 3
            assert agent.preset_timesteps == steps == run["total_timesteps"]
        finally:
            agent.env.close()


def test_from_preset_merges_policy_kwargs_and_covers_unlisted_envs() -> None:
    from trpo_lab.agents.trpo import TRPO

    agent = TRPO.from_preset("Acrobot-v1", n_envs=2, policy_kwargs={"net_arch": {"pi": [16], "vf": [16]}})
    hyperparameters, _ = load_preset("trpo", "Acrobot-v1")
    assert agent.config.policy_kwargs["net_arch"] == {"pi": [16], "vf": [16]}
    assert agent.config.n_steps == hyperparameters["n_steps"] and agent.n_envs == 2
    agent.env.close()


@pytest.mark.parametrize(
    ("env_id", "overrides", "message"),
    [
        ("CartPol-v1", {}, r"Unknown environment id 'CartPol-v1'; did you mean CartPole-v1"),
        ("CartPole-v1", {"gamma": 2.0}, r"Invalid gamma: 2.0"),
        ("CartPole-v1", {"gama": 0.9}, r"Unknown hyperparameter 'gama' for trpo"),
    ],
)
def test_from_preset_bad_input_is_named(env_id: str, overrides: dict[str, object], message: str) -> None:
    from trpo_lab.agents.trpo import TRPO

    with pytest.raises(ValueError, match=message):
        TRPO.from_preset(env_id, **overrides)

"""Presets: agent hyperparameters, environment suites and experiment specs, as TOML.

Three kinds of file live in top-level folders of a checkout (the zoo):

``agents/<algo>.toml``
    A ``[default]`` table and one table per environment id (``["CartPole-v1"]``) of the
    algorithm's config-dataclass fields, plus the run keys ``n_envs``,
    ``total_timesteps`` (the budget the preset was tuned for) and ``vectorization``.
``envs/<suite>.toml``
    One table per environment id with what the environment needs whatever the agent:
    ``total_timesteps`` (the suite's budget), ``n_envs``, ``normalize_obs``,
    ``normalize_reward`` and ``vectorization``.
``experiments/<name>.toml``
    Agents x env suite x seeds x budget, read by :mod:`trpo_lab.experiments`.

The settings of ``algo`` on ``env`` are layered: the dataclass defaults, then the agent's
``[default]`` table, then the env's suite entry, then the agent's table for that env
(most specific wins).

The folders are found, in order, under ``$TRPO_LAB_PRESETS``, the current directory and
the source checkout; for each file the first match wins.  With no file, the small
built-in tables below apply: exactly what ``trpo-lab compare`` without arguments needs, so
a plain ``pip install`` works.  ``tests/test_presets.py`` checks that they agree with the
TOML files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trpo_lab.config import config_class, load_toml, merge_hyperparameters

__all__ = [
    "BUILTIN_AGENTS",
    "BUILTIN_SUITES",
    "BUILTIN_EXPERIMENTS",
    "RUN_KEYS",
    "SUITE_KEYS",
    "preset_dirs",
    "preset_file",
    "agent_tables",
    "load_preset",
    "agent_settings",
    "resolve_preset",
    "load_suite",
    "suite_entry",
    "suite_names",
    "experiment_names",
]

RUN_KEYS = ("n_envs", "total_timesteps", "vectorization")
SUITE_KEYS = ("n_envs", "total_timesteps", "vectorization", "normalize_obs", "normalize_reward")

# What `trpo-lab compare` needs with no files: TRPO, ACKTR and PPO on CartPole-v1,
# Acrobot-v1 and Pendulum-v1.  Each table equals the resolved TOML preset (tests/test_presets.py).
BUILTIN_AGENTS: dict[str, dict[str, dict[str, Any]]] = {
    "trpo": {
        "default": {
            "n_envs": 8, "n_steps": 256, "batch_size": 256, "n_critic_updates": 10, "cg_max_steps": 15,
            "target_kl": 0.01, "gae_lambda": 0.95, "gamma": 0.99,
        },
        "CartPole-v1": {"total_timesteps": 100_000, "cg_max_steps": 10, "n_critic_updates": 10, "gae_lambda": 0.98},
        "Acrobot-v1": {"n_critic_updates": 20},
        "Pendulum-v1": {
            "total_timesteps": 200_000, "n_steps": 128, "batch_size": 128, "gamma": 0.9, "n_critic_updates": 20,
            "target_kl": 0.02,
        },
    },
    "ppo": {
        "default": {"n_envs": 8},
        "CartPole-v1": {
            "total_timesteps": 100_000, "n_steps": 32, "batch_size": 256, "gae_lambda": 0.8, "gamma": 0.98,
            "n_epochs": 20, "learning_rate": "linear:0.001:0", "clip_range": "linear:0.2:0",
        },
        "Acrobot-v1": {"n_envs": 16, "n_steps": 256, "gae_lambda": 0.94, "n_epochs": 4},
        "Pendulum-v1": {"n_steps": 256, "batch_size": 256, "gamma": 0.9, "n_epochs": 10, "learning_rate": 1e-3},
    },
    "acktr": {
        "default": {
            "n_envs": 8, "n_steps": 20, "learning_rate": 0.25, "kl_clip": 0.001, "vf_kl_clip": 0.1, "damping": 0.01,
            "momentum": 0.9, "stat_decay": 0.99, "inverse_every": 10, "gamma": 0.99, "gae_lambda": 1.0,
            "ent_coef": 0.0, "vf_coef": 0.5, "max_grad_norm": 0.5,
        },
        "CartPole-v1": {"total_timesteps": 100_000, "n_steps": 32, "learning_rate": "linear"},
        "Acrobot-v1": {
            "total_timesteps": 200_000, "n_steps": 64, "ent_coef": 0.01, "gae_lambda": 0.95, "normalize_advantage": True,
            "normalize_obs": True,
        },
        "Pendulum-v1": {
            "total_timesteps": 200_000, "n_steps": 64, "gamma": 0.9, "gae_lambda": 0.95, "normalize_advantage": True,
            "normalize_obs": True, "normalize_reward": True, "learning_rate": 0.03, "kl_clip": 0.01, "target_kl": 0.002,
        },
    },
}

BUILTIN_SUITES: dict[str, dict[str, dict[str, Any]]] = {
    "classic": {
        "CartPole-v1": {"total_timesteps": 100_000, "n_envs": 8, "normalize_obs": False, "normalize_reward": False},
        "Acrobot-v1": {"total_timesteps": 200_000, "n_envs": 8, "normalize_obs": True, "normalize_reward": False},
        "Pendulum-v1": {"total_timesteps": 200_000, "n_envs": 8, "normalize_obs": False, "normalize_reward": False},
    },
}

BUILTIN_EXPERIMENTS: dict[str, dict[str, Any]] = {
    "default": {
        "description": (
            "TRPO vs ACKTR vs PPO on CartPole-v1 (100k steps), Acrobot-v1 and Pendulum-v1 (200k steps each), "
            "5 seeds each, at the budgets the presets were tuned for"
        ),
        "algos": ["trpo", "acktr", "ppo"],
        "suite": "classic",
        "envs": ["CartPole-v1", "Acrobot-v1", "Pendulum-v1"],
        "seeds": 5,
        "eval_episodes": 10,
        "workers": 2,
    },
}


def preset_dirs(kind: str = "agents") -> list[Path]:
    """Folders searched for ``<kind>/*.toml`` (first match wins per file)."""
    dirs: list[Path] = []
    env_dir = os.environ.get("TRPO_LAB_PRESETS")
    if env_dir:
        dirs.append(Path(env_dir) / kind)
    dirs.append(Path.cwd() / kind)
    dirs.append(Path(__file__).resolve().parent.parent / kind)
    return [d for d in dirs if d.is_dir()]


def preset_file(kind: str, name: str) -> Path | None:
    """The first ``<kind>/<name>.toml`` in :func:`preset_dirs`, or ``None``."""
    for folder in preset_dirs(kind):
        path = folder / f"{name}.toml"
        if path.is_file():
            return path
    return None


def _names(kind: str, builtin: Mapping[str, Any]) -> list[str]:
    names = set(builtin)
    for folder in preset_dirs(kind):
        names.update(path.stem for path in folder.glob("*.toml"))
    return sorted(names)


def suite_names() -> list[str]:
    """Every env suite available (files and built-ins)."""
    return _names("envs", BUILTIN_SUITES)


def experiment_names() -> list[str]:
    """Every experiment spec available by name (files and built-ins)."""
    return _names("experiments", BUILTIN_EXPERIMENTS)


def _tables(data: Mapping[str, Any], origin: str) -> dict[str, dict[str, Any]]:
    for name, table in data.items():
        if not isinstance(table, Mapping):
            raise ValueError(f"Invalid preset {origin}: [{name}] must be a table, got {table!r}")
    return {name: dict(table) for name, table in data.items()}


def agent_tables(algo: str) -> tuple[dict[str, dict[str, Any]], str]:
    """``(tables, origin)`` of an algorithm's presets: its TOML file, else the built-in tables."""
    config_class(algo)  # unknown algorithm -> ValueError
    key = algo.lower()
    path = preset_file("agents", key)
    if path is not None:
        return _tables(load_toml(path), str(path)), str(path)
    return _tables(BUILTIN_AGENTS.get(key, {}), f"built-in presets of {key}"), f"built-in presets of {key}"


def load_suite(name: str) -> tuple[dict[str, dict[str, Any]], str]:
    """``(env id -> settings, origin)`` of an env suite: ``envs/<name>.toml``, else a built-in one.

    Raises:
        ValueError: unknown suite, unreadable file, unknown env id or key.
    """
    path = preset_file("envs", name)
    if path is not None:
        data, origin = load_toml(path), str(path)
    elif name in BUILTIN_SUITES:
        data, origin = BUILTIN_SUITES[name], f"built-in suite {name!r}"
    else:
        raise ValueError(f"Unknown env suite {name!r}; expected one of {', '.join(suite_names()) or 'none'}")
    suite = _tables(data, origin)
    from trpo_lab.envs import check_env_id

    for env_id, entry in suite.items():
        try:
            check_env_id(env_id)
        except ValueError as exc:
            raise ValueError(f"Invalid env suite {origin}: {exc}") from exc
        unknown = sorted(set(entry) - set(SUITE_KEYS))
        if unknown:
            raise ValueError(
                f"Invalid env suite {origin}: [{env_id}] has unknown key(s) {unknown}; expected some of {list(SUITE_KEYS)}"
            )
    return suite, origin


def suite_entry(env_id: str) -> dict[str, Any]:
    """The settings of ``env_id`` in the first suite (by name) that lists it; ``{}`` if none does."""
    for name in suite_names():
        suite, _ = load_suite(name)
        if env_id in suite:
            return dict(suite[env_id])
    return {}


def resolve_preset(
    algo: str,
    env_id: str | None,
    tables: Mapping[str, Mapping[str, Any]],
    suite: Mapping[str, Any] | None = None,
    origin: str = "preset",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Layer ``[default]``, the suite entry and ``[env_id]`` into ``(hyperparameters, run settings)``.

    Raises:
        ValueError: a key that is neither a field of the algorithm's config nor a run key, or
            a value the config rejects; the message names ``origin``.
    """
    cls = config_class(algo)
    merged: dict[str, Any] = {}
    layers = [tables.get("default", {}), suite or {}, tables.get(env_id, {}) if env_id is not None else {}]
    for layer in layers:
        merged = merge_hyperparameters(merged, layer)
    run = {k: merged.pop(k) for k in RUN_KEYS if k in merged}
    try:
        cls.from_dict(merged)
    except ValueError as exc:
        raise ValueError(f"Invalid preset {origin} for {env_id}: {exc}") from exc
    return merged, run


def load_preset(
    algo: str, env_id: str | None, suite: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(hyperparameters, run_settings)`` for ``algo`` on ``env_id``.

    Args:
        algo: Algorithm name (``trpo``, ``npg``, ``acktr``, ``ppo``).
        env_id: Environment id, or ``None`` for the ``[default]`` table alone.
        suite: The env's suite entry; by default the first suite that lists ``env_id``.

    ``run_settings`` holds the non-hyperparameter keys (``n_envs``, ``total_timesteps``,
    ``vectorization``).  Every hyperparameter key is validated against the algorithm's
    config dataclass, so a typo in a preset fails loudly, naming the file.
    """
    tables, origin = agent_tables(algo)
    if suite is None and env_id is not None:
        suite = suite_entry(env_id)
    return resolve_preset(algo, env_id, tables, suite, origin)


def agent_settings(
    algo: str, env_id: str, overrides: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(hyperparameters, run_settings)`` of ``trpo-lab train ALGO ENV [--set ...]``.

    :func:`load_preset`, then ``overrides`` on top (``--set`` in the CLI, keyword arguments
    of :meth:`OnPolicyAgent.from_preset`) through :func:`~trpo_lab.config.merge_hyperparameters`. The CLI and the Python API both
    build their agents from this, so they run with the same settings.

    Raises:
        ValueError: an invalid preset (naming its file), or an override that is not a field
            of the algorithm's config or that the config rejects.
    """
    hyperparameters, run = load_preset(algo, env_id)
    hyperparameters = merge_hyperparameters(hyperparameters, overrides or {})
    config_class(algo).from_dict(hyperparameters)
    return hyperparameters, run

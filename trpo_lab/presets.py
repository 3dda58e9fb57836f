"""Hyperparameter presets: the top-level ``agents/<algo>.toml`` files.

A preset file has a ``[default]`` table and one table per environment id
(``["CartPole-v1"]``); the hyperparameters for an env are the config dataclass's
defaults, updated by ``default``, then by the env's table.  Special keys that are
not hyperparameters: ``n_envs`` and ``total_timesteps`` (the budget the preset was
tuned for).  The folder is found, in order, from ``$TRPO_LAB_PRESETS``, the current
directory's ``agents/`` and the ``agents/`` folder of a source checkout; with none of
them, the dataclass defaults apply, so a plain ``pip install`` still works.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from trpo_lab.config import config_class, load_toml

__all__ = ["preset_dirs", "load_preset", "RUN_KEYS"]

RUN_KEYS = ("n_envs", "total_timesteps", "vectorization")


def preset_dirs(kind: str = "agents") -> list[Path]:
    """Folders searched for ``<kind>/*.toml`` (first match wins per file)."""
    dirs: list[Path] = []
    env_dir = os.environ.get("TRPO_LAB_PRESETS")
    if env_dir:
        dirs.append(Path(env_dir) / kind)
    dirs.append(Path.cwd() / kind)
    dirs.append(Path(__file__).resolve().parent.parent / kind)
    return [d for d in dirs if d.is_dir()]


def _preset_file(algo: str) -> Path | None:
    for folder in preset_dirs("agents"):
        path = folder / f"{algo.lower()}.toml"
        if path.is_file():
            return path
    return None


def load_preset(algo: str, env_id: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(hyperparameters, run_settings)`` for ``algo`` on ``env_id`` from its preset file.

    ``run_settings`` holds the non-hyperparameter keys (``n_envs``, ``total_timesteps``,
    ``vectorization``).  Every hyperparameter key is validated against the algorithm's
    config dataclass, so a typo in a preset fails loudly, naming the file.
    """
    cls = config_class(algo)
    path = _preset_file(algo)
    if path is None:
        return {}, {}
    data = load_toml(path)
    merged: dict[str, Any] = {}
    for table_name in ("default", env_id):
        if table_name is None:
            continue
        table = data.get(table_name, {})
        if not isinstance(table, dict):
            raise ValueError(f"Invalid preset {path}: [{table_name}] must be a table")
        for key, value in table.items():
            if key == "policy_kwargs" and isinstance(value, dict):
                merged.setdefault("policy_kwargs", {}).update(value)
            else:
                merged[key] = value
    run = {k: merged.pop(k) for k in RUN_KEYS if k in merged}
    try:
        cls.from_dict(merged)
    except ValueError as exc:
        raise ValueError(f"Invalid preset {path} for {env_id}: {exc}") from exc
    return merged, run

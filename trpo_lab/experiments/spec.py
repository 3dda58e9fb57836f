"""Experiment specs: the TOML file of a compare, validated, and the grid of runs it asks for.

An experiment spec has the keys::

    description = "..."                  # optional, shown in the report
    algos = ["trpo", "acktr", "ppo"]
    suite = "classic"                    # envs/classic.toml: per-env budget, n_envs, normalization
    envs = ["CartPole-v1"]               # optional subset of the suite (default: all of it)
    seeds = 3                            # or a list of seeds, e.g. [0, 1, 2]
    steps = 50000                        # optional budget for every env, or a table per env id
    eval_episodes = 10                   # deterministic evaluation episodes per final agent
    workers = 2                          # optional default for --workers

    [hyperparameters]                    # optional overrides, on top of the agent presets:
    normalize_advantage = true           #   a key for every algorithm that has the field
    [hyperparameters.trpo]               #   a table for one algorithm (or variant)
    target_kl = 0.02

    [variants.trpo-kfac]                 # optional: another row of the comparison, an
    algo = "trpo"                        #   algorithm with some settings changed; list its
    curvature = "kfac"                   #   name in algos like any algorithm. Besides the
    n_envs = 16                          #   algorithm's fields a variant may set the run
                                         #   settings n_envs and vectorization

The settings of a run layer, most specific last: the agent's preset for the env, the
variant's settings, ``[hyperparameters]``'s keys for every algorithm, its table for the run's
name (algorithm or variant); ``trpo-lab compare --set key=value`` and ``--set name.key=value``
come on top, in the same order (:meth:`Experiment.with_overrides`). A variant appears under
its own name in ``summary.csv``, the report and the run folders.

:func:`load_experiment` reads one (a file, a name in ``experiments/`` or a built-in),
:meth:`Experiment.with_overrides` applies the command line, and :meth:`Experiment.runs`
resolves the grid (env-major) against the agent presets into :class:`RunSpec` cells.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_args

from trpo_lab.config import CONFIGS, merge_hyperparameters
from trpo_lab.envs.make import Vectorization
from trpo_lab.experiments.peers import PEER_ALGOS, is_peer, peer_settings
from trpo_lab.presets import BUILTIN_EXPERIMENTS, experiment_names, load_preset, load_suite, preset_file, suite_entry
from trpo_lab.validation import check_int, is_int, require

__all__ = ["DEFAULT_TIMESTEPS", "VARIANT_RUN_KEYS", "RunSpec", "Experiment", "load_experiment", "experiment_from_dict"]

DEFAULT_TIMESTEPS = 100_000
_EXPERIMENT_KEYS = (
    "description", "algos", "suite", "envs", "seeds", "steps", "eval_episodes", "workers", "hyperparameters", "variants",
)
VARIANT_RUN_KEYS = ("n_envs", "vectorization")
"""Run settings a variant may set besides its algorithm's fields (the budget is the experiment's)."""


def _variant_fields(table: Mapping[str, Any]) -> dict[str, Any]:
    """A variant's settings of its algorithm's config: all but ``algo`` and the run settings."""
    return {k: v for k, v in table.items() if k != "algo" and k not in VARIANT_RUN_KEYS}


def _check_run_settings(table: Mapping[str, Any]) -> None:
    if "n_envs" in table:
        check_int("n_envs", table["n_envs"], minimum=1)
    if "vectorization" in table:
        modes = get_args(Vectorization)
        require(table["vectorization"] in modes, "vectorization", table["vectorization"], f"one of {', '.join(modes)}")


@dataclass(kw_only=True)
class RunSpec:
    """One cell of the grid: everything a worker needs to train and evaluate one agent."""

    algo: str
    env_id: str
    seed: int
    label: str = ""
    """The name the run is reported under: the algorithm, or a variant's name (``""``: ``algo``)."""
    total_timesteps: int
    n_envs: int
    vectorization: str
    hyperparameters: dict[str, Any]
    eval_episodes: int
    run_dir: Path

    @property
    def name(self) -> str:
        """The algorithm or variant name the run is reported under."""
        return self.label or self.algo

    @property
    def key(self) -> str:
        """``<ENV>-<name>-seed<S>``: the run's name, and its folder under ``runs/``."""
        return f"{self.env_id}-{self.name}-seed{self.seed}"

    def settings(self) -> dict[str, Any]:
        """What the run was asked to do, as JSON data (stored in ``spec.json``, compared on rerun)."""
        data = asdict(self)
        del data["run_dir"]
        if data["label"] in ("", self.algo):
            del data["label"]
        result: dict[str, Any] = json.loads(json.dumps(data))
        return result

    def same_run(self, stored: Mapping[str, Any] | None) -> bool:
        """Whether ``stored`` settings (a ``spec.json``, or a result's) describe this run: equal
        to :meth:`settings` but for the hyperparameters that change only a run's speed
        (``AgentConfig.speed_only``, such as PPO's ``compile``)."""
        return stored is not None and without_speed_only(stored) == without_speed_only(self.settings())

    def speed_only_hyperparameters(self) -> dict[str, Any]:
        """This run's speed-only hyperparameters, each at its default where the run does not set
        it: what a resumed run applies over its checkpoint's."""
        speed_only = _speed_only(self.algo)
        if not speed_only:
            return {}
        defaults = {f.name: f.default for f in fields(CONFIGS[self.algo]) if f.name in speed_only}
        return {k: self.hyperparameters.get(k, defaults[k]) for k in speed_only}


def _speed_only(algo: Any) -> frozenset[str]:
    return CONFIGS[algo].speed_only if isinstance(algo, str) and algo in CONFIGS else frozenset()


def without_speed_only(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A run's settings without its algorithm's speed-only hyperparameters (``AgentConfig.speed_only``)."""
    speed_only = _speed_only(settings.get("algo"))
    hyperparameters = settings.get("hyperparameters")
    if not speed_only or not isinstance(hyperparameters, Mapping):
        return dict(settings)
    return {**settings, "hyperparameters": {k: v for k, v in hyperparameters.items() if k not in speed_only}}


@dataclass(kw_only=True)
class Experiment:
    """A validated experiment spec (see the module docstring for the TOML keys).

    Attributes:
        algos: The names compared: algorithms and variants.
        envs: Env id -> its suite entry (budget, ``n_envs``, normalization), in run order.
        steps: Env id -> the budget every algorithm gets on it.
        variants: Variant name -> ``{"algo": ..., **hyperparameters}``.
        hyperparameters: Overrides: keys for every algorithm that has them, and a table per
            algorithm or variant name.
    """

    name: str
    origin: str
    description: str = ""
    suite: str | None = None
    algos: list[str]
    envs: dict[str, dict[str, Any]]
    seeds: list[int]
    steps: dict[str, int]
    eval_episodes: int = 10
    workers: int | None = None
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from trpo_lab.envs import check_env_id

        where = f"experiment {self.origin}"
        if not self.algos:
            raise ValueError(f"Invalid {where}: algos is empty; expected at least one of trpo, npg, acktr, ppo")
        self._check_variants(where)
        for label in self.algos:
            if label not in CONFIGS and label not in self.variants and not is_peer(label):
                raise ValueError(
                    f"Invalid {where}: Unknown algorithm {label!r} in algos; expected one of {', '.join(CONFIGS)}, "
                    f"a peer ({', '.join(PEER_ALGOS)}) or a variant ([variants.{label}] with algo = ...)"
                )
        self._check_hyperparameters(where)
        if len(set(self.algos)) != len(self.algos):
            raise ValueError(f"Invalid {where}: algos {self.algos} has duplicates")
        if not self.envs:
            raise ValueError(f"Invalid {where}: no environments")
        for env_id in self.envs:
            check_env_id(env_id)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"Invalid {where}: seeds {self.seeds}; expected distinct integers")
        for env_id, budget in self.steps.items():
            if not is_int(budget) or budget < 1:
                raise ValueError(f"Invalid {where}: steps for {env_id} is {budget!r}; expected an integer >= 1")
        if not is_int(self.eval_episodes) or self.eval_episodes < 1:
            raise ValueError(f"Invalid {where}: eval_episodes {self.eval_episodes!r}; expected an integer >= 1")
        if self.workers is not None and (not is_int(self.workers) or self.workers < 1):
            raise ValueError(f"Invalid {where}: workers {self.workers!r}; expected an integer >= 1")

    # ------------------------------------------------------------------ variants and overrides
    def run_settings_of(self, label: str) -> dict[str, Any]:
        """The run settings (:data:`VARIANT_RUN_KEYS`) a variant sets; ``{}`` for an algorithm."""
        return {k: v for k, v in self.variants.get(label, {}).items() if k in VARIANT_RUN_KEYS}

    def algo_of(self, label: str) -> str:
        """The algorithm behind a name of :attr:`algos` (a variant's ``algo``, else the name itself)."""
        return str(self.variants[label]["algo"]) if label in self.variants else label

    def _check_variants(self, where: str) -> None:
        for name, table in self.variants.items():
            if not isinstance(table, Mapping):
                raise ValueError(f"Invalid {where}: [variants.{name}] must be a table, got {table!r}")
            if name in CONFIGS:
                raise ValueError(f"Invalid {where}: variant {name!r} has an algorithm's name; call it e.g. {name}-2")
            algo = table.get("algo")
            if algo not in CONFIGS:
                raise ValueError(
                    f"Invalid {where}: [variants.{name}] needs algo = one of {', '.join(CONFIGS)}, got {algo!r}"
                )
            try:
                _check_run_settings(table)
                CONFIGS[algo].from_dict(_variant_fields(table))
            except ValueError as exc:
                raise ValueError(f"Invalid {where}: [variants.{name}]: {exc}") from None

    def _label_tables(self) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """``(keys for every algorithm, name -> its own table)`` of :attr:`hyperparameters`."""
        names = set(CONFIGS) | set(self.variants)
        shared = {k: v for k, v in self.hyperparameters.items() if not (k in names and isinstance(v, Mapping))}
        own = {k: dict(v) for k, v in self.hyperparameters.items() if k in names and isinstance(v, Mapping)}
        return shared, own

    def _check_hyperparameters(self, where: str) -> None:
        if not isinstance(self.hyperparameters, Mapping):
            raise ValueError(f"Invalid {where}: hyperparameters must be a table, got {self.hyperparameters!r}")
        shared, own = self._label_tables()
        ours = [label for label in self.algos if not is_peer(label)]
        for key in shared:
            if not any(key in CONFIGS[self.algo_of(label)].field_names() for label in ours):
                names = sorted({n for label in ours for n in CONFIGS[self.algo_of(label)].field_names()})
                close = difflib.get_close_matches(key, names, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ValueError(
                    f"Invalid {where}: hyperparameter {key!r} is a field of none of {', '.join(ours)}{hint}"
                )
        for label in ours:
            try:
                CONFIGS[self.algo_of(label)].from_dict(self.overrides_for(label, shared, own))
            except ValueError as exc:
                raise ValueError(f"Invalid {where}: hyperparameters of {label}: {exc}") from None

    def overrides_for(
        self, label: str, shared: Mapping[str, Any] | None = None, own: Mapping[str, Mapping[str, Any]] | None = None
    ) -> dict[str, Any]:
        """What the spec changes for ``label`` on top of its algorithm's preset: the variant's
        settings, then the shared keys its algorithm has, then ``label``'s own table."""
        if shared is None or own is None:
            shared, own = self._label_tables()
        fields = CONFIGS[self.algo_of(label)].field_names()
        variant = _variant_fields(self.variants.get(label, {}))
        merged = merge_hyperparameters(variant, {k: v for k, v in shared.items() if k in fields})
        return merge_hyperparameters(merged, own.get(label, {}))

    def with_overrides(
        self,
        algos: Sequence[str] | None = None,
        envs: Sequence[str] | None = None,
        seeds: int | Sequence[int] | None = None,
        steps: int | None = None,
        eval_episodes: int | None = None,
        hyperparameters: Mapping[str, Any] | None = None,
    ) -> Experiment:
        """The same experiment with command-line overrides applied (``seeds=N`` means 0..N-1; a
        sequence of seeds replaces the spec's, in its order).

        ``hyperparameters`` (``compare --set``) has the form of the spec's table: keys for every
        algorithm, and a table per algorithm or variant name (``--set trpo.target_kl=0.02``); it
        is layered on the spec's.
        """
        changes: dict[str, Any] = {}
        if hyperparameters:
            names = set(CONFIGS) | set(self.variants)
            merged = dict(self.hyperparameters)
            for key, value in hyperparameters.items():
                if key in names and isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
                    merged[key] = merge_hyperparameters(merged[key], value)
                else:
                    merged[key] = merge_hyperparameters(merged, {key: value})[key]
            changes["hyperparameters"] = merged
        if algos is not None:
            changes["algos"] = [a if a in self.variants else a.lower() for a in algos]
        if envs is not None:
            changes["envs"] = {
                env_id: self.envs[env_id] if env_id in self.envs else _any_suite_entry(env_id) for env_id in envs
            }
            changes["steps"] = {env_id: _budget(env_id, changes["envs"][env_id], self.steps) for env_id in envs}
            if not set(envs) <= set(self.envs):
                changes["suite"] = None  # the envs now come from whichever suite lists them
        if isinstance(seeds, int):
            if seeds < 1:
                raise ValueError(f"Invalid --seeds: {seeds}; expected >= 1")
            changes["seeds"] = list(range(seeds))
        elif seeds is not None:
            if not seeds or len(set(seeds)) != len(seeds) or not all(is_int(s) and s >= 0 for s in seeds):
                raise ValueError(f"Invalid --seeds: {list(seeds)}; expected distinct integers >= 0")
            changes["seeds"] = list(seeds)
        if steps is not None:
            changes["steps"] = {env_id: steps for env_id in changes.get("envs", self.envs)}
        if eval_episodes is not None:
            changes["eval_episodes"] = eval_episodes
        return replace(self, **changes)

    def runs(self, out_dir: str | Path) -> list[RunSpec]:
        """The grid, env-major, resolved against the agent presets (a peer: the zoo's settings,
        :func:`~trpo_lab.experiments.peers.peer_settings`)."""
        out = Path(out_dir)
        specs = []
        for env_id, entry in self.envs.items():
            for label in self.algos:
                if is_peer(label):
                    try:
                        settings = peer_settings(label, env_id)
                    except ValueError as exc:
                        raise ValueError(f"Invalid experiment {self.origin}: {exc}") from None
                    specs += [
                        RunSpec(
                            algo=label, env_id=env_id, seed=seed, total_timesteps=self.steps[env_id],
                            n_envs=int(settings["n_envs"]), vectorization="sync", hyperparameters=settings,
                            eval_episodes=self.eval_episodes, run_dir=out / "runs" / f"{env_id}-{label}-seed{seed}",
                        )
                        for seed in self.seeds
                    ]
                    continue
                algo = self.algo_of(label)
                preset, run = load_preset(algo, env_id, suite=entry)
                run = {**run, **self.run_settings_of(label)}
                hyperparameters = merge_hyperparameters(preset, self.overrides_for(label))
                try:
                    CONFIGS[algo].from_dict(hyperparameters)
                except ValueError as exc:
                    raise ValueError(f"Invalid experiment {self.origin}: {label} on {env_id}: {exc}") from None
                for seed in self.seeds:
                    spec = RunSpec(
                        algo=algo,
                        label=label,
                        env_id=env_id,
                        seed=seed,
                        total_timesteps=self.steps[env_id],
                        n_envs=int(run.get("n_envs", 8)),
                        vectorization=str(run.get("vectorization", "sync")),
                        hyperparameters=hyperparameters,
                        eval_episodes=self.eval_episodes,
                        run_dir=out / "runs" / f"{env_id}-{label}-seed{seed}",
                    )
                    specs.append(spec)
        return specs

    def to_toml(self) -> str:
        """The resolved spec as TOML (written to ``experiment.toml`` in the compare folder)."""
        import tomli_w

        data: dict[str, Any] = {"description": self.description, "algos": self.algos}
        if self.suite is not None:
            data["suite"] = self.suite
        data.update(envs=list(self.envs), seeds=self.seeds, eval_episodes=self.eval_episodes, steps=self.steps)
        if self.hyperparameters:
            data["hyperparameters"] = self.hyperparameters
        if self.variants:
            data["variants"] = self.variants
        return f"# {self.name}, resolved from {self.origin} and the command line\n" + tomli_w.dumps(data)


def _any_suite_entry(env_id: str) -> dict[str, Any]:
    from trpo_lab.envs import check_env_id

    check_env_id(env_id)
    return suite_entry(env_id)


def _budget(env_id: str, entry: Mapping[str, Any], steps: Mapping[str, int]) -> int:
    if env_id in steps:
        return steps[env_id]
    return int(entry.get("total_timesteps", DEFAULT_TIMESTEPS))


def load_experiment(source: str | Path | None = None) -> Experiment:
    """Read an experiment: a TOML file path, a name in ``experiments/``, or ``None`` for ``default``.

    Raises:
        ValueError: missing or unreadable file, unknown name, key, algorithm, suite or env.
    """
    from trpo_lab.config import load_toml

    name = "default" if source is None else str(source)
    path = Path(name)
    if source is not None and (path.suffix == ".toml" or path.exists() or os.sep in name):
        data, origin, name = load_toml(path), str(path), path.stem
    else:
        found = preset_file("experiments", name)
        if found is not None:
            data, origin = load_toml(found), str(found)
        elif name in BUILTIN_EXPERIMENTS:
            data, origin = BUILTIN_EXPERIMENTS[name], f"built-in experiment {name!r}"
        else:
            raise ValueError(
                f"Unknown experiment {name!r}; expected a TOML file or one of {', '.join(experiment_names())}"
            )
    return experiment_from_dict(data, name=name, origin=origin)


def experiment_from_dict(data: Mapping[str, Any], name: str, origin: str) -> Experiment:
    """Validate the TOML data of an experiment spec."""
    unknown = sorted(set(data) - set(_EXPERIMENT_KEYS))
    if unknown:
        raise ValueError(f"Invalid experiment {origin}: unknown key(s) {unknown}; expected some of {list(_EXPERIMENT_KEYS)}")
    algos = data.get("algos")
    if not isinstance(algos, list) or not all(isinstance(a, str) for a in algos):
        raise ValueError(f"Invalid experiment {origin}: algos must be a list of names, got {algos!r}")
    suite: dict[str, dict[str, Any]] = {}
    if "suite" in data:
        if not isinstance(data["suite"], str):
            raise ValueError(f"Invalid experiment {origin}: suite must be the name of a file in envs/, got {data['suite']!r}")
        suite, _ = load_suite(data["suite"])
    env_ids = data.get("envs", list(suite))
    if not isinstance(env_ids, list) or not all(isinstance(e, str) for e in env_ids):
        raise ValueError(f"Invalid experiment {origin}: envs must be a list of environment ids, got {env_ids!r}")
    envs: dict[str, dict[str, Any]] = {}
    for env_id in env_ids:
        if suite and env_id not in suite:
            raise ValueError(
                f"Invalid experiment {origin}: env {env_id!r} is not in suite {data['suite']!r} "
                f"({', '.join(suite)})"
            )
        envs[env_id] = dict(suite[env_id]) if suite else _any_suite_entry(env_id)
    seeds_value = data.get("seeds", 3)
    if is_int(seeds_value):
        if seeds_value < 1:
            raise ValueError(f"Invalid experiment {origin}: seeds {seeds_value}; expected >= 1 or a list")
        seeds = list(range(seeds_value))
    elif isinstance(seeds_value, list) and all(is_int(s) for s in seeds_value):
        seeds = list(seeds_value)
    else:
        raise ValueError(f"Invalid experiment {origin}: seeds {seeds_value!r}; expected a count or a list of integers")
    steps_value = data.get("steps", {})
    if is_int(steps_value):
        explicit = {env_id: steps_value for env_id in envs}
    elif isinstance(steps_value, Mapping):
        explicit = dict(steps_value)
        stray = sorted(set(explicit) - set(envs))
        if stray:
            raise ValueError(f"Invalid experiment {origin}: steps given for {stray}, which it does not run")
    else:
        raise ValueError(f"Invalid experiment {origin}: steps {steps_value!r}; expected an integer or a table per env")
    steps = {env_id: _budget(env_id, entry, explicit) for env_id, entry in envs.items()}
    variants, hyperparameters = data.get("variants", {}), data.get("hyperparameters", {})
    for key, value in (("variants", variants), ("hyperparameters", hyperparameters)):
        if not isinstance(value, Mapping):
            raise ValueError(f"Invalid experiment {origin}: {key} must be a table, got {value!r}")
    variants = {name: dict(table) if isinstance(table, Mapping) else table for name, table in variants.items()}
    return Experiment(
        name=name,
        origin=origin,
        description=str(data.get("description", "")),
        suite=data.get("suite"),
        algos=[a if a in variants else a.lower() for a in algos],
        envs=envs,
        seeds=seeds,
        steps=steps,
        eval_episodes=data.get("eval_episodes", 10),
        workers=data.get("workers"),
        variants=variants,
        hyperparameters=hyperparameters,
    )

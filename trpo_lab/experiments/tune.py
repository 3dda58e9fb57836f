"""Hyperparameter search with Optuna: ``trpo-lab tune ALGO ENV`` (``pip install 'trpo-lab[tune]'``).

Each trial samples hyperparameters from the algorithm's search space with Optuna's TPE
sampler, trains ``steps`` environment steps from the preset of ``ALGO`` on ``ENV`` (plus any
``--set`` overrides), and evaluates the agent deterministically ``evaluations`` times at
evenly spaced budgets (the ``callback`` of :meth:`~trpo_lab.agents.base.OnPolicyAgent.learn`).
Each evaluation's mean return is reported to the trial, and the median pruner stops a trial
whose return falls below the median of earlier trials at the same evaluation (after
``n_startup_trials = 5`` finished trials and the first third of the evaluations, as
rl-baselines3-zoo does). The objective is the last evaluation's mean return (maximised).

Search spaces (``agents/tune/<algo>.toml``, or any file given with ``--space``) map each
hyperparameter, a field of the algorithm's config or ``policy_kwargs.<key>``, to a
distribution::

    n_steps = { choices = [8, 16, 32, 64] }                      # categorical (any TOML values)
    learning_rate = { low = 1e-5, high = 1e-1, log = true }      # float (log-uniform)
    n_epochs = { low = 1, high = 20 }                            # int (both bounds integers)
    max_grad_norm = { low = 0.3, high = 2.0, step = 0.1 }        # float on a grid
    policy_kwargs.net_arch = { choices = [[64, 64], [256, 256]] }

Every bound and choice is validated against the config before anything runs.

The study lives in an Optuna storage: by default the journal file ``OUT/study.journal``;
``--storage`` takes an RDB URL (``sqlite:///study.db``, ``postgresql://user:pw@host/db``,
``mysql+pymysql://...``) or another journal file (a path ending in ``.journal`` or ``.log``).
Rerunning the command continues the study (its trials count towards the sampler), and
machines that run the same command with one RDB URL share the study. A study remembers its
settings (algorithm, env, budget, evaluations, space, fixed hyperparameters) and refuses to
continue with other ones. ``--workers N`` runs N processes on this machine, each with one
torch thread, sharing the storage.

The output folder holds ``best.toml`` (the best trial as a preset table: paste it into
``agents/<algo>.toml`` in place of the env's table), ``history.png`` (objective per trial and
the best so far) and ``trials.csv`` (one row per trial), each written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trpo_lab.config import config_class, load_toml
from trpo_lab.logging import atomic_write_bytes, atomic_write_text
from trpo_lab.validation import check_int, check_number, first_line

if TYPE_CHECKING:
    import optuna

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "BUILTIN_SPACES",
    "SPACE_KEYS",
    "Dimension",
    "TuneResult",
    "parse_space",
    "load_space",
    "open_storage",
    "tune",
    "best_preset_toml",
    "plot_history",
]

SPACE_KEYS = ("choices", "low", "high", "log", "step")
JOURNAL_SUFFIXES = (".journal", ".log")
STORAGE_HELP = (
    "an Optuna RDB URL (sqlite:///study.db, postgresql://user:password@host/db, mysql+pymysql://...) "
    "or a journal file path ending in .journal or .log"
)

_ARCH_SMALL_MEDIUM = {"choices": [[64, 64], [256, 256]]}
_GAMMAS = {"choices": [0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999]}
_ACTIVATIONS = {"choices": ["tanh", "relu"]}
_TRUST_REGION: dict[str, Any] = {
    "n_steps": {"choices": [8, 16, 32, 64, 128, 256, 512, 1024, 2048]},
    "batch_size": {"choices": [8, 16, 32, 64, 128, 256, 512]},
    "gamma": _GAMMAS,
    "learning_rate": {"low": 1e-5, "high": 0.1, "log": True},
    "n_critic_updates": {"choices": [5, 10, 20, 25, 30]},
    "cg_max_steps": {"choices": [5, 10, 20, 25, 30]},
    "target_kl": {"choices": [0.1, 0.05, 0.03, 0.02, 0.01, 0.005, 0.001]},
    "gae_lambda": {"choices": [0.8, 0.9, 0.92, 0.95, 0.98, 0.99, 1.0]},
    "policy_kwargs": {"net_arch": _ARCH_SMALL_MEDIUM, "activation_fn": _ACTIVATIONS},
}

# What `trpo-lab tune` searches with no agents/tune/ file; each equals that file
# (tests/experiments/test_tune.py). Ranges start from rl-baselines3-zoo's samplers.
BUILTIN_SPACES: dict[str, dict[str, Any]] = {
    "trpo": _TRUST_REGION,
    "npg": _TRUST_REGION,
    "ppo": {
        "n_steps": {"choices": [32, 64, 128, 256, 512, 1024, 2048]},
        "batch_size": {"choices": [32, 64, 128, 256, 512]},
        "gamma": {"choices": [0.97, 0.98, 0.99, 0.995, 0.999, 0.9999]},
        "gae_lambda": {"choices": [0.9, 0.95, 0.98, 0.99, 0.999]},
        "learning_rate": {"low": 1e-5, "high": 0.002, "log": True},
        "ent_coef": {"low": 1e-8, "high": 0.1, "log": True},
        "clip_range": {"choices": [0.1, 0.2, 0.3, 0.4]},
        "n_epochs": {"choices": [1, 5, 10, 20]},
        "max_grad_norm": {"low": 0.3, "high": 2.0},
        "policy_kwargs": {"net_arch": {"choices": [[64], [64, 64], [256, 256]]}, "activation_fn": _ACTIVATIONS},
    },
    "acktr": {
        "n_steps": {"choices": [8, 16, 32, 64, 128, 256]},
        "gamma": _GAMMAS,
        "gae_lambda": {"choices": [0.9, 0.95, 0.98, 0.99, 1.0]},
        "learning_rate": {"low": 1e-3, "high": 1.0, "log": True},
        "ent_coef": {"low": 1e-8, "high": 0.1, "log": True},
        "vf_coef": {"low": 0.1, "high": 1.0},
        "kl_clip": {"choices": [0.0001, 0.0005, 0.001, 0.005, 0.01]},
        "max_grad_norm": {"low": 0.3, "high": 2.0},
        "policy_kwargs": {"net_arch": _ARCH_SMALL_MEDIUM, "activation_fn": _ACTIVATIONS},
    },
}


def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ValueError("trpo-lab tune needs Optuna; install it with: pip install 'trpo-lab[tune]'") from None
    return optuna


# ---------------------------------------------------------------------------- the search space
def _nested(name: str, value: Any) -> dict[str, Any]:
    """``{"policy_kwargs": {"net_arch": v}}`` for ``"policy_kwargs.net_arch"``; ``{name: v}`` otherwise."""
    head, _, rest = name.partition(".")
    return {head: {rest: value}} if rest else {head: value}


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


@dataclass(frozen=True, kw_only=True)
class Dimension:
    """One hyperparameter's distribution: categorical ``choices``, or a ``low``..``high`` range.

    A range is an integer one when both bounds are integers (and ``step``, if given, too),
    else a float one; ``log`` samples it log-uniformly. Choices that are not scalars (lists
    such as ``net_arch``) go to Optuna as their JSON text and come back decoded.
    """

    name: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    @property
    def is_int(self) -> bool:
        values = (self.low, self.high) if self.step is None else (self.low, self.high, self.step)
        return all(isinstance(v, int) and not isinstance(v, bool) for v in values)

    @property
    def encoded(self) -> bool:
        """Whether the choices go to Optuna as JSON text."""
        return self.choices is not None and not all(_is_scalar(c) for c in self.choices)

    def suggest(self, trial: optuna.Trial) -> Any:
        """Sample this dimension in ``trial``; returns the hyperparameter's value."""
        if self.choices is not None:
            if self.encoded:
                return json.loads(trial.suggest_categorical(self.name, [json.dumps(c) for c in self.choices]))
            return trial.suggest_categorical(self.name, list(self.choices))
        assert self.low is not None and self.high is not None
        if self.is_int:
            step = int(self.step) if self.step is not None else 1
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=step, log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def decode(self, value: Any) -> Any:
        """The hyperparameter's value from the value Optuna stored for this dimension."""
        return json.loads(value) if self.encoded else value

    def to_dict(self) -> dict[str, Any]:
        """The TOML form: ``{"choices": [...]}`` or ``{"low": .., "high": .., "log": .., "step": ..}``."""
        if self.choices is not None:
            return {"choices": list(self.choices)}
        data: dict[str, Any] = {"low": self.low, "high": self.high}
        if self.log:
            data["log"] = True
        if self.step is not None:
            data["step"] = self.step
        return data


def _dimension(algo: str, name: str, spec: Any, origin: str) -> Dimension:
    where = f"Invalid search space {origin}: {name}"
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where} = {spec!r}; expected a table such as {{ choices = [...] }} or {{ low = 1e-5, high = 1e-2 }}")
    unknown = sorted(set(spec) - set(SPACE_KEYS))
    if unknown:
        raise ValueError(f"{where} has unknown field(s) {unknown}; expected some of {list(SPACE_KEYS)}")
    if "choices" in spec:
        extra = sorted(set(spec) - {"choices"})
        if extra:
            raise ValueError(f"{where}: choices cannot be combined with {extra}")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ValueError(f"{where}: choices = {choices!r}; expected a non-empty array")
        dim = Dimension(name=name, choices=tuple(choices))
        values: list[Any] = list(choices)
    else:
        if "low" not in spec or "high" not in spec:
            raise ValueError(f"{where} = {dict(spec)!r}; expected choices = [...], or low and high")
        low = check_number(f"{name}.low", spec["low"], expected="a finite number")
        high = check_number(f"{name}.high", spec["high"], expected="a finite number")
        log = spec.get("log", False)
        if not isinstance(log, bool):
            raise ValueError(f"{where}: log = {log!r}; expected true or false")
        if not low < high:
            raise ValueError(f"{where}: low = {spec['low']!r} is not below high = {spec['high']!r}")
        if log and low <= 0:
            raise ValueError(f"{where}: log = true needs low > 0, got low = {spec['low']!r}")
        step = spec.get("step")
        if step is not None:
            check_number(f"{name}.step", step, minimum=0, strict=True)
            if log:
                raise ValueError(f"{where}: step cannot be combined with log = true")
        dim = Dimension(name=name, low=spec["low"], high=spec["high"], log=log, step=step)
        values = [spec["low"], spec["high"]]
    cls = config_class(algo)
    for value in values:
        try:
            cls.from_dict(_nested(name, value))
        except ValueError as exc:
            raise ValueError(f"Invalid search space {origin}: {name}: {exc}") from None
    return dim


def parse_space(algo: str, data: Mapping[str, Any], origin: str = "search space") -> dict[str, Dimension]:
    """Validate a search space (the TOML form) for ``algo``; ``{name: Dimension}``, dotted names for policy_kwargs.

    Raises:
        ValueError: an empty space, a key that is not a hyperparameter of ``algo`` (nor a
            ``policy_kwargs`` key), a malformed distribution, or a bound / choice the
            algorithm's config rejects; the message names ``origin``.
    """
    cls = config_class(algo)
    names = cls.field_names()
    space: dict[str, Dimension] = {}
    for key, spec in data.items():
        if key not in names:
            try:
                cls.from_dict({key: None})
            except ValueError as exc:
                raise ValueError(f"Invalid search space {origin}: {exc}") from None
        if key == "policy_kwargs" and isinstance(spec, Mapping) and not (set(spec) & set(SPACE_KEYS)):
            from trpo_lab.nn.policy import POLICY_KWARGS

            for sub, sub_spec in spec.items():
                if sub not in POLICY_KWARGS:
                    raise ValueError(
                        f"Invalid search space {origin}: unknown key 'policy_kwargs.{sub}' for {cls.algo}; "
                        f"expected one of {[f'policy_kwargs.{k}' for k in POLICY_KWARGS]}"
                    )
                space[f"policy_kwargs.{sub}"] = _dimension(algo, f"policy_kwargs.{sub}", sub_spec, origin)
        else:
            space[key] = _dimension(algo, key, spec, origin)
    if not space:
        raise ValueError(
            f"Invalid search space {origin}: it is empty; expected at least one hyperparameter, "
            "e.g. learning_rate = { low = 1e-5, high = 1e-2, log = true }"
        )
    return space


def load_space(algo: str, path: str | Path | None = None) -> tuple[dict[str, Dimension], str]:
    """``(space, origin)``: ``path``, else ``agents/tune/<algo>.toml`` in the preset folders, else the built-in one."""
    from trpo_lab.presets import preset_dirs

    config_class(algo)  # unknown algorithm -> ValueError
    key = algo.lower()
    if path is None:
        found = [d / "tune" / f"{key}.toml" for d in preset_dirs("agents") if (d / "tune" / f"{key}.toml").is_file()]
        if not found:
            return parse_space(key, BUILTIN_SPACES[key], f"built-in search space of {key}"), f"built-in search space of {key}"
        path = found[0]
    return parse_space(key, load_toml(path), str(path)), str(path)


def space_to_dict(space: Mapping[str, Dimension]) -> dict[str, Any]:
    """The TOML form of a parsed space (dotted names nested again)."""
    data: dict[str, Any] = {}
    for name, dim in space.items():
        head, _, rest = name.partition(".")
        if rest:
            data.setdefault(head, {})[rest] = dim.to_dict()
        else:
            data[name] = dim.to_dict()
    return data


def _merge(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes``; ``policy_kwargs`` merged key by key."""
    merged = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in base.items()}
    for key, value in changes.items():
        if key == "policy_kwargs" and isinstance(value, Mapping):
            merged["policy_kwargs"] = {**merged.get("policy_kwargs", {}), **value}
        else:
            merged[key] = value
    return merged


def sampled_hyperparameters(space: Mapping[str, Dimension], params: Mapping[str, Any]) -> dict[str, Any]:
    """Hyperparameters (``policy_kwargs`` nested) from a trial's ``params`` (Optuna's stored values)."""
    out: dict[str, Any] = {}
    for name, dim in space.items():
        if name in params:
            out = _merge(out, _nested(name, dim.decode(params[name])))
    return out


# ---------------------------------------------------------------------------- storage
def open_storage(url: str) -> Any:
    """The Optuna storage for ``url``: an RDB URL, or a journal file path (``.journal`` / ``.log``).

    RDB storages get a heartbeat, so that a trial whose process died is marked failed.

    Raises:
        ValueError: anything else, an unknown database dialect or missing driver, or a
            database / file that cannot be opened; the message names ``url``.
    """
    optuna = _import_optuna()
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"Invalid --storage {url!r}; expected {STORAGE_HELP}")
    try:
        if "://" in url:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180)
        if not url.endswith(JOURNAL_SUFFIXES):
            raise ValueError(f"Invalid --storage {url!r}; expected {STORAGE_HELP}")
        path = Path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    except ValueError as exc:
        if str(exc).startswith("Invalid --storage"):
            raise
        raise ValueError(f"Invalid --storage {url!r}: {first_line(exc)}; expected {STORAGE_HELP}") from None
    except Exception as exc:  # sqlalchemy's errors, a missing driver (ImportError), OSError
        raise ValueError(
            f"Invalid --storage {url!r}: cannot open it ({type(exc).__name__}: {first_line(exc)}); expected {STORAGE_HELP}"
        ) from None


# ---------------------------------------------------------------------------- one trial
@dataclass(frozen=True, kw_only=True)
class _Job:
    """Everything a worker needs to run trials (picklable: it goes to spawned processes)."""

    algo: str
    env_id: str
    storage: str
    study_name: str
    space: dict[str, Dimension]
    fixed: dict[str, Any]
    n_envs: int
    vectorization: str
    steps: int
    evaluations: int
    eval_episodes: int
    seed: int
    verbose: bool

    def settings(self) -> dict[str, Any]:
        """What a study remembers and a rerun must match (JSON-comparable)."""
        settings: dict[str, Any] = json.loads(json.dumps({
            "algo": self.algo, "env_id": self.env_id, "n_envs": self.n_envs, "steps": self.steps,
            "evaluations": self.evaluations, "eval_episodes": self.eval_episodes, "seed": self.seed,
            "fixed": self.fixed, "space": space_to_dict(self.space),
        }))
        return settings


def _objective(job: _Job, trial: optuna.Trial) -> float:
    """Train one sampled configuration, report each evaluation, prune, return the last evaluation."""
    import optuna

    from trpo_lab.agents import agent_class

    sampled: dict[str, Any] = {}
    for name, dim in job.space.items():
        sampled = _merge(sampled, _nested(name, dim.suggest(trial)))
    hyperparameters = _merge(job.fixed, sampled)
    thresholds = [job.steps * (k + 1) // job.evaluations for k in range(job.evaluations)]
    state: dict[str, Any] = {"done": 0, "value": None, "pruned": False}

    def evaluate_and_prune(agent: Any, metrics: Mapping[str, float]) -> bool:
        crossed = sum(1 for t in thresholds if agent.num_timesteps >= t)
        if crossed <= state["done"]:
            return True
        state["done"] = crossed  # one evaluation even when an update crosses several budgets
        value = float(np.mean(agent.evaluate(job.eval_episodes, deterministic=True)))
        state["value"] = value
        trial.report(value, step=crossed)
        if trial.should_prune():
            state["pruned"] = True
            return False
        return True

    agent = agent_class(job.algo)(
        job.env_id, n_envs=job.n_envs, seed=job.seed, vectorization=job.vectorization, **hyperparameters
    )
    trial.set_user_attr("eval_budgets", thresholds)
    try:
        agent.learn(job.steps, callback=evaluate_and_prune, tensorboard=False)
    finally:
        agent.close()
    trial.set_user_attr("timesteps", int(agent.num_timesteps))
    if state["pruned"]:
        raise optuna.TrialPruned(f"evaluation {state['done']} of {job.evaluations}: return {state['value']:.2f}")
    assert state["value"] is not None  # learn() runs until the last budget, where the callback evaluates
    return float(state["value"])


def _sampler(job: _Job, existing: int, worker: int) -> Any:
    """TPE (multivariate, constant liar for parallel workers), seeded per rerun and worker so that a
    continued study does not replay its first random trials."""
    import optuna

    seed = int(np.random.SeedSequence([job.seed, existing, worker]).generate_state(1)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(n_startup_trials=10, multivariate=True, constant_liar=True, seed=seed)


def _pruner(job: _Job) -> Any:
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=job.evaluations // 3)


def _print_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    import optuna

    state = trial.state.name.lower()
    seconds = trial.duration.total_seconds() if trial.duration is not None else float("nan")
    if trial.state == optuna.trial.TrialState.COMPLETE:
        outcome = f"return {trial.value:.2f}"
    elif trial.state == optuna.trial.TrialState.PRUNED and trial.intermediate_values:
        step = max(trial.intermediate_values)
        outcome = f"at evaluation {step} (return {trial.intermediate_values[step]:.2f})"
    else:
        outcome = ""
    try:
        best = f"; best {study.best_value:.2f} (trial {study.best_trial.number})"
    except ValueError:
        best = ""
    print(f"trial {trial.number} {state} {outcome} in {seconds:.0f} s{best}", flush=True)


def _run_trials(job: _Job, n_trials: int, timeout: float | None, existing: int, worker: int) -> None:
    """One worker: ``n_trials`` trials (or until ``timeout``) of the shared study."""
    import optuna
    import torch

    from trpo_lab.envs import NonFiniteError

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(
        study_name=job.study_name, storage=open_storage(job.storage),
        sampler=_sampler(job, existing, worker), pruner=_pruner(job),
    )
    study.optimize(
        lambda trial: _objective(job, trial),
        n_trials=n_trials,
        timeout=timeout,
        catch=(NonFiniteError,),  # a diverged configuration fails its trial, not the study
        callbacks=[_print_trial] if job.verbose else None,
    )


def _worker_main(job: _Job, n_trials: int, timeout: float | None, existing: int, worker: int) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the workers on Ctrl-C
    _run_trials(job, n_trials, timeout, existing, worker)


def _run_workers(job: _Job, trials: int, workers: int, timeout: float | None, existing: int) -> None:
    """Split ``trials`` over ``workers`` spawned processes (one torch thread each) and wait for them."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    shares = [trials // workers + (1 if i < trials % workers else 0) for i in range(workers)]
    processes = [
        context.Process(target=_worker_main, args=(job, share, timeout, existing, i), daemon=False)
        for i, share in enumerate(shares) if share > 0
    ]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join()
    except BaseException:
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=60)
        raise
    failed = [p.exitcode for p in processes if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} tune worker(s) failed (exit codes {failed}); see their messages above")


# ---------------------------------------------------------------------------- outputs
@dataclass
class TuneResult:
    """What :func:`tune` did and where it wrote it."""

    study_name: str
    storage: str
    out_dir: Path
    n_trials: int
    n_complete: int
    n_pruned: int
    n_failed: int
    new_trials: int
    best_value: float | None = None
    best_trial: int | None = None
    best_hyperparameters: dict[str, Any] = field(default_factory=dict)
    preset_toml: str = ""
    elapsed_s: float = 0.0

    @property
    def preset_path(self) -> Path:
        return self.out_dir / "best.toml"

    @property
    def plot_path(self) -> Path:
        return self.out_dir / "history.png"


def best_preset_toml(
    algo: str, env_id: str, hyperparameters: Mapping[str, Any], run_settings: Mapping[str, Any], header: Sequence[str]
) -> str:
    """A preset table ``[env_id]`` of ``agents/<algo>.toml`` (validated by loading it back)."""
    import tomli_w

    from trpo_lab.presets import resolve_preset

    table = {**run_settings, **{k: v for k, v in hyperparameters.items() if v is not None}}
    text = tomli_w.dumps({env_id: table})
    resolve_preset(algo, env_id, tomllib.loads(text), origin="best.toml")  # what is pasted loads
    return "".join(f"# {line}\n" for line in header) + text


def plot_history(trials: Sequence[Any], path: Path, title: str) -> None:
    """``history.png``: each finished trial's objective (pruned: its last evaluation), and the best so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    complete = [(t.number, t.value) for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    pruned = [(t.number, t.intermediate_values[max(t.intermediate_values)]) for t in trials
              if t.state == optuna.trial.TrialState.PRUNED and t.intermediate_values]
    failed = [t.number for t in trials if t.state == optuna.trial.TrialState.FAIL]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if complete:
        x, y = zip(*complete)
        ax.scatter(x, y, color="C0", label=f"complete ({len(complete)})", zorder=3)
        ax.step(x, np.maximum.accumulate(y), where="post", color="C1", label="best so far")
    if pruned:
        x, y = zip(*pruned)
        ax.scatter(x, y, color="0.6", marker="x", label=f"pruned ({len(pruned)}): last evaluation", zorder=2)
    for number in failed:
        ax.axvline(number, color="C3", alpha=0.3, linewidth=1)
    if failed:
        ax.plot([], [], color="C3", alpha=0.3, label=f"failed ({len(failed)})")
    ax.set_xlabel("trial")
    ax.set_ylabel("mean evaluation return")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _write_trials_csv(trials: Sequence[Any], space: Mapping[str, Dimension], path: Path) -> None:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["number", "state", "value", "last_evaluation", "duration_s", *space])
    for t in trials:
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else ""
        seconds = t.duration.total_seconds() if t.duration is not None else ""
        params = [json.dumps(space[name].decode(t.params[name])) if name in t.params else "" for name in space]
        writer.writerow([t.number, t.state.name, "" if t.value is None else t.value, last, seconds, *params])
    atomic_write_text(path, out.getvalue())


# ---------------------------------------------------------------------------- the entry point
def tune(
    algo: str,
    env_id: str,
    *,
    trials: int = 20,
    workers: int = 1,
    timeout: float | None = None,
    steps: int | None = None,
    n_envs: int | None = None,
    seed: int = 0,
    storage: str | None = None,
    study_name: str | None = None,
    out: str | Path | None = None,
    space: str | Path | Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    evaluations: int = 5,
    eval_episodes: int = 5,
    verbose: bool = True,
) -> TuneResult:
    """Run ``trials`` more trials of the Optuna study of ``algo`` on ``env_id``, then write the outputs.

    Args:
        algo: ``trpo``, ``npg``, ``ppo`` or ``acktr``.
        env_id: A Gymnasium id.
        trials: Trials to run in this call (over all workers); a rerun adds to the study.
        workers: Processes on this machine (1: in this process).
        timeout: Stop starting trials after this many seconds (running ones finish).
        steps: Environment steps per trial (default: the preset's ``total_timesteps``).
        n_envs: Environments per trial (default: the preset's).
        seed: Seed of every trial's agent and of the sampler.
        storage: Optuna storage (see :func:`open_storage`); default ``OUT/study.journal``.
        study_name: Default ``<algo>-<env_id>``.
        out: Output folder; default ``tune_out/<env_id>-<algo>``.
        space: A search-space TOML file or mapping; default ``agents/tune/<algo>.toml`` or the built-in one.
        overrides: Fixed hyperparameters over the preset (``--set``).
        evaluations: Evaluations per trial, at evenly spaced budgets (the pruner's steps).
        eval_episodes: Deterministic episodes per evaluation.
        verbose: Print one line per finished trial.

    Raises:
        ValueError: bad arguments, search space or storage, Optuna not installed, or a study
            with this name that was run with other settings.
    """
    from trpo_lab.envs import check_env_id
    from trpo_lab.experiments.spec import DEFAULT_TIMESTEPS
    from trpo_lab.presets import agent_tables, load_preset

    optuna = _import_optuna()
    algo = algo.lower()
    config_class(algo)
    check_env_id(env_id)
    trials = check_int("--trials", trials, minimum=1)
    workers = check_int("--workers", workers, minimum=1)
    evaluations = check_int("--evaluations", evaluations, minimum=1)
    eval_episodes = check_int("--eval-episodes", eval_episodes, minimum=1)
    check_int("--seed", seed)
    if timeout is not None:
        timeout = check_number("--timeout", timeout, minimum=0, strict=True, expected="a positive number of seconds")
    if isinstance(space, Mapping):
        parsed, space_origin = parse_space(algo, space), "the given search space"
    else:
        parsed, space_origin = load_space(algo, space)
    hyperparameters, run_settings = load_preset(algo, env_id)
    fixed = _merge(hyperparameters, overrides or {})
    config_class(algo).from_dict(fixed)  # a bad --set fails here, before any trial
    n_envs = check_int("--n-envs", n_envs if n_envs is not None else int(run_settings.get("n_envs", 8)), minimum=1)
    steps = check_int("--steps", steps if steps is not None else int(run_settings.get("total_timesteps", DEFAULT_TIMESTEPS)),
                      minimum=1)
    out_dir = Path(out) if out is not None else Path("tune_out") / f"{env_id}-{algo}"
    if storage is not None:
        open_storage(storage)  # a bad URL fails before the output folder is created
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"Invalid --out {str(out_dir)!r}: cannot create it ({exc.strerror or exc})") from None
    storage_url = storage if storage is not None else str(out_dir / "study.journal")
    name = study_name if study_name is not None else f"{algo}-{env_id}"
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"Invalid --study {name!r}; expected a non-empty name")
    job = _Job(
        algo=algo, env_id=env_id, storage=storage_url, study_name=name, space=parsed, fixed=fixed, n_envs=n_envs,
        vectorization=str(run_settings.get("vectorization", "sync")), steps=steps, evaluations=evaluations,
        eval_episodes=eval_episodes, seed=seed, verbose=verbose,
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=open_storage(storage_url), study_name=name, direction="maximize", load_if_exists=True,
        sampler=_sampler(job, 0, 0), pruner=_pruner(job),
    )
    _check_settings(study, job)
    existing = len(study.trials)
    if verbose:
        print(
            f"tune {algo} on {env_id}: study {name!r} ({existing} trials so far) in {storage_url}; {trials} more trial(s) "
            f"of {steps} steps on {workers} worker(s), {evaluations} evaluations of {eval_episodes} episodes each; "
            f"search space: {space_origin} ({len(parsed)} hyperparameters)",
            flush=True,
        )
    start = time.perf_counter()
    if workers == 1:
        _run_trials(job, trials, timeout, existing, 0)
    else:
        _run_workers(job, trials, workers, timeout, existing)
    elapsed = time.perf_counter() - start
    return _write_outputs(job, out_dir, existing, elapsed, agent_tables(algo)[0].get(env_id, {}), overrides or {})


def _check_settings(study: optuna.Study, job: _Job) -> None:
    settings = job.settings()
    stored = study.user_attrs.get("trpo_lab_settings")
    if stored is None:
        if study.trials:
            raise ValueError(
                f"Study {job.study_name!r} in {job.storage} was not created by trpo-lab tune; use another --study"
            )
        study.set_user_attr("trpo_lab_settings", settings)
        return
    if stored != settings:
        changed = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
        raise ValueError(
            f"Study {job.study_name!r} in {job.storage} was run with other settings ({', '.join(changed)} differ); "
            "use another --study or --out to start a new one"
        )


def _write_outputs(
    job: _Job, out_dir: Path, existing: int, elapsed: float, env_table: Mapping[str, Any], overrides: Mapping[str, Any]
) -> TuneResult:
    """``history.png``, ``trials.csv`` and (once a trial completed) ``best.toml``: the env's preset
    table with the ``--set`` overrides and the best trial's hyperparameters."""
    import optuna

    study = optuna.load_study(study_name=job.study_name, storage=open_storage(job.storage))
    trials = study.get_trials(deepcopy=False)
    states = optuna.trial.TrialState
    count = {s: sum(1 for t in trials if t.state == s) for s in (states.COMPLETE, states.PRUNED, states.FAIL)}
    result = TuneResult(
        study_name=job.study_name, storage=job.storage, out_dir=out_dir, n_trials=len(trials),
        n_complete=count[states.COMPLETE], n_pruned=count[states.PRUNED], n_failed=count[states.FAIL],
        new_trials=len(trials) - existing, elapsed_s=elapsed,
    )
    plot_history(trials, result.plot_path, f"{job.algo} on {job.env_id}: study {job.study_name!r}, {len(trials)} trials")
    _write_trials_csv(trials, job.space, out_dir / "trials.csv")
    if result.n_complete == 0:
        return result
    best = study.best_trial
    assert best.value is not None
    result.best_value, result.best_trial = float(best.value), best.number
    table = _merge(_merge({k: v for k, v in env_table.items() if k not in ("n_envs", "total_timesteps")}, overrides),
                   sampled_hyperparameters(job.space, best.params))
    result.best_hyperparameters = table
    header = [
        f"Best trial of study {job.study_name!r} ({job.storage}): trial {best.number} of {len(trials)} "
        f"({result.n_complete} complete, {result.n_pruned} pruned, {result.n_failed} failed),",
        f"mean return {best.value:.2f} over {job.eval_episodes} deterministic episodes after {job.steps} steps, seed {job.seed}.",
        f"Replaces the [\"{job.env_id}\"] table of agents/{job.algo}.toml (written by trpo-lab tune).",
    ]
    run = {"n_envs": job.n_envs, "total_timesteps": job.steps}
    if "vectorization" in env_table:
        run["vectorization"] = env_table["vectorization"]
    result.preset_toml = best_preset_toml(job.algo, job.env_id, table, run, header)
    atomic_write_text(result.preset_path, result.preset_toml)
    return result


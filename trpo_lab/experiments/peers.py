"""Peer runs in a compare: sb3-contrib TRPO and SB3 PPO with rl-baselines3-zoo's settings.

A compare (:func:`~trpo_lab.experiments.runner.run_experiment`) can list ``sb3-trpo`` and
``sb3-ppo`` in its algorithms next to ours. Such a run goes through the same process pool,
resume, ``summary.csv``, statistics and learning curves as ours; only its training differs
(:func:`execute_peer_run`, which imports SB3 lazily: installs without it can run everything
else). Like ours, a peer run writes

* ``progress.csv`` with the columns the report reads (``timesteps``, ``wall_s``,
  ``return_mean``: the mean training return of the last 100 episodes, from SB3's Monitor) and
  ``episodes``, ``updates``, ``fps`` (steps/s since this process started the run), a row per
  rollout (no ``kl``: SB3 logs it under its own names, not per rollout);
* ``checkpoint.zip`` + ``vecnormalize.pkl`` + ``checkpoint.json`` every
  :data:`CHECKPOINT_EVERY` steps and when SIGTERM/SIGINT stops it (a rerun continues from
  there with ``reset_num_timesteps=False``; the Monitor's episode buffer starts empty again);
* ``final.zip`` and ``result.json`` (the runner's record) once trained: the final return is the
  mean over ``eval_episodes`` deterministic episodes on a separate env seeded ``seed + 10_000``,
  normalised with the training VecNormalize statistics frozen (``training=False``, raw
  rewards).

The hyperparameters are rl-baselines3-zoo's (commit 22e3ff2, ``hyperparams/trpo.yml`` and
``hyperparams/ppo.yml``) for the ``-v4`` MuJoCo envs, used for ``-v5`` (same bodies, same
rewards): :data:`ZOO_SETTINGS`.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trpo_lab.logging import atomic_write_text

if TYPE_CHECKING:
    from trpo_lab.experiments.spec import RunSpec

__all__ = ["PEER_ALGOS", "ZOO_SETTINGS", "CHECKPOINT_EVERY", "is_peer", "peer_settings", "check_peer", "execute_peer_run"]

PEER_ALGOS = ("sb3-trpo", "sb3-ppo")
"""Peer algorithm names a compare accepts: sb3-contrib's TRPO and SB3's PPO."""

CHECKPOINT_EVERY = 100_000
"""Env steps between a peer run's checkpoints (it also checkpoints when stopped by a signal)."""

# rl-baselines3-zoo, hyperparams/trpo.yml: the "mujoco-defaults" anchor (= its pybullet
# defaults, n_timesteps 1e6) for Hopper-v4 / Walker2d-v4, plus target_kl 0.04 on HalfCheetah-v4.
_ZOO_TRPO: dict[str, Any] = {
    "normalize": True, "n_envs": 2, "policy": "MlpPolicy", "batch_size": 128, "n_steps": 1024,
    "gamma": 0.99, "gae_lambda": 0.95, "sub_sampling_factor": 1, "cg_max_steps": 25, "cg_damping": 0.1,
    "n_critic_updates": 20, "learning_rate": 1e-3,
}
# rl-baselines3-zoo, hyperparams/ppo.yml: HalfCheetah-v4, Hopper-v4, Walker2d-v4 (tuned entries).
_ZOO_PPO_NET: dict[str, Any] = {
    "log_std_init": -2, "ortho_init": False, "activation_fn": "ReLU", "net_arch": {"pi": [256, 256], "vf": [256, 256]},
}
ZOO_SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "sb3-trpo": {
        "HalfCheetah-v5": {**_ZOO_TRPO, "target_kl": 0.04},
        "Hopper-v5": dict(_ZOO_TRPO),
        "Walker2d-v5": dict(_ZOO_TRPO),
    },
    "sb3-ppo": {
        "HalfCheetah-v5": {
            "normalize": True, "n_envs": 1, "policy": "MlpPolicy", "batch_size": 64, "n_steps": 512, "gamma": 0.98,
            "learning_rate": 2.0633e-05, "ent_coef": 0.000401762, "clip_range": 0.1, "n_epochs": 20,
            "gae_lambda": 0.92, "max_grad_norm": 0.8, "vf_coef": 0.58096, "policy_kwargs": dict(_ZOO_PPO_NET),
        },
        "Hopper-v5": {
            "normalize": True, "n_envs": 1, "policy": "MlpPolicy", "batch_size": 32, "n_steps": 512, "gamma": 0.999,
            "learning_rate": 9.80828e-05, "ent_coef": 0.00229519, "clip_range": 0.2, "n_epochs": 5,
            "gae_lambda": 0.99, "max_grad_norm": 0.7, "vf_coef": 0.835671, "policy_kwargs": dict(_ZOO_PPO_NET),
        },
        "Walker2d-v5": {
            "normalize": True, "n_envs": 1, "policy": "MlpPolicy", "batch_size": 32, "n_steps": 512, "gamma": 0.99,
            "learning_rate": 5.05041e-05, "ent_coef": 0.000585045, "clip_range": 0.1, "n_epochs": 20,
            "gae_lambda": 0.95, "max_grad_norm": 1, "vf_coef": 0.871923,
        },
    },
}
"""Peer name -> env id -> the zoo's settings (``normalize``, ``n_envs``, ``policy`` and the
algorithm's keyword arguments; ``policy_kwargs.activation_fn`` names a ``torch.nn`` class)."""

_PROGRESS_COLUMNS = ("timesteps", "wall_s", "return_mean", "episodes", "updates", "fps")


def is_peer(algo: str) -> bool:
    """Whether ``algo`` names a peer run (:data:`PEER_ALGOS`) rather than one of ours."""
    return algo in PEER_ALGOS


def peer_settings(algo: str, env_id: str) -> dict[str, Any]:
    """The zoo's settings of peer ``algo`` on ``env_id`` (a copy).

    Raises:
        ValueError: an unknown peer, or an env the zoo has no settings for here.
    """
    if algo not in ZOO_SETTINGS:
        raise ValueError(f"Unknown peer algorithm {algo!r}; expected one of {', '.join(PEER_ALGOS)}")
    if env_id not in ZOO_SETTINGS[algo]:
        raise ValueError(
            f"Invalid env for {algo}: {env_id!r} has no rl-baselines3-zoo settings here; "
            f"expected one of {', '.join(ZOO_SETTINGS[algo])}"
        )
    copy: dict[str, Any] = json.loads(json.dumps(ZOO_SETTINGS[algo][env_id]))
    return copy


def check_peer(algo: str) -> None:
    """Fail early, naming the package, when the peer's library is not installed."""
    package = "sb3_contrib" if algo == "sb3-trpo" else "stable_baselines3"
    try:
        __import__(package)
    except ImportError:
        raise ValueError(
            f"{algo} needs {package.replace('_', '-')} (pip install sb3-contrib stable-baselines3)"
        ) from None


def _algorithm_class(algo: str) -> Any:
    if algo == "sb3-trpo":
        from sb3_contrib import TRPO

        return TRPO
    from stable_baselines3 import PPO

    return PPO


def _model_kwargs(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The algorithm's keyword arguments: the settings less the zoo's run keys, ``activation_fn`` resolved."""
    import torch.nn

    kwargs = {k: v for k, v in settings.items() if k not in ("normalize", "n_envs", "policy")}
    if "policy_kwargs" in kwargs:
        policy_kwargs = dict(kwargs["policy_kwargs"])
        if "activation_fn" in policy_kwargs:
            policy_kwargs["activation_fn"] = getattr(torch.nn, policy_kwargs["activation_fn"])
        kwargs["policy_kwargs"] = policy_kwargs
    return kwargs


def _trim_progress(path: Path, timesteps: int) -> None:
    """Drop the rows logged after the checkpoint (a run killed between checkpoints logged them)."""
    if not path.exists():
        return
    with path.open(newline="") as fh:
        rows = [row for row in csv.DictReader(fh) if row.get("timesteps") and float(row["timesteps"]) <= timesteps]
    _write_progress(path, rows)


def _write_progress(path: Path, rows: list[dict[str, Any]]) -> None:
    lines = [",".join(_PROGRESS_COLUMNS)] + [",".join(str(row[c]) for c in _PROGRESS_COLUMNS) for row in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


def execute_peer_run(spec: RunSpec, report: Any = None) -> dict[str, Any]:
    """Train, checkpoint, evaluate and record one peer run (in a worker process, one torch thread).

    Args:
        spec: The run (``spec.algo`` in :data:`PEER_ALGOS`, ``spec.hyperparameters`` the zoo's
            settings from :func:`peer_settings`).
        report: ``report(message)`` for the runner's progress display (``("start" | "progress",
            key, timesteps)``), or ``None``.

    Returns:
        The result record (the runner's keys), also written to ``result.json``.

    Raises:
        TrainingInterrupted: SIGINT/SIGTERM stopped it after writing a checkpoint.
    """
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.vec_env import VecNormalize

    from trpo_lab.agents.signals import StopRequest, TrainingInterrupted, stop_on_signals
    from trpo_lab.experiments.runner import SPEC_FILE, write_result

    say = report or (lambda message: None)
    settings = dict(spec.hyperparameters)
    cls = _algorithm_class(spec.algo)
    run_dir = spec.run_dir
    progress_path = run_dir / "progress.csv"
    state_path = run_dir / "checkpoint.json"
    gamma = float(settings.get("gamma", 0.99))

    def venv(n_envs: int, seed: int) -> Any:
        return make_vec_env(spec.env_id, n_envs=n_envs, seed=seed)

    stored = None
    if state_path.is_file() and (run_dir / "checkpoint.zip").is_file():
        try:
            stored = json.loads((run_dir / SPEC_FILE).read_text())
        except (OSError, ValueError):
            stored = None
    if stored == spec.settings():
        state = json.loads(state_path.read_text())
        env = venv(spec.n_envs, spec.seed + int(state["timesteps"]))
        if settings.get("normalize"):
            env = VecNormalize.load(str(run_dir / "vecnormalize.pkl"), env)
        model = cls.load(run_dir / "checkpoint.zip", env=env, device="cpu")
        _trim_progress(progress_path, int(state["timesteps"]))
        with progress_path.open(newline="") as fh:
            rows: list[dict[str, Any]] = list(csv.DictReader(fh))
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        atomic_write_text(run_dir / SPEC_FILE, json.dumps(spec.settings(), indent=2))
        env = venv(spec.n_envs, spec.seed)
        if settings.get("normalize"):
            env = VecNormalize(env, gamma=gamma)
        model = cls(settings.get("policy", "MlpPolicy"), env, seed=spec.seed, device="cpu", **_model_kwargs(settings))
        state = {"timesteps": 0, "wall_s": 0.0, "cpu_s": 0.0, "updates": 0}
        rows = []
    say(("start", spec.key, int(state["timesteps"])))
    stop = StopRequest()
    wall_before = float(state["wall_s"])
    cpu_before = float(state.get("cpu_s", math.nan))  # NaN: a checkpoint from before cpu_s was recorded
    updates_before = int(state["updates"])
    started, cpu_started = time.perf_counter(), time.process_time()

    def checkpoint(updates: int) -> None:
        model.save(run_dir / "checkpoint.zip")
        if isinstance(model.get_env(), VecNormalize):
            model.get_env().save(str(run_dir / "vecnormalize.pkl"))
        _write_progress(progress_path, rows)
        record = {"timesteps": model.num_timesteps, "wall_s": wall_before + time.perf_counter() - started,
                  "cpu_s": cpu_before + time.process_time() - cpu_started, "updates": updates}
        atomic_write_text(state_path, json.dumps(record))

    class Progress(BaseCallback):
        """A progress.csv row per rollout, a checkpoint every CHECKPOINT_EVERY steps, stop on a signal."""

        updates = updates_before
        next_checkpoint = (int(state["timesteps"]) // CHECKPOINT_EVERY + 1) * CHECKPOINT_EVERY

        def _on_step(self) -> bool:
            return stop.signum is None

        def _on_rollout_end(self) -> None:
            self.updates += 1
            episodes = [info["r"] for info in self.model.ep_info_buffer or ()]
            elapsed = time.perf_counter() - started
            rows.append({
                "timesteps": self.model.num_timesteps,
                "wall_s": round(wall_before + elapsed, 3),
                "return_mean": float(np.mean(episodes)) if episodes else math.nan,
                "episodes": len(episodes),
                "updates": self.updates,
                "fps": round((self.model.num_timesteps - int(state["timesteps"])) / max(elapsed, 1e-9), 1),
            })
            if self.model.num_timesteps >= self.next_checkpoint:
                checkpoint(self.updates)
                self.next_checkpoint += CHECKPOINT_EVERY
            say(("progress", spec.key, self.model.num_timesteps))

    callback = Progress()
    remaining = max(spec.total_timesteps - int(state["timesteps"]), 0)
    with stop_on_signals(stop):
        model.learn(remaining, callback=callback, reset_num_timesteps=False)
    if stop.signum is not None:
        # SB3 aborts the rollout in progress after counting its first step: go back to the last
        # whole rollout (the lost step is an env step nobody trained on; the env resets on resume).
        model.num_timesteps = int(rows[-1]["timesteps"]) if rows else int(state["timesteps"])
        checkpoint(callback.updates)
        raise TrainingInterrupted(f"{spec.key} stopped at {model.num_timesteps} steps, checkpointed", stop.signum)
    wall_s = wall_before + time.perf_counter() - started
    cpu_s = cpu_before + time.process_time() - cpu_started
    _write_progress(progress_path, rows)
    train_env = model.get_env()
    eval_env = venv(1, spec.seed + 10_000)
    if isinstance(train_env, VecNormalize):
        eval_env = VecNormalize(eval_env, training=False, norm_reward=False, gamma=gamma)
        eval_env.obs_rms = train_env.obs_rms
    eval_start = time.perf_counter()
    episode_returns, _ = evaluate_policy(
        model, eval_env, n_eval_episodes=spec.eval_episodes, deterministic=True, return_episode_rewards=True
    )
    returns = np.atleast_1d(np.asarray(episode_returns, dtype=np.float64))
    eval_s = time.perf_counter() - eval_start
    train_returns = [float(info["r"]) for info in model.ep_info_buffer or ()]
    model.save(run_dir / "final.zip")
    if isinstance(train_env, VecNormalize):
        train_env.save(str(run_dir / "vecnormalize.pkl"))
    train_env.close()
    eval_env.close()
    return write_result(
        spec, returns, timesteps=model.num_timesteps, updates=callback.updates, wall_s=wall_s,
        train_returns=train_returns, eval_s=eval_s, cpu_s=cpu_s,
    )

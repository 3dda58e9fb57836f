"""The checkpoint format of the on-policy agents: what is saved, how it is checked, how it loads.

A checkpoint is a ``torch.save`` of plain data and tensors (format :data:`CHECKPOINT_FORMAT`):
the networks, the optimizers' state, the counters, the random generators and the vector
environments' state at the rollout boundary, so that a resumed run repeats the uninterrupted
one exactly (sync envs on the CPU). Data-parallel checkpoints add ``ranks``: every rank's
own environments, samplers and recent episodes.

Untrusted files are read with ``torch.load(weights_only=True)`` and checked field by field
(:func:`read_checkpoint`); anything else is refused with a ``ValueError`` before any of it is
used. Files are written atomically (temporary file, fsync, rename) by
:func:`trpo_lab.logging.atomic_write_bytes`.
"""

from __future__ import annotations

import io
import math
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
import torch

from trpo_lab.envs import (
    EnvStateError,
    load_normalization_state,
    load_vector_env_state,
    normalization_state,
    to_numpy,
    to_tensors,
    vector_env_state,
)
from trpo_lab.logging import atomic_write_bytes
from trpo_lab.validation import first_line

if TYPE_CHECKING:
    from trpo_lab.agents.base import OnPolicyAgent

__all__ = [
    "CHECKPOINT_FORMAT",
    "CONFIG_TOML_KEYS",
    "check_config_toml",
    "space_signature",
    "read_checkpoint",
    "write_checkpoint",
    "constructor_arguments",
    "agent_state",
    "load_agent_state",
    "local_state",
    "load_local_state",
    "rank_state",
]

CHECKPOINT_FORMAT = "trpo_lab.agent/1"

# Top-level checkpoint fields and their types, checked before anything is used.
_CHECKPOINT_FIELDS: dict[str, tuple[type, ...]] = {
    "algo": (str,),
    "env_id": (str, type(None)),
    "n_envs": (int,),
    "seed": (int,),
    "config": (dict,),
    "observation_space": (dict,),
    "action_space": (dict,),
    "policy": (dict,),
    "optimizers": (dict,),
    "normalization": (dict,),
    "counters": (dict,),
    "episodes": (dict,),
    "rng": (dict,),
}


def space_signature(space: gym.Space[Any]) -> dict[str, Any]:
    """Plain-data description of a space, stored in checkpoints to detect mismatched envs."""
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n)}
    if isinstance(space, gym.spaces.MultiDiscrete):
        return {"type": "MultiDiscrete", "nvec": [int(n) for n in np.asarray(space.nvec).reshape(-1)]}
    if isinstance(space, gym.spaces.Box):
        return {"type": "Box", "shape": [int(s) for s in space.shape]}
    if isinstance(space, gym.spaces.Dict):
        return {"type": "Dict", "spaces": {str(key): space_signature(sub) for key, sub in space.spaces.items()}}
    return {"type": type(space).__name__}


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``: tensors and plain data only).

    A file that holds anything else, such as a pickle whose ``__reduce__`` would run code,
    is refused before any of it is executed.

    Raises:
        ValueError: missing, truncated, corrupt or foreign file, a file with Python objects
            other than tensors and plain data, or one whose fields are missing or mistyped.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"Cannot load checkpoint {path}: the file is empty")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says enough
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = _unpickling_detail(str(exc))
        if "GLOBAL" in detail:
            raise ValueError(
                f"Cannot load checkpoint {path}: refused, it refers to Python code or classes ({detail}); "
                "checkpoints may hold only tensors and plain data, and nothing in the file was run"
            ) from None
        raise ValueError(
            f"Cannot load checkpoint {path}: not a weights-only PyTorch checkpoint ({detail}); "
            "nothing in the file was run"
        ) from None
    except Exception as exc:  # torch raises many types for truncated or corrupt files
        raise ValueError(
            f"Cannot load checkpoint {path}: the file is truncated or corrupt ({first_line(exc).split('. ')[0]})"
        ) from None
    if not isinstance(data, dict) or not str(data.get("format", "")).startswith("trpo_lab.agent/"):
        raise ValueError(f"Cannot load checkpoint {path}: not a trpo_lab checkpoint (format {CHECKPOINT_FORMAT})")
    if data["format"] != CHECKPOINT_FORMAT:
        raise ValueError(
            f"Cannot load checkpoint {path}: format {data['format']!r}; "
            f"this version of trpo_lab reads {CHECKPOINT_FORMAT!r}"
        )
    for key, types in _CHECKPOINT_FIELDS.items():
        if key not in data:
            raise ValueError(f"Cannot load checkpoint {path}: field {key!r} is missing (damaged file?)")
        if isinstance(data[key], bool) or not isinstance(data[key], types):
            expected = " or ".join("None" if t is type(None) else t.__name__ for t in types)
            raise ValueError(
                f"Cannot load checkpoint {path}: field {key!r} is a {type(data[key]).__name__}; expected {expected}"
            )
    return data


def _unpickling_detail(message: str) -> str:
    """The informative line of torch's weights-only refusal (which GLOBAL or opcode it stopped at)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line:
            return line
    for line in lines:
        if line.startswith("Unsupported"):
            return line
    return lines[-1] if lines else "unpickling refused"


def write_checkpoint(data: Mapping[str, Any], *paths: Path | str) -> None:
    """Serialize ``data`` once and write it atomically to every path."""
    buffer = io.BytesIO()
    torch.save(dict(data), buffer)
    payload = buffer.getvalue()
    for path in paths:
        atomic_write_bytes(path, payload)


# ---------------------------------------------------------------------------- saving
def local_state(agent: OnPolicyAgent) -> dict[str, Any]:
    """What only this process knows: its environments at the rollout boundary, its samplers,
    its recent episodes and the per-env reward-normalization accumulators."""
    try:
        env_state, env_state_error = vector_env_state(agent.env), None
    except EnvStateError as exc:
        env_state, env_state_error = None, str(exc)
    return {
        "env_state": env_state,
        "env_state_error": env_state_error,
        "last_obs": None if agent._last_obs is None else _host_copy(agent._last_obs),
        "autoreset": _host_copy(agent._autoreset).to(torch.bool),
        "reset_seed": agent._reset_seed,
        "rng": {"generator": agent.generator.get_state(), "shuffle": agent.shuffle_generator.get_state()},
        "episodes": {"returns": list(agent.episode_returns), "lengths": list(agent.episode_lengths)},
        "normalization": to_tensors(normalization_state(agent.env)),
    }


def agent_state(agent: OnPolicyAgent, local: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint of ``agent`` (see :meth:`OnPolicyAgent.state_dict`)."""
    local = local_state(agent) if local is None else local
    guard = agent.guard
    return {
        "format": CHECKPOINT_FORMAT,
        "algo": agent.algo,
        "env_id": agent.env_id,
        "n_envs": agent.n_envs,
        "seed": agent.seed,
        "vectorization": agent.vectorization,
        "env_kwargs": agent.env_kwargs,
        "config": agent.config.to_dict(),
        "observation_space": space_signature(agent.observation_space),
        "action_space": space_signature(agent.action_space),
        "policy": agent.policy.state_dict(),
        "optimizers": agent._optimizer_states(),
        "normalization": local["normalization"],
        "counters": {
            "num_timesteps": agent.num_timesteps,
            "num_updates": agent.num_updates,
            "num_episodes": agent.num_episodes,
            "num_nonfinite_skipped": agent.num_nonfinite_skipped,
            "num_rejected_updates": guard.num_rejected,
            "consecutive_rejections": guard.consecutive,
            "reset_seed": local["reset_seed"],
            "wall_time": agent.wall_time,
            "cpu_time": agent.cpu_time,
            "schedule_total_timesteps": agent.schedule_total_timesteps,
        },
        "episodes": local["episodes"],
        "rng": local["rng"],
        "env_state": local["env_state"],
        "env_state_error": local["env_state_error"],
        "last_obs": local["last_obs"],
        "autoreset": local["autoreset"],
    }


# ---------------------------------------------------------------------------- loading
def _host_copy(value: Any) -> Any:
    """A CPU tensor copy of a numpy array or of a (torch vector env's, maybe device) tensor;
    a dict of them (a Dict observation) key by key."""
    if isinstance(value, dict):
        return {key: _host_copy(item) for key, item in value.items()}
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    return torch.from_numpy(np.array(value))


def _numpy_copy(value: Any) -> Any:
    """A writable numpy copy of a saved tensor (a dict of them key by key): the inverse of :func:`_host_copy`."""
    if isinstance(value, dict):
        return {key: _numpy_copy(item) for key, item in value.items()}
    return value.numpy().copy()


def config_toml(agent: OnPolicyAgent, total_timesteps: int | None = None) -> str:
    """The run's resolved configuration (``config.toml``): the constructor's settings and every hyperparameter."""
    import tomli_w

    data: dict[str, Any] = {
        "algo": agent.algo,
        "env": agent.env_id or "",
        "n_envs": agent.n_envs,
        "seed": agent.seed,
        "device": str(agent.device),
        "vectorization": agent.vectorization,
    }
    if total_timesteps is not None:
        data["total_timesteps"] = total_timesteps
    data["hyperparameters"] = _drop_none(agent.config.to_dict())
    return tomli_w.dumps(data)


CONFIG_TOML_KEYS = ("algo", "env", "n_envs", "seed", "device", "vectorization", "total_timesteps", "hyperparameters")
"""The keys :func:`config_toml` writes (and a resumed run reads)."""


def check_config_toml(data: Mapping[str, Any], path: str | Path) -> int | None:
    """Check a run's ``config.toml`` (perhaps edited by hand) before resuming from it.

    Returns:
        The recorded budget ``total_timesteps``, or ``None`` when the file has none.

    Raises:
        ValueError: an unknown key, an unknown or invalid hyperparameter, an unknown algorithm
            or a bad budget, naming the file.
    """
    from trpo_lab.config import config_class
    from trpo_lab.validation import check_int

    for key in data:
        if key not in CONFIG_TOML_KEYS:
            raise ValueError(f"Invalid {path}: unknown key {key!r}; expected some of {list(CONFIG_TOML_KEYS)}")
    budget = data.get("total_timesteps")
    if budget is not None:
        budget = check_int(f"total_timesteps in {path}", budget, minimum=1)
    try:
        if "algo" in data:
            cls = config_class(str(data["algo"]))
            hyperparameters = data.get("hyperparameters", {})
            if not isinstance(hyperparameters, Mapping):
                raise ValueError(f"[hyperparameters] must be a table, got {hyperparameters!r}")
            cls.from_dict(hyperparameters)
    except ValueError as exc:
        raise ValueError(f"Invalid {path}: {first_line(exc)}") from None
    return budget


def _drop_none(data: dict[str, Any]) -> dict[str, Any]:
    """TOML has no null: leave out unset optional values."""
    return {k: (_drop_none(v) if isinstance(v, dict) else v) for k, v in data.items() if v is not None}


def constructor_arguments(
    data: Mapping[str, Any], path: str | Path, env: Any, device: Any, overrides: Mapping[str, Any]
) -> tuple[Any, dict[str, Any]]:
    """The environment and keyword arguments that rebuild the checkpoint's agent.

    The checkpoint's own settings and hyperparameters, with ``overrides`` (constructor
    arguments or hyperparameters) applied; ``env`` defaults to the checkpoint's env id and
    ``device`` to ``"cpu"``.

    Raises:
        ValueError: the agent was trained on a custom env factory and no ``env`` is given.
    """
    env = env if env is not None else data["env_id"]
    if env is None:
        raise ValueError(f"Checkpoint {path} was trained on a custom env factory; pass env= to load it")
    kwargs: dict[str, Any] = {
        "n_envs": data["n_envs"],
        "seed": data["seed"],
        "vectorization": data.get("vectorization", "sync"),
        "env_kwargs": data.get("env_kwargs") or None,
        "device": device or "cpu",
    }
    from trpo_lab.config import merge_hyperparameters

    config = dict(data["config"])
    kwargs.update({key: value for key, value in overrides.items() if key not in config})
    config = merge_hyperparameters(config, {key: value for key, value in overrides.items() if key in config})
    return env, {**kwargs, **config}


def _check_fits(agent: OnPolicyAgent, data: Mapping[str, Any]) -> None:
    """Refuse a checkpoint of other spaces or network shapes before anything is changed."""
    for key, space in (("observation_space", agent.observation_space), ("action_space", agent.action_space)):
        if data[key] != space_signature(space):
            raise ValueError(f"Checkpoint {key} {data[key]} does not match the environment's {space_signature(space)}")
    own = agent.policy.state_dict()
    saved = data["policy"]
    if set(saved) != set(own):
        extra, missing = sorted(set(saved) - set(own)), sorted(set(own) - set(saved))
        raise ValueError(
            f"Checkpoint policy does not fit this network: extra parameters {extra}, missing {missing} "
            "(another policy_kwargs.net_arch?)"
        )
    for name, tensor in own.items():
        if not isinstance(saved[name], torch.Tensor) or saved[name].shape != tensor.shape:
            shape = tuple(saved[name].shape) if isinstance(saved[name], torch.Tensor) else type(saved[name]).__name__
            raise ValueError(
                f"Checkpoint policy parameter {name!r} has shape {shape}; this network needs {tuple(tensor.shape)}"
            )


def _restore_samplers_and_episodes(agent: OnPolicyAgent, state: Mapping[str, Any]) -> None:
    agent.generator.set_state(state["rng"]["generator"])
    agent.shuffle_generator.set_state(state["rng"]["shuffle"])
    agent.episode_returns.clear()
    agent.episode_lengths.clear()
    agent.episode_returns.extend(float(r) for r in state["episodes"]["returns"])
    agent.episode_lengths.extend(float(n) for n in state["episodes"]["lengths"])


def load_agent_state(agent: OnPolicyAgent, data: Mapping[str, Any]) -> None:
    """Restore :func:`agent_state` into ``agent`` (see :meth:`OnPolicyAgent.load_state_dict`).

    Raises:
        ValueError: the checkpoint does not fit this agent (checked before anything changes)
            or a field is damaged.
    """
    _check_fits(agent, data)
    try:
        agent.policy.load_state_dict(data["policy"])
        agent._load_optimizer_states(data["optimizers"])
        load_normalization_state(agent.env, to_numpy(data["normalization"]))
        counters = data["counters"]
        agent.num_timesteps = int(counters["num_timesteps"])
        agent.num_updates = int(counters["num_updates"])
        agent.num_episodes = int(counters["num_episodes"])
        agent.num_nonfinite_skipped = int(counters.get("num_nonfinite_skipped", 0))
        agent.guard.num_rejected = int(counters.get("num_rejected_updates", 0))
        agent.guard.consecutive = int(counters.get("consecutive_rejections", 0))
        agent.wall_time = float(counters["wall_time"])
        agent.cpu_time = float(counters.get("cpu_time", math.nan))  # not recorded before 2026-12-02
        total = counters.get("schedule_total_timesteps")
        agent.schedule_total_timesteps = None if total is None else int(total)
        agent._apply_schedules(agent.num_timesteps)
        _restore_samplers_and_episodes(agent, data)
    except (KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise ValueError(f"Checkpoint does not fit this {agent.algo or 'agent'}: {first_line(exc)}") from None
    _load_env_state(agent, data)


def _load_env_state(agent: OnPolicyAgent, data: Mapping[str, Any]) -> None:
    """Continue the saved environments, or start fresh ones (with a warning) when impossible."""
    if data["n_envs"] != agent.n_envs:  # e.g. evaluation with other env counts: not a continuation
        agent._last_obs, agent._reset_seed = None, agent.local_seed + agent.num_updates
        return
    reason = data.get("env_state_error") or "the checkpoint holds no environment state"
    if data.get("env_state") is not None:
        try:
            load_vector_env_state(agent.env, data["env_state"])
        except (EnvStateError, KeyError, TypeError) as exc:
            reason = str(exc)
        else:
            last_obs = data.get("last_obs")
            agent._last_obs = None if last_obs is None else _numpy_copy(last_obs)
            agent._autoreset = data["autoreset"].numpy().astype(bool)
            agent._reset_seed = int(data["counters"].get("reset_seed", agent.seed))
            return
    agent._last_obs, agent._reset_seed = None, agent.local_seed + agent.num_updates
    agent._autoreset = np.zeros(agent.n_envs, dtype=bool)
    warnings.warn(
        f"Resuming without the environments' state ({reason}); they restart from a fresh reset "
        f"with seed {agent._reset_seed}, so the run will not repeat the uninterrupted one exactly",
        stacklevel=4,
    )


def rank_state(data: Mapping[str, Any], rank: int, world_size: int) -> dict[str, Any] | None:
    """Rank ``rank``'s part of a data-parallel checkpoint, or ``None`` when it has none for it."""
    ranks = data.get("ranks")
    if isinstance(ranks, list) and len(ranks) == world_size and isinstance(ranks[rank], dict):
        own: dict[str, Any] = ranks[rank]
        return own
    return None


def load_local_state(agent: OnPolicyAgent, data: Mapping[str, Any], rank: int, world_size: int) -> None:
    """Restore this rank's part of a data-parallel checkpoint (``data["ranks"][rank]``), or
    start this rank's environments afresh when the checkpoint has none for it."""
    own = rank_state(data, rank, world_size)
    if own is not None:
        try:
            _restore_samplers_and_episodes(agent, own)
            load_normalization_state(agent.env, to_numpy(own["normalization"]))
        except (KeyError, TypeError, RuntimeError, ValueError) as exc:
            raise ValueError(
                f"Checkpoint rank {rank} state does not fit this {agent.algo or 'agent'}: {first_line(exc)}"
            ) from None
        _load_env_state(agent, {**own, "n_envs": data["n_envs"], "counters": {"reset_seed": own["reset_seed"]}})
    elif rank != 0:  # a checkpoint of fewer ranks: this rank starts new environments and samplers
        agent.generator.manual_seed(agent.local_seed + agent.num_updates)
        # The shuffle stream is shared by all ranks: keep rank 0's (restored from data["rng"]).
        agent.episode_returns.clear()
        agent.episode_lengths.clear()
        agent._last_obs, agent._reset_seed = None, agent.local_seed + agent.num_updates
        agent._autoreset = np.zeros(agent.n_envs, dtype=bool)

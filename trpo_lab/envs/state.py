"""Capture and restore a vector env's whole state, so a checkpointed run continues bit for bit."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import SyncVectorEnv, VectorEnv, VectorWrapper
from gymnasium.wrappers.vector import (
    NormalizeObservation,
    NormalizeReward,
    RecordEpisodeStatistics,
)

from trpo_lab.envs.guard import NonFiniteGuard, find_wrapper


# ---------------------------------------------------------------------------------- env state
def running_statistics(env: VectorEnv) -> dict[str, Any]:
    """The normalization wrappers' ``RunningMeanStd`` objects, by checkpoint name (``obs_rms``, ``return_rms``)."""
    stats: dict[str, Any] = {}
    obs_norm, rew_norm = find_wrapper(env, NormalizeObservation), find_wrapper(env, NormalizeReward)
    if obs_norm is not None:
        stats["obs_rms"] = obs_norm.obs_rms
    if rew_norm is not None:
        stats["return_rms"] = rew_norm.return_rms
    return stats


def normalize_observations(env: VectorEnv, obs: np.ndarray) -> np.ndarray:
    """Raw observations normalized as ``env``'s ``NormalizeObservation`` would (unchanged without one)."""
    wrapper = find_wrapper(env, NormalizeObservation)
    if wrapper is None:
        return obs
    rms = wrapper.obs_rms
    normalized: np.ndarray = ((obs - rms.mean) / np.sqrt(rms.var + wrapper.epsilon)).astype(np.float32)
    return normalized


def normalization_state(env: VectorEnv) -> dict[str, Any]:
    """Running statistics of the normalization wrappers, as plain numpy data (for checkpoints)."""
    state: dict[str, Any] = {}
    obs_norm = find_wrapper(env, NormalizeObservation)
    if obs_norm is not None:
        rms = obs_norm.obs_rms
        state["obs_rms"] = {"mean": np.array(rms.mean), "var": np.array(rms.var), "count": float(rms.count)}
    rew_norm = find_wrapper(env, NormalizeReward)
    if rew_norm is not None:
        rms = rew_norm.return_rms
        state["return_rms"] = {"mean": np.array(rms.mean), "var": np.array(rms.var), "count": float(rms.count)}
        state["accumulated_reward"] = np.array(rew_norm.accumulated_reward)
        state["prev_dones"] = np.array(rew_norm._prev_dones)
    return state


def load_normalization_state(env: VectorEnv, state: dict[str, Any]) -> None:
    """Restore statistics saved by :func:`normalization_state` into ``env``'s wrappers."""
    for key, wrapper_type, attr in (
        ("obs_rms", NormalizeObservation, "obs_rms"),
        ("return_rms", NormalizeReward, "return_rms"),
    ):
        wrapper = find_wrapper(env, wrapper_type)
        if key in state and wrapper is not None:
            rms = getattr(wrapper, attr)
            rms.mean = np.array(state[key]["mean"], dtype=rms.mean.dtype)
            rms.var = np.array(state[key]["var"], dtype=rms.var.dtype)
            rms.count = float(state[key]["count"])
    rew_norm = find_wrapper(env, NormalizeReward)
    if rew_norm is not None and "accumulated_reward" in state:
        rew_norm.accumulated_reward = np.array(state["accumulated_reward"], dtype=np.float32)
        if "prev_dones" in state:
            rew_norm._prev_dones = np.array(state["prev_dones"], dtype=np.float32)


ENV_STATE_FORMAT = "trpo_lab.vector_env_state/1"

# Attributes that describe an env rather than hold its state (or are rendering resources).
_SKIPPED_ATTRIBUTES = frozenset(
    {
        "env", "spec", "metadata", "render_mode", "action_space", "observation_space",
        "_action_space", "_observation_space", "_single_action_space", "_single_observation_space",
        "_metadata", "_cached_spec", "_saved_kwargs", "_previous_data", "_ezpickle_args", "_ezpickle_kwargs",
        "screen", "clock", "surf", "isopen", "viewer", "mujoco_renderer", "model",
    }
)


class EnvStateError(ValueError):
    """An environment whose state cannot be captured or restored (see :func:`vector_env_state`)."""


def _skipped_value(value: Any) -> bool:
    return (
        isinstance(value, (gym.Space, gym.envs.registration.EnvSpec, type))
        or callable(value) and not isinstance(value, np.ndarray)
        or type(value).__name__ in ("MjModel", "MjData", "MujocoRenderer")  # MjData: see _mujoco_state
    )


def _tensor_of(array: np.ndarray, where: str) -> torch.Tensor:
    try:
        return torch.from_numpy(np.array(array, copy=True))
    except TypeError as exc:
        raise EnvStateError(f"Cannot capture {where}: numpy dtype {array.dtype} has no tensor equivalent") from exc


def _encode(value: Any, where: str) -> Any:
    """Plain data for one attribute value (tensors, numbers, strings, lists, dicts)."""
    if isinstance(value, (np.str_, np.bytes_)):
        return {"__text_scalar__": {"dtype": np.asarray(value).dtype.str, "value": str(value.astype(str))}}
    if isinstance(value, np.generic):  # before float: np.float64 is a float subclass
        return {"__numpy_scalar__": _tensor_of(np.asarray(value), where)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "SU":  # e.g. FrozenLake's map
        return {"__text_ndarray__": {"dtype": value.dtype.str, "values": value.astype(str).tolist()}}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": _tensor_of(value, where)}
    if isinstance(value, np.random.Generator):
        return {"__rng__": value.bit_generator.state}
    if isinstance(value, (tuple, list)):
        key = "__tuple__" if isinstance(value, tuple) else "__list__"
        return {key: [_encode(item, f"{where}[{i}]") for i, item in enumerate(value)]}
    if isinstance(value, dict) and all(isinstance(k, (str, int)) for k in value):
        return {"__dict__": {k: _encode(v, f"{where}[{k!r}]") for k, v in value.items()}}
    raise EnvStateError(f"Cannot capture {where}: a {type(value).__module__}.{type(value).__name__} is not plain data")


def _decode(saved: Any, current: Any) -> Any:
    if not isinstance(saved, dict):
        return saved
    ((key, payload),) = saved.items()
    if key == "__ndarray__":
        return payload.numpy().copy()
    if key == "__numpy_scalar__":
        return payload.numpy()[()]
    if key == "__text_scalar__":
        return np.array(payload["value"], dtype=payload["dtype"])[()]
    if key == "__text_ndarray__":
        return np.array(payload["values"], dtype=payload["dtype"])
    if key == "__rng__":
        rng = current if isinstance(current, np.random.Generator) else np.random.default_rng()
        rng.bit_generator.state = payload
        return rng
    if key == "__tuple__":
        return tuple(_decode(item, None) for item in payload)
    if key == "__list__":
        return [_decode(item, None) for item in payload]
    return {k: _decode(v, None) for k, v in payload.items()}


def _attributes(obj: Any, where: str) -> dict[str, Any]:
    return {
        name: _encode(value, f"{where}.{name}")
        for name, value in vars(obj).items()
        if name not in _SKIPPED_ATTRIBUTES and not _skipped_value(value)
    }


def _restore_attributes(obj: Any, saved: Mapping[str, Any]) -> None:
    for name, value in saved.items():
        setattr(obj, name, _decode(value, getattr(obj, name, None)))


def _layers(env: gym.Env) -> list[Any]:
    layers = [env]
    while isinstance(layers[-1], gym.Wrapper):
        layers.append(layers[-1].env)
    return layers


def _mujoco_state(env: gym.Env) -> dict[str, Any] | None:
    """MuJoCo's integration state plus every fixed-size derived array (contact forces, body
    poses) that a step may read before it recomputes them."""
    data, model = getattr(env, "data", None), getattr(env, "model", None)
    if type(data).__name__ != "MjData":
        return None
    import mujoco

    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    integration = np.empty(mujoco.mj_stateSize(model, spec), dtype=np.float64)
    mujoco.mj_getState(model, data, integration, spec)
    arrays = {}
    for name in dir(data):
        if not name.startswith("_"):
            value = getattr(data, name, None)
            if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
                arrays[name] = torch.from_numpy(np.array(value, copy=True))
    return {"integration": torch.from_numpy(integration), "arrays": arrays}


def _load_mujoco_state(env: gym.Env, state: Mapping[str, Any]) -> None:
    import mujoco

    data, model = env.data, env.model  # type: ignore[attr-defined]
    mujoco.mj_setState(model, data, state["integration"].numpy(), mujoco.mjtState.mjSTATE_INTEGRATION)
    mujoco.mj_forward(model, data)
    for name, saved in state["arrays"].items():
        target = getattr(data, name, None)
        if isinstance(target, np.ndarray) and target.shape == tuple(saved.shape):
            target[...] = saved.numpy()


def _sub_env_state(env: gym.Env, where: str) -> dict[str, Any]:
    layers = _layers(env)
    return {
        "chain": [type(layer).__name__ for layer in layers],
        "attributes": [_attributes(layer, f"{where} {type(layer).__name__}") for layer in layers],
        "mujoco": _mujoco_state(layers[-1]),
    }


def _vector_wrappers(env: VectorEnv) -> list[VectorWrapper]:
    wrappers = []
    current: Any = env
    while isinstance(current, VectorWrapper):
        wrappers.append(current)
        current = current.env
    return wrappers


_STATELESS_VECTOR_WRAPPERS = (NonFiniteGuard, NormalizeObservation, NormalizeReward)  # normalization: see below


def _sync_base(env: VectorEnv, action: str) -> SyncVectorEnv:
    base = env.unwrapped
    if not isinstance(base, SyncVectorEnv):
        raise EnvStateError(
            f"Cannot {action} the state of a {type(base).__name__}: only a gymnasium SyncVectorEnv "
            "(vectorization='sync') exposes its sub-environments"
        )
    if not hasattr(base, "_autoreset_envs"):
        raise EnvStateError(f"Cannot {action} the state of this SyncVectorEnv: it has no autoreset flags")
    return base


def vector_env_state(env: VectorEnv) -> dict[str, Any]:
    """Everything ``env`` needs to continue exactly where it is, as plain data.

    Captured: each sub-environment's RNG state and every plain-data attribute of it and of
    its wrappers (classic control's ``state`` and ``steps_beyond_terminated``,
    ``TimeLimit._elapsed_steps``, ...), MuJoCo's simulation state, the vector env's
    autoreset flags, ``RecordEpisodeStatistics``' running counters and the normalization
    statistics.  Restore it with :func:`load_vector_env_state` into an env built the same way.

    Raises:
        EnvStateError: the env cannot be captured: not a ``SyncVectorEnv`` (async workers
            live in other processes), or a sub-environment or vector wrapper holds something
            that is not plain data (a physics engine object, a deque, ...).
    """
    base = _sync_base(env, "capture")
    state: dict[str, Any] = {
        "format": ENV_STATE_FORMAT,
        "num_envs": int(base.num_envs),
        "vector_wrappers": [type(w).__name__ for w in _vector_wrappers(env)],
        "autoreset": torch.from_numpy(np.array(base._autoreset_envs, dtype=np.bool_)),
        "envs": [_sub_env_state(sub_env, f"sub-environment {i}") for i, sub_env in enumerate(base.envs)],
        "normalization": to_tensors(normalization_state(env)),
        "wrapper_attributes": {},
    }
    for i, wrapper in enumerate(_vector_wrappers(env)):
        if isinstance(wrapper, RecordEpisodeStatistics):
            state["wrapper_attributes"][str(i)] = {
                "episode_returns": _tensor_of(wrapper.episode_returns, "episode_returns"),
                "episode_lengths": _tensor_of(wrapper.episode_lengths, "episode_lengths"),
                "prev_dones": _tensor_of(wrapper.prev_dones, "prev_dones"),
                "episode_count": int(wrapper.episode_count),
            }
        elif not isinstance(wrapper, _STATELESS_VECTOR_WRAPPERS):
            state["wrapper_attributes"][str(i)] = _attributes(wrapper, type(wrapper).__name__)
    return state


def load_vector_env_state(env: VectorEnv, state: Mapping[str, Any]) -> None:
    """Restore :func:`vector_env_state` into ``env`` (built the same way: same ids, wrappers, count).

    Everything is checked before anything is changed.

    Raises:
        EnvStateError: the state does not fit ``env`` (other env, wrappers or ``num_envs``)
            or ``env`` cannot be restored (see :func:`vector_env_state`).
    """
    base = _sync_base(env, "restore")
    if not isinstance(state, Mapping) or state.get("format") != ENV_STATE_FORMAT:
        raise EnvStateError(f"Not a vector env state (expected format {ENV_STATE_FORMAT})")
    if state["num_envs"] != base.num_envs:
        raise EnvStateError(f"The saved env state has {state['num_envs']} sub-environments, this env {base.num_envs}")
    wrappers = _vector_wrappers(env)
    names = [type(w).__name__ for w in wrappers]
    if list(state["vector_wrappers"]) != names:
        raise EnvStateError(f"The saved env state has vector wrappers {state['vector_wrappers']}, this env {names}")
    for i, (sub_env, saved) in enumerate(zip(base.envs, state["envs"])):
        chain = [type(layer).__name__ for layer in _layers(sub_env)]
        if list(saved["chain"]) != chain:
            raise EnvStateError(
                f"Sub-environment {i} is {' > '.join(chain)}; the saved state is of {' > '.join(saved['chain'])}"
            )
    for sub_env, saved in zip(base.envs, state["envs"]):
        layers = _layers(sub_env)
        for layer, attributes in zip(layers, saved["attributes"]):
            _restore_attributes(layer, attributes)
        if saved.get("mujoco") is not None:
            _load_mujoco_state(layers[-1], saved["mujoco"])
    base._autoreset_envs = state["autoreset"].numpy().astype(np.bool_)
    load_normalization_state(env, to_numpy(state["normalization"]))
    for key, attributes in state["wrapper_attributes"].items():
        wrapper = wrappers[int(key)]
        if isinstance(wrapper, RecordEpisodeStatistics):
            wrapper.episode_returns = attributes["episode_returns"].numpy().copy()
            wrapper.episode_lengths = attributes["episode_lengths"].numpy().copy()
            wrapper.prev_dones = attributes["prev_dones"].numpy().copy()
            wrapper.episode_count = int(attributes["episode_count"])
        else:
            _restore_attributes(wrapper, attributes)


def to_tensors(value: Any) -> Any:
    """Replace numpy arrays by tensors, recursively (checkpoints hold only tensors and plain data)."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value))
    if isinstance(value, dict):
        return {k: to_tensors(v) for k, v in value.items()}
    return value


def to_numpy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, Mapping):
        return {k: to_numpy(v) for k, v in value.items()}
    return value

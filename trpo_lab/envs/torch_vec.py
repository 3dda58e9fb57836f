"""The torch-native vector environment interface: Gymnasium's vector API with tensors.

GPU simulators (Isaac Lab, ManiSkill, Brax through its torch bridge, MJX) step thousands of
environments on the accelerator and hand back observations, rewards and done flags as device
tensors. trpo_lab takes such an environment as it is, with no host copy in the rollout, when
it follows this small interface, which is :class:`gymnasium.vector.VectorEnv`'s with tensors
in place of numpy arrays (what Gymnasium's own ``NumpyToTorch`` vector wrapper returns):

* ``num_envs``, ``single_observation_space``, ``single_action_space`` (Gymnasium spaces, used
  to build the policy and the buffer) and ``device`` (a :class:`torch.device`, the agent's);
* ``reset(seed=...) -> (obs, info)`` and ``step(actions) -> (obs, rewards, terminations,
  truncations, info)``: ``actions`` a tensor ``(num_envs, *action_shape)`` on ``device``;
  ``obs`` ``(num_envs, *obs_shape)`` float32, ``rewards`` float32 ``(num_envs,)``,
  ``terminations`` / ``truncations`` bool ``(num_envs,)``, all on ``device``;
* Gymnasium's ``NEXT_STEP`` autoreset (its default): the step that ends an episode returns the
  final observation; the next step ignores that environment's action and returns its reset
  observation, reward 0 and both flags false;
* optionally, episode statistics as tensors in ``info``: ``"episode_done"`` (bool, the
  environments whose episode ended at this step), ``"episode_return"`` and
  ``"episode_length"`` (float32, that episode's totals; any value where not done).

Nothing in a step may need the host: the rollout makes no host synchronisation per step with
such an environment (``tests/rollout/test_collector_torch_env.py`` counts them). The
environment's clipping of Box actions is its own business: actions are passed unclipped.
:class:`~trpo_lab.envs.torch_cartpole.TorchCartPole` is the reference implementation.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import gymnasium as gym
import torch
from torch import Tensor

__all__ = ["TorchVectorEnv", "is_torch_vector_env"]


@runtime_checkable
class TorchVectorEnv(Protocol):
    """A vector environment whose inputs and outputs are tensors on :attr:`device` (see the module docstring)."""

    num_envs: int
    device: torch.device
    single_observation_space: gym.Space[Any]
    single_action_space: gym.Space[Any]

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Tensor, dict[str, Any]]:
        """All environments' first observations ``(num_envs, *obs_shape)``."""
        ...

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[str, Any]]:
        """``(obs, rewards, terminations, truncations, info)``, every one a tensor on :attr:`device`."""
        ...

    def close(self) -> None:
        """Release the simulator."""
        ...


def is_torch_vector_env(env: object) -> bool:
    """Whether ``env`` steps on tensors (has a :class:`torch.device` ``device`` and the vector API)."""
    return isinstance(getattr(env, "device", None), torch.device) and isinstance(env, TorchVectorEnv)

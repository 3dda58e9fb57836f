r"""CartPole as a batched torch environment: thousands of copies stepping on the agent's device.

The cart-pole of Barto, Sutton & Anderson (1983) with the constants and rules of Gymnasium's
``CartPole-v1`` (force ±10 N, explicit Euler steps of 0.02 s, termination beyond
:math:`|x| > 2.4` or :math:`|θ| > 12°`, reward 1 per step including the last, truncation
after 500 steps), written as tensor operations over a batch of environments so that a
rollout never leaves the device. With :math:`F = ±10`, :math:`m_p l = 0.05`,
:math:`M = m_c + m_p = 1.1`:

.. math::

    a = \frac{F + m_p l\,\dot θ^2 \sin θ}{M}, \qquad
    \ddot θ = \frac{g \sin θ - a \cos θ}{l\,(4/3 - m_p \cos^2 θ / M)}, \qquad
    \ddot x = a - \frac{m_p l\, \ddot θ \cos θ}{M}

It follows :mod:`trpo_lab.envs.torch_vec`'s interface (Gymnasium's vector API with tensors,
``NEXT_STEP`` autoreset) and doubles as an example for wrapping a GPU simulator and as the
benchmark environment of ``benchmarks/gpu_update.py``::

    from trpo_lab import TRPO
    from trpo_lab.envs.torch_cartpole import TorchCartPole

    agent = TRPO(TorchCartPole(4096, device="cuda"), device="cuda", n_steps=32)
    agent.learn(2_000_000)

Its start states come from a torch generator on ``device``, so a seed gives the same episodes
on every run of one device (not the same as Gymnasium's numpy CartPole's).
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector.utils import batch_space
from torch import Tensor

from trpo_lab.validation import check_device, check_int

__all__ = ["TorchCartPole"]

GRAVITY = 9.8
CART_MASS = 1.0
POLE_MASS = 0.1
POLE_HALF_LENGTH = 0.5
FORCE = 10.0
TAU = 0.02
X_LIMIT = 2.4
THETA_LIMIT = 12 * 2 * math.pi / 360


class TorchCartPole(gym.vector.VectorEnv):
    """``num_envs`` cart-poles stepped together as tensors on ``device``.

    Args:
        num_envs: Number of environments, ``>= 1``.
        device: Where the state lives and the tensors are returned (``"auto"``: CUDA when available).
        max_episode_steps: Steps after which an episode is truncated. Default 500 (``CartPole-v1``).

    Raises:
        ValueError: for a bad ``num_envs``, ``device`` or ``max_episode_steps``.
    """

    metadata = {"autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP, "render_modes": []}

    def __init__(self, num_envs: int, device: str | torch.device = "cpu", max_episode_steps: int = 500) -> None:
        self.num_envs = check_int("num_envs", num_envs, minimum=1)
        self.device = check_device(device)
        self.max_episode_steps = check_int("max_episode_steps", max_episode_steps, minimum=1)
        high = np.array([X_LIMIT * 2, np.inf, THETA_LIMIT * 2, np.inf], dtype=np.float32)
        self.single_observation_space = gym.spaces.Box(-high, high, dtype=np.float32)
        self.single_action_space = gym.spaces.Discrete(2)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(0)
        zeros = torch.zeros(self.num_envs, device=self.device)
        self._state = torch.zeros(self.num_envs, 4, device=self.device)
        self._steps = zeros.clone()
        self._returns = zeros.clone()
        self._autoreset = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)

    def _start_states(self) -> Tensor:
        return torch.rand(self.num_envs, 4, generator=self._generator, device=self.device) * 0.1 - 0.05

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Tensor, dict[str, Any]]:
        """Start every environment anew (``seed`` reseeds the start-state generator)."""
        if seed is not None:
            self._generator.manual_seed(seed)
        self._state = self._start_states()
        self._steps.zero_()
        self._returns.zero_()
        self._autoreset.zero_()
        return self._state.clone(), {}

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[str, Any]]:
        """One step of every environment; ``actions`` ``(num_envs,)`` in {0, 1}, on ``device``."""
        x, x_dot, theta, theta_dot = self._state.unbind(-1)
        force = torch.where(actions.reshape(self.num_envs) == 1, FORCE, -FORCE)
        cos, sin = torch.cos(theta), torch.sin(theta)
        total_mass, pole_moment = CART_MASS + POLE_MASS, POLE_MASS * POLE_HALF_LENGTH
        accel = (force + pole_moment * theta_dot.square() * sin) / total_mass
        theta_acc = (GRAVITY * sin - cos * accel) / (
            POLE_HALF_LENGTH * (4.0 / 3.0 - POLE_MASS * cos.square() / total_mass)
        )
        x_acc = accel - pole_moment * theta_acc * cos / total_mass
        stepped = torch.stack(
            [x + TAU * x_dot, x_dot + TAU * x_acc, theta + TAU * theta_dot, theta_dot + TAU * theta_acc], dim=-1
        )
        resetting = self._autoreset
        state = torch.where(resetting.unsqueeze(-1), self._start_states(), stepped)
        moving = ~resetting
        terminated = moving & ((state[:, 0].abs() > X_LIMIT) | (state[:, 2].abs() > THETA_LIMIT))
        steps = torch.where(resetting, 0.0, self._steps + 1.0)
        truncated = moving & (steps >= self.max_episode_steps)
        rewards = moving.to(torch.float32)
        returns = torch.where(resetting, 0.0, self._returns + rewards)
        done = terminated | truncated
        self._state, self._steps, self._returns, self._autoreset = state, steps, returns, done
        info = {"episode_done": done, "episode_return": returns, "episode_length": steps}
        return state.clone(), rewards, terminated, truncated, info

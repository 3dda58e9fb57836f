"""Tiny tasks for checking that an agent learns from images and from Dict observations (no emulator needed).

:class:`VisualChoiceEnv` shows a bright square on the left or the right half of a dark
``size × size`` grayscale frame (uint8, ``size × size × 1``, channels last); the action says
which side (0 = left, 1 = right) and earns 1 when right, 0 when wrong. An episode is
``episode_length`` such choices (terminated at the end, never truncated), each with a new
side and square position, so a random policy scores ``episode_length / 2`` and a perfect
one ``episode_length``. The answer is in the pixels alone: the observation space is an
image, the optimal policy needs no memory.

:class:`DictChoiceEnv` is the same kind of choice from a ``Dict`` observation (a position
and a target index), whose answer needs both keys.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from numpy.typing import NDArray

from trpo_lab.validation import check_int

__all__ = ["DictChoiceEnv", "VisualChoiceEnv"]


class VisualChoiceEnv(gym.Env[NDArray[np.uint8], np.int64]):
    """Choose the side of the frame that shows the square.

    Args:
        size: Frame width and height in pixels (at least 36 for the Nature CNN).
        square: Side of the square in pixels.
        episode_length: Choices per episode.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, size: int = 40, square: int = 8, episode_length: int = 8) -> None:
        self.size = check_int("size", size, minimum=4)
        self.square = check_int("square", square, minimum=1)
        if 2 * self.square > self.size:
            raise ValueError(f"Invalid square: {square}; expected at most size / 2 = {self.size // 2}")
        self.episode_length = check_int("episode_length", episode_length, minimum=1)
        self.observation_space = gym.spaces.Box(0, 255, (self.size, self.size, 1), np.uint8)
        self.action_space = gym.spaces.Discrete(2)
        self._side = 0
        self._t = 0

    def _frame(self) -> NDArray[np.uint8]:
        self._side = int(self.np_random.integers(2))
        half = self.size // 2
        row = int(self.np_random.integers(self.size - self.square + 1))
        col = int(self.np_random.integers(half - self.square + 1)) + self._side * half
        frame = np.zeros((self.size, self.size, 1), dtype=np.uint8)
        frame[row : row + self.square, col : col + self.square] = 255
        return frame

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[NDArray[np.uint8], dict[str, Any]]:
        super().reset(seed=seed)
        self._t = 0
        return self._frame(), {}

    def step(self, action: Any) -> tuple[NDArray[np.uint8], float, bool, bool, dict[str, Any]]:
        reward = float(int(action) == self._side)
        self._t += 1
        return self._frame(), reward, self._t >= self.episode_length, False, {}


class DictChoiceEnv(gym.Env[dict[str, Any], np.int64]):
    """Say on which side of a point its target lies, from a ``Dict`` observation.

    The observation is ``{"position": Box(-1, 1, (1,)), "target": Discrete(n_targets)}``: a
    point ``x`` and the index ``k`` of a target whose location ``c_k`` (evenly spaced in
    [-0.75, 0.75]) is fixed; the action says whether ``c_k`` is left (0) or right (1) of ``x``
    and earns 1 when right, 0 when wrong. Neither key alone gives the answer (every target
    lies on both sides of some positions), so a policy must combine them. An episode is
    ``episode_length`` such choices (terminated at the end), so a random policy scores
    ``episode_length / 2`` and a perfect one ``episode_length``.

    Args:
        n_targets: Number of targets (at least 2).
        episode_length: Choices per episode.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, n_targets: int = 3, episode_length: int = 8) -> None:
        self.n_targets = check_int("n_targets", n_targets, minimum=2)
        self.episode_length = check_int("episode_length", episode_length, minimum=1)
        self.centers = np.linspace(-0.75, 0.75, self.n_targets)
        self.observation_space = gym.spaces.Dict(
            {
                "position": gym.spaces.Box(-1.0, 1.0, (1,), np.float32),
                "target": gym.spaces.Discrete(self.n_targets),
            }
        )
        self.action_space = gym.spaces.Discrete(2)
        self._answer = 0
        self._t = 0

    def _observation(self) -> dict[str, Any]:
        position = float(self.np_random.uniform(-1.0, 1.0))
        target = int(self.np_random.integers(self.n_targets))
        self._answer = int(self.centers[target] > position)
        return {"position": np.array([position], dtype=np.float32), "target": np.int64(target)}

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        super().reset(seed=seed)
        self._t = 0
        return self._observation(), {}

    def step(self, action: Any) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        reward = float(int(action) == self._answer)
        self._t += 1
        return self._observation(), reward, self._t >= self.episode_length, False, {}

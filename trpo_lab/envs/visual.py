"""A tiny pixel task for checking that an agent learns from images (no emulator needed).

:class:`VisualChoiceEnv` shows a bright square on the left or the right half of a dark
``size × size`` grayscale frame (uint8, ``size × size × 1``, channels last); the action says
which side (0 = left, 1 = right) and earns 1 when right, 0 when wrong. An episode is
``episode_length`` such choices (terminated at the end, never truncated), each with a new
side and square position, so a random policy scores ``episode_length / 2`` and a perfect
one ``episode_length``. The answer is in the pixels alone: the observation space is an
image, the optimal policy needs no memory.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from numpy.typing import NDArray

from trpo_lab.validation import check_int

__all__ = ["VisualChoiceEnv"]


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

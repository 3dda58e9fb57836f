"""A synthetic continuous-control env and batch for update benchmarks (no physics needed)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch

from trpo_lab.rollout.buffer import RolloutBatch


class SyntheticControl(gym.Env):
    """HalfCheetah-sized spaces (17-d observations, 6-d actions) with random dynamics."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (17,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (6,), np.float32)

    def reset(self, *, seed=None, options=None):  # type: ignore[no-untyped-def]
        super().reset(seed=seed)
        return self.np_random.normal(size=17).astype(np.float32), {}

    def step(self, action):  # type: ignore[no-untyped-def]
        obs = self.np_random.normal(size=17).astype(np.float32)
        return obs, float(-np.square(action).sum()), False, False, {}


def synthetic_batch(n: int, device: torch.device | str, seed: int = 0) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    batch = RolloutBatch(
        observations=torch.randn(n, 17, generator=g),
        actions=torch.randn(n, 6, generator=g),
        log_probs=torch.zeros(n),
        values=torch.randn(n, generator=g),
        advantages=torch.randn(n, generator=g),
        returns=torch.randn(n, generator=g),
    )
    return RolloutBatch(*(t.to(device) for t in batch))

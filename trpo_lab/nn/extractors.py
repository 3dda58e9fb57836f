"""Features per observation space: the one place that turns observations into network inputs.

Today there is one extractor, :class:`FlattenExtractor`: a ``Box`` observation is flattened
to a float32 vector, a ``Discrete`` one is encoded one-hot. It has no parameters, so adding
it to a policy leaves the policy's ``state_dict`` (and so its checkpoints) unchanged.
:meth:`FlattenExtractor.forward_numpy` is the same preprocessing on numpy arrays, for the
CPU rollout (tested equal to :meth:`FlattenExtractor.forward`).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from trpo_lab.nn.distributions import check_start

__all__ = ["FlattenExtractor", "make_extractor"]


class FlattenExtractor(nn.Module):
    """Flat features: ``Box`` observations flattened, ``Discrete`` ones one-hot, as float32.

    Args:
        observation_space: A ``Box`` (any shape) or a ``Discrete`` space starting at 0.

    Attributes:
        features_dim: Width of the features (the networks' input size).
        one_hot: Whether observations are ``Discrete`` indices encoded one-hot.

    Raises:
        ValueError: for any other observation space.
    """

    def __init__(self, observation_space: gym.Space) -> None:  # type: ignore[type-arg]
        super().__init__()
        if isinstance(observation_space, gym.spaces.Box):
            self.features_dim = int(np.prod(observation_space.shape))
            self.one_hot = False
        elif isinstance(observation_space, gym.spaces.Discrete):
            check_start(observation_space, "observation")
            self.features_dim = int(observation_space.n)
            self.one_hot = True
        else:
            raise ValueError(f"Unsupported observation space {observation_space}; supported: Box and Discrete")
        self._eye = np.eye(self.features_dim, dtype=np.float32) if self.one_hot else None

    def forward(self, obs: Tensor) -> Tensor:
        """Features ``(batch, features_dim)`` of a batch of raw observations."""
        if self.one_hot:
            return nn.functional.one_hot(obs.long().reshape(-1), self.features_dim).to(torch.float32)
        if obs.dim() != 2:
            obs = obs.reshape(obs.shape[0], -1)
        return obs if obs.dtype == torch.float32 else obs.to(torch.float32)

    def forward_numpy(self, obs: NDArray[np.generic]) -> NDArray[np.float32]:
        """:meth:`forward` on a numpy batch (a view of ``obs`` where no conversion is needed)."""
        if self._eye is not None:
            one_hot: NDArray[np.float32] = self._eye[obs.reshape(-1).astype(np.int64, copy=False)]
            return one_hot
        x = obs.reshape(obs.shape[0], -1)
        return x.astype(np.float32, copy=False)


def make_extractor(observation_space: gym.Space) -> FlattenExtractor:  # type: ignore[type-arg]
    """The feature extractor for an observation space (see :class:`FlattenExtractor`)."""
    return FlattenExtractor(observation_space)

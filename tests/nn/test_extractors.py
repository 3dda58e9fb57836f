"""Observation features: flattening and one-hot, in torch and numpy."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from trpo_lab.nn.extractors import FlattenExtractor, make_extractor


def test_box_observations_are_flattened_to_float32() -> None:
    extractor = make_extractor(gym.spaces.Box(-1, 1, (2, 3), np.float64))
    assert extractor.features_dim == 6 and not extractor.one_hot
    obs = np.arange(12, dtype=np.float64).reshape(2, 2, 3)
    features = extractor(torch.from_numpy(obs))
    assert features.shape == (2, 6) and features.dtype == torch.float32
    np.testing.assert_array_equal(extractor.forward_numpy(obs), features.numpy())


def test_discrete_observations_are_one_hot() -> None:
    extractor = make_extractor(gym.spaces.Discrete(5))
    assert extractor.features_dim == 5 and extractor.one_hot
    torch.testing.assert_close(extractor(torch.tensor([0, 4])), torch.eye(5)[[0, 4]])
    np.testing.assert_array_equal(extractor.forward_numpy(np.array([0, 4])), np.eye(5, dtype=np.float32)[[0, 4]])


def test_float32_box_features_are_a_view_in_numpy() -> None:
    obs = np.zeros((3, 4), np.float32)
    assert np.shares_memory(FlattenExtractor(gym.spaces.Box(-1, 1, (4,), np.float32)).forward_numpy(obs), obs)


@pytest.mark.parametrize(
    "space", [gym.spaces.Dict({"a": gym.spaces.Discrete(2)}), gym.spaces.MultiBinary(2), gym.spaces.Discrete(3, start=1)]
)
def test_unsupported_observation_spaces_raise(space: gym.Space) -> None:
    with pytest.raises(ValueError, match="Unsupported observation space"):
        make_extractor(space)


def test_the_extractor_adds_nothing_to_the_state_dict() -> None:
    assert FlattenExtractor(gym.spaces.Box(-1, 1, (4,))).state_dict() == {}

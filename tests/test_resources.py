"""Memory estimates (issue #18): each checked against what is actually allocated."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

from trpo_lab import resources
from trpo_lab.agents import agent_class
from trpo_lab.config import TRPOConfig
from trpo_lab.nn.policy import ActorCritic
from trpo_lab.optim import KFAC, Shampoo
from trpo_lab.rollout.buffer import RolloutBuffer

BOX = gym.spaces.Box(-1, 1, (5,), np.float32)


def _state_bytes(state: Any) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_bytes(v) for v in state)
    return 0


@pytest.mark.parametrize(
    ("value", "size"),
    [(1024, 1024), (1.5e3, 1500), ("8GB", 8 * 1000**3), ("512MiB", 512 * 1024**2), ("2g", 2 * 1000**3), (" 1.5 KiB ", 1536)],
)
def test_parse_memory(value: object, size: int) -> None:
    assert resources.parse_memory(value) == size


@pytest.mark.parametrize("value", ["lots", "8 parsecs", "-1GB", 0, -5, True, None, "GB"])
def test_parse_memory_refuses_what_is_not_a_size(value: object) -> None:
    with pytest.raises(ValueError, match=r"^Invalid max_memory: .*; expected a positive number of bytes"):
        resources.parse_memory(value)


def test_available_memory_is_known_on_this_machine() -> None:
    size, where = resources.available_memory("cpu")
    assert size is not None and size > 2**20 and where


def test_the_buffer_estimate_bounds_its_storage_and_counts_uint8_images_as_bytes() -> None:
    for obs_space, action_space in [(BOX, gym.spaces.Discrete(3)), (gym.spaces.Discrete(4), BOX)]:
        buffer = RolloutBuffer.for_spaces(obs_space, action_space, 32, 4)
        storage = sum(_state_bytes(getattr(buffer, name)) for name in (
            "observations", "actions", "log_probs", "values", "rewards", "terminated", "truncated", "valid",
            "advantages", "returns"))
        estimate = resources.buffer_bytes(obs_space, action_space, 32, 4)
        assert storage <= estimate <= 3 * storage  # the storage plus one flat batch copied from it
    image = gym.spaces.Box(0, 255, (84, 84, 4), np.uint8)
    assert resources.observation_bytes(image) == 84 * 84 * 4
    assert resources.observation_bytes(gym.spaces.Box(0, 1, (84, 84, 4), np.float32)) == 4 * 84 * 84 * 4
    assert resources.observation_bytes(gym.spaces.Dict({"image": image, "vector": BOX})) == 84 * 84 * 4 + 20


def test_the_network_estimate_counts_the_parameters_exactly_and_allocates_nothing() -> None:
    policy = ActorCritic(BOX, gym.spaces.Discrete(3), net_arch=[32, 16])
    parameters = sum(p.numel() * p.element_size() for p in policy.parameters())
    estimate = resources.network_bytes(policy, BOX, batch_size=10, optimizer_slots=2)
    assert estimate["parameters"] == estimate["gradients"] == parameters
    assert estimate["optimizer state"] == 2 * parameters
    # per sample: the float input 5 and its features 5, hidden 32 + 32 (activation) + 16 + 16, heads 3 and 1
    per_sample = 5 + 5 + (32 + 32 + 16 + 16 + 3) + (32 + 32 + 16 + 16 + 1)
    assert estimate["activations"] == 4 * resources.ACTIVATION_COPIES * per_sample * 10
    huge = resources.estimate_agent_memory(
        TRPOConfig(policy_kwargs={"net_arch": [100_000, 100_000]}), BOX, gym.spaces.Discrete(2), 8
    )  # on the meta device: 10^10 parameters estimated in no memory at all
    assert huge.parts["policy_kwargs.net_arch"]["parameters"] > 2 * 4 * 10**10


def test_the_kfac_estimate_bounds_the_factors_and_eigendecompositions_it_allocates() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 20), torch.nn.Tanh(), torch.nn.Linear(20, 3))
    optimizer = KFAC(model, lr=0.1, inverse_every=1)
    inputs = torch.randn(64, 6)
    with optimizer.track_statistics():
        model(inputs).pow(2).mean().backward()
    optimizer.step()
    allocated = _state_bytes(optimizer.state_dict()["state"])
    layer_factors = 4 * ((7**2 + 20**2) + (21**2 + 3**2))
    estimate = resources.kfac_bytes(model)
    assert allocated <= estimate and layer_factors * 3 <= estimate <= 5 * allocated


def test_the_shampoo_estimate_bounds_its_preconditioners() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(12, 30), torch.nn.Tanh(), torch.nn.Linear(30, 2000))
    optimizer = Shampoo(model.parameters(), lr=0.1, max_preconditioner_dim=1024)
    model(torch.randn(8, 12)).pow(2).mean().backward()
    optimizer.step()
    allocated = _state_bytes(optimizer.state_dict()["state"])
    estimate = resources.shampoo_bytes([p.shape for p in model.parameters()], max_preconditioner_dim=1024)
    assert allocated <= estimate <= 2 * allocated  # the 2000-wide axis is diagonal, not 2000 x 2000


def test_the_exact_fisher_estimate_is_the_dense_matrices() -> None:
    assert resources.exact_fisher_bytes(1000) == 3 * 1000 * 1000 * 4
    assert resources.exact_fisher_bytes(10, torch.float64) == 3 * 100 * 8


@pytest.mark.parametrize("algo", ["trpo", "ppo", "acktr"])
def test_an_agent_that_fits_builds_and_its_estimate_bounds_what_it_holds(algo: str) -> None:
    agent = agent_class(algo)("CartPole-v1", n_envs=2, n_steps=16, policy_kwargs={"net_arch": [32]})
    try:
        estimate = resources.estimate_agent_memory(agent.config, agent.observation_space, agent.action_space, 2)
        parameters = sum(p.numel() * p.element_size() for p in agent.policy.parameters())
        assert estimate.parts["policy_kwargs.net_arch"]["parameters"] == parameters
        assert estimate.total < 10 * 2**20
    finally:
        agent.close()


def test_the_error_suggests_a_size_that_does_fit() -> None:
    config = TRPOConfig(policy_kwargs={"net_arch": [4096, 4096]}, n_steps=8)
    limit = 50 * 2**20
    with pytest.raises(ValueError, match=r"net_arch \[(\d+), \d+\] would fit") as info:
        resources.check_agent_memory(config, BOX, gym.spaces.Discrete(2), 1, max_memory=limit)
    width = int(str(info.value).split("net_arch [")[-1].split(",")[0])
    fitted = config.replace(policy_kwargs={"net_arch": [width, width]})
    assert resources.check_agent_memory(fitted, BOX, gym.spaces.Discrete(2), 1, max_memory=limit).total <= limit
    wider = config.replace(policy_kwargs={"net_arch": [int(width * 1.1), int(width * 1.1)]})
    assert resources.estimate_agent_memory(wider, BOX, gym.spaces.Discrete(2), 1).total > limit


def test_rollout_budget_note() -> None:
    assert resources.rollout_budget_note(1000, 4, 250) is None
    assert resources.rollout_budget_note(100, 8, 2048) == (
        "the budget of 100 steps is less than one rollout (n_envs 8 x n_steps 2048 = 16384 steps): "
        "1 update of 16384 steps will run; lower n_steps to 12 to stay within it"
    )
    with pytest.raises(ValueError, match=r"^Invalid n_envs: 100000; expected at most the 100 steps of the budget"):
        resources.rollout_budget_note(100, 100_000, 1)

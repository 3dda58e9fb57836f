"""Image observations in the native agents: learning from pixels, uint8 storage, whole-network
K-FAC (extractor included), save -> load -> predict."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from trpo_lab import ACKTR, NPG, PPO, TRPO
from trpo_lab.agents.base import OnPolicyAgent
from trpo_lab.envs.visual import VisualChoiceEnv
from trpo_lab.nn.extractors import NatureCNN
from trpo_lab.optim import KFAC
from trpo_lab.optim.fisher import sampled_fisher_loss

ENV = functools.partial(VisualChoiceEnv, size=36)
SMALL = {"features_extractor_kwargs": {"features_dim": 32}, "net_arch": [16]}


@pytest.mark.slow
@pytest.mark.parametrize("cls", [TRPO, PPO, ACKTR], ids=["trpo", "ppo", "acktr"])
def test_defaults_learn_which_side_the_square_is_on(cls: type[OnPolicyAgent]) -> None:
    """The library's defaults for images (all but n_steps) learn the two-choice pixel task:
    a random policy scores 4 of 8, 20 evaluation episodes have a standard error of ~0.3."""
    agent = cls(ENV, n_envs=8, seed=0, n_steps=32)
    agent.learn(2048)
    assert agent.evaluate(20).mean() >= 6.0


@pytest.mark.slow
def test_acktr_with_amortised_statistics_learns_the_pixel_task() -> None:
    """The Fisher pass on every 4th update only (stats_every) still learns the two-choice pixel
    task, with the shared trunk the Atari presets use."""
    agent = ACKTR(
        ENV, n_envs=8, seed=0, n_steps=32, stats_every=4,
        policy_kwargs={"share_features_extractor": True, "net_arch": []},
    )
    agent.learn(4096)
    passes = agent.actor_optimizer.state[agent.policy.features_extractor.cnn[0].weight]["stat_updates"]
    assert agent.num_updates >= 16 and passes == -(-agent.num_updates // 4)  # updates 1, 5, 9, ...
    assert agent.evaluate(20).mean() >= 6.0


@pytest.mark.slow
@pytest.mark.parametrize("cls", [TRPO, PPO, ACKTR], ids=["trpo", "ppo", "acktr"])
def test_a_bfloat16_trunk_learns_the_pixel_task(cls: type[OnPolicyAgent]) -> None:
    """The defaults with the Nature CNN in bfloat16 (the Atari presets' setting) learn the
    two-choice pixel task as the float32 defaults do; ACKTR's K-FAC statistics and the
    weights stay float32."""
    agent = cls(ENV, n_envs=8, seed=0, n_steps=32, policy_kwargs={"features_extractor_kwargs": {"compute_dtype": "bfloat16"}})
    assert agent.policy.pi_features_extractor.compute_dtype == torch.bfloat16
    agent.learn(2048)
    assert agent.evaluate(20).mean() >= 6.0
    assert all(p.dtype == torch.float32 for p in agent.policy.parameters())
    if isinstance(agent, ACKTR):
        conv = agent.policy.pi_features_extractor.cnn[0]
        factors = agent.actor_optimizer.state[conv.weight]
        assert factors["A"].dtype == factors["G"].dtype == torch.float32
        assert torch.isfinite(factors["A"]).all() and torch.isfinite(factors["G"]).all()


def test_images_are_stored_as_uint8_on_the_agents_device() -> None:
    agent = PPO(ENV, n_envs=2, seed=0, n_steps=4, policy_kwargs=SMALL)
    agent.collect_rollout()
    assert agent.buffer.observations.dtype == torch.uint8
    assert agent.buffer.observations.shape == (4, 2, 36, 36, 1)
    assert agent.buffer.observations.device == agent.device
    assert agent.buffer.observations.max() == 255  # the frames themselves, not scaled copies
    assert agent.buffer.batch().observations.dtype == torch.uint8


def test_image_rollouts_act_through_the_torch_reference_path() -> None:
    agent = TRPO(ENV, n_envs=2, seed=0, n_steps=4, policy_kwargs=SMALL)
    assert type(agent.collector.actor()).__name__ == "TorchActor"


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (TRPO, {}),
        (NPG, {"curvature": "kfac"}),
        (PPO, {"policy_kwargs": {**SMALL, "share_features_extractor": True}}),
        (ACKTR, {"policy_kwargs": {**SMALL, "share_features_extractor": True}}),
        (ACKTR, {}),
        (ACKTR, {"policy_kwargs": {**SMALL, "features_extractor_kwargs": {"features_dim": 32, "compute_dtype": "bfloat16"}}}),
    ],
)
def test_save_load_predict_round_trip_with_images(tmp_path: Path, cls: type[OnPolicyAgent], kwargs: dict[str, Any]) -> None:
    kwargs = {"policy_kwargs": SMALL, **kwargs}
    agent = cls(ENV, n_envs=2, seed=0, n_steps=8, **kwargs)
    agent.learn(32)
    agent.save(tmp_path / "agent.pt")
    loaded = cls.load(tmp_path / "agent.pt", env=ENV)
    obs = np.stack([agent.observation_space.sample() for _ in range(8)])
    np.testing.assert_array_equal(agent.predict(obs), loaded.predict(obs))
    np.testing.assert_array_equal(agent.predict(obs[0]), loaded.predict(obs[0]))
    for p, q in zip(agent.policy.state_dict().values(), loaded.policy.state_dict().values(), strict=True):
        assert torch.equal(p, q)
    dtypes = [[m.compute_dtype for m in a.policy.modules() if isinstance(m, NatureCNN)] for a in (agent, loaded)]
    assert dtypes[0] == dtypes[1] and dtypes[0]


@pytest.mark.parametrize("share", [False, True])
def test_acktr_preconditions_every_conv_and_linear_layer(share: bool) -> None:
    agent = ACKTR(ENV, n_envs=2, seed=0, n_steps=8, policy_kwargs={**SMALL, "share_features_extractor": share})
    agent.learn(16)
    layers = [m for m in agent.policy.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    owners = {"actor": agent.actor_optimizer, "critic": agent.critic_optimizer}
    for layer in layers:
        having = [name for name, opt in owners.items() if "A" in opt.state.get(layer.weight, {})]
        assert len(having) == 1, f"{layer} has K-FAC factors in {having}"
        fan_in = layer.weight[0].numel() + 1
        assert owners[having[0]].state[layer.weight]["A"].shape == (fan_in, fan_in)
    if share:  # the trunk belongs to the actor's KFAC: the joint Fisher and the actor's KL clip
        trunk = agent.policy.features_extractor
        assert all("A" in agent.actor_optimizer.state[m.weight] for m in trunk.modules() if isinstance(m, nn.Conv2d))


def test_acktr_trunk_factors_are_those_of_the_joint_fisher_through_module_hooks() -> None:
    """The hook-free Fisher pass (traced forward, K-FAC fed by autograd.grad) records the same
    factors for the shared CNN's layers as K-FAC's own module hooks on the joint Fisher loss,
    policy term plus value Gauss-Newton term (OpenAI baselines' vf_fisher_coef = 1)."""
    kwargs = {"policy_kwargs": {**SMALL, "share_features_extractor": True}}
    agent = ACKTR(ENV, n_envs=4, seed=0, n_steps=8, **kwargs)
    agent.collect_rollout()
    obs = agent.policy.preprocess(agent.buffer.batch().observations)
    state = agent.fisher_generator.get_state()
    agent.forward_with_fisher_pass(obs)

    policy, dist = agent.policy, agent.policy.distribution
    reference = KFAC(policy.features_extractor, lr=0.1)
    generator = torch.Generator()
    generator.set_state(state)
    with reference.track_statistics():
        dist_params, values = policy.dist_params_and_value(obs)
        sampled = dist.sample(dist_params.detach(), generator)
        fisher = sampled_fisher_loss(lambda a: dist.log_prob(dist_params, a), sampled, values, generator)
        fisher.total().backward()
    for module in policy.features_extractor.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            for factor in ("A", "G"):
                torch.testing.assert_close(
                    agent.actor_optimizer.state[module.weight][factor], reference.state[module.weight][factor]
                )

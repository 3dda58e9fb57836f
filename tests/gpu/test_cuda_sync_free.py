"""On a GPU the CG loop and the batched line search make no host synchronisation.

Skipped without CUDA (CI has none); run on a GPU machine with `python -m pytest tests/gpu`.
"""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch

from trpo_lab.agents.trpo import TRPO
from trpo_lab.optim.cg import solve_cg
from trpo_lab.optim.line_search import kl_line_search

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _agent() -> TRPO:
    return TRPO(lambda: gym.make("Pendulum-v1"), n_envs=4, seed=0, device="cuda", n_steps=64, line_search_batched=True)


def test_buffer_and_gae_live_on_the_device() -> None:
    agent = _agent()
    agent.collect_rollout()
    assert agent.buffer.advantages.device.type == "cuda"
    assert agent.buffer.batch().observations.device.type == "cuda"


def test_cg_and_line_search_make_no_host_sync() -> None:
    agent = _agent()
    agent.collect_rollout()
    batch = agent.buffer.batch()
    policy = agent.policy
    obs = policy.preprocess(batch.observations)
    advantages = agent._advantages(batch)
    actor = policy.actor_parameters()
    with torch.no_grad():
        old = policy.dist_params(obs)
    grad = torch.randn(sum(p.numel() for p in actor), device="cuda")
    fvp = agent._fvp(obs, old, actor)
    step = agent.natural_step(obs, batch, advantages)
    evaluate = agent._evaluate_candidates(obs, batch, advantages)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        result = solve_cg(fvp, grad, max_iter=10, tol=1e-10)
        search = kl_line_search(
            actor, step.full_step.detach(), evaluate, loss0=step.loss0,
            expected_improvement=step.expected_improvement.detach(), kl_limit=0.01, batched=True,
        )
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(result.x).all()
    assert bool(search.kl <= 0.01)


def test_trpo_trains_on_cuda() -> None:
    agent = _agent()
    agent.learn(2_000)
    assert all(torch.isfinite(p).all() for p in agent.policy.parameters())

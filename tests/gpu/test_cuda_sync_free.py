"""On a GPU the sync-free path makes no host synchronisation: CUDA's own sync-debug mode agrees
with :class:`~trpo_lab.testing.HostSyncCounter`.

Skipped without CUDA (CI has none); run on a GPU machine with `python -m pytest tests/gpu`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import gymnasium as gym
import pytest
import torch

from trpo_lab.agents.trpo import TRPO
from trpo_lab.envs.torch_cartpole import TorchCartPole
from trpo_lab.optim.cg import solve_cg
from trpo_lab.testing import HostSyncCounter

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@contextmanager
def cuda_syncs_are_errors() -> Iterator[None]:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _agent(**kwargs: object) -> TRPO:
    return TRPO(lambda: gym.make("Pendulum-v1"), n_envs=4, seed=0, device="cuda", n_steps=64, **kwargs)  # type: ignore[arg-type]


def test_sync_free_is_the_default_on_cuda_and_the_buffer_lives_there() -> None:
    agent = _agent()
    assert agent.sync_free
    agent.collect_rollout()
    assert agent.buffer.advantages.device.type == "cuda"
    assert agent.buffer.batch().observations.device.type == "cuda"


def test_cg_makes_no_host_sync() -> None:
    agent = _agent()
    agent.collect_rollout()
    batch = agent.buffer.batch()
    policy = agent.policy
    obs = policy.preprocess(batch.observations)
    actor = policy.actor_parameters()
    with torch.no_grad():
        old = policy.dist_params(obs)
    grad = torch.randn(sum(p.numel() for p in actor), device="cuda")
    fvp = agent._fvp(obs, old, actor)
    with cuda_syncs_are_errors():
        result = solve_cg(fvp, grad, max_iter=10, tol=1e-10)
    assert torch.isfinite(result.x).all()


@pytest.mark.parametrize("critic_optimizer", ["adam", "lbfgs"])
def test_whole_update_makes_no_host_sync(critic_optimizer: str) -> None:
    agent = _agent(critic_optimizer=critic_optimizer)
    agent.collect_rollout()
    batch = agent.buffer.batch()
    agent.update(batch)  # warm-up: lazy optimizer state, cuBLAS handles
    with HostSyncCounter() as counter, cuda_syncs_are_errors():
        metrics = agent.update(batch)
    assert counter.count == 0, counter.report()
    assert all(torch.isfinite(torch.as_tensor(value)).all() for value in metrics.values())


def test_torch_cartpole_rollout_steps_make_no_host_sync() -> None:
    agent = TRPO(TorchCartPole(256, device="cuda"), device="cuda", n_steps=16, seed=0)
    agent.collect_rollout()
    env, actor = agent.env, agent.collector.actor()
    obs, _ = env.reset(seed=1)
    with cuda_syncs_are_errors(), torch.inference_mode():
        for _ in range(8):
            actions, _, _ = actor.act(obs)
            obs, *_ = env.step(actions)


def test_trpo_trains_on_cuda() -> None:
    agent = _agent()
    agent.learn(2_000)
    assert all(torch.isfinite(p).all() for p in agent.policy.parameters())


@pytest.mark.parametrize("target_kl", [None, 0.002])
def test_acktr_update_makes_no_host_sync(target_kl: float | None) -> None:
    """ACKTR's K-FAC on the device: no sync the counter sees in any update, and none at all in CUDA's
    sync-debug mode when no eigendecomposition is due (``torch.linalg.eigh`` reads its cuSOLVER error
    code on the host, the one sync a refresh makes and the dispatch-mode counter cannot see)."""
    from trpo_lab.agents.acktr import ACKTR

    env = lambda: gym.make("Pendulum-v1")  # noqa: E731
    agent = ACKTR(env, n_envs=4, seed=0, device="cuda", n_steps=16, inverse_every=10, target_kl=target_kl)  # type: ignore[arg-type]
    assert agent.sync_free and agent.actor_optimizer.sync_free
    agent.collect_rollout()
    batch = agent.buffer.batch()
    with HostSyncCounter() as counter:
        agent.update(batch)  # refreshes the eigendecompositions
    assert counter.count == 0, counter.report()
    agent.update(batch)  # warm-up of the non-refreshing path (lazy momentum buffers)
    with HostSyncCounter() as counter, cuda_syncs_are_errors():
        metrics = agent.update(batch)
    assert counter.count == 0, counter.report()
    assert all(torch.isfinite(torch.as_tensor(value)).all() for value in metrics.values())


def test_numpy_env_rollout_makes_one_pinned_copy_per_step() -> None:
    """A numpy env on a CUDA agent: each step's observations, rewards and flags arrive in one
    non-blocking copy from pinned memory; the only host reads are the actions the env needs."""
    agent = _agent()  # n_steps 64
    staging = agent.collector.staging
    assert staging is not None and staging.pinned and agent.collector.backend == "torch"
    agent.collect_rollout()
    before = staging.transfers
    with HostSyncCounter(count_host_reads=False) as counter:
        agent.collect_rollout()
    assert staging.transfers - before == 64 + 1
    blocking_uploads = [s for s in counter.syncs if "-> host" not in s.reason]
    assert not blocking_uploads, counter.report()
    reads = [s for s in counter.syncs if "-> host" in s.reason]
    assert len(reads) <= 64 + 4, counter.report()  # one per step (the actions), a few per rollout (GAE)

"""GAE against hand computations and the buffer's NEXT_STEP bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trpo_lab.rollout.buffer import RolloutBuffer, compute_gae, minibatches


def _column(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).reshape(-1, 1)


REWARDS = [1.0, 2.0, 3.0]
VALUES = [0.5, 1.0, 1.5]
NEXT_VALUES = [1.0, 1.5, 2.0]


@pytest.mark.parametrize(
    ("terminated", "truncated", "expected"),
    [
        # gamma = lambda = 0.5, worked by hand:
        # deltas = [1 + .5*1 - .5, 2 + .5*1.5 - 1, 3 + .5*2 - 1.5] = [1.0, 1.75, 2.5]
        ([0, 0, 0], [0, 0, 0], [1.0 + 0.25 * 2.375, 1.75 + 0.25 * 2.5, 2.5]),
        # truncation at t=1: delta_1 still bootstraps V(final obs) = 1.5, the chain is cut
        ([0, 0, 0], [0, 1, 0], [1.0 + 0.25 * 1.75, 1.75, 2.5]),
        # termination at t=1: delta_1 = 2 - 1 = 1, no bootstrap, chain cut
        ([0, 1, 0], [0, 0, 0], [1.0 + 0.25 * 1.0, 1.0, 2.5]),
    ],
)
def test_gae_matches_hand_computation(terminated: list[int], truncated: list[int], expected: list[float]) -> None:
    adv, ret = compute_gae(
        _column(REWARDS),
        _column(VALUES),
        _column(NEXT_VALUES),
        _column(terminated).bool(),
        _column(truncated).bool(),
        gamma=0.5,
        gae_lambda=0.5,
    )
    torch.testing.assert_close(adv, _column(expected))
    torch.testing.assert_close(ret, _column(expected) + _column(VALUES))


def _reference_gae(rewards, values, next_values, terminated, truncated, gamma, lam):  # type: ignore[no-untyped-def]
    """Scalar, per-environment backward recursion written independently of compute_gae."""
    steps, n_envs = rewards.shape
    out = np.zeros((steps, n_envs))
    for env in range(n_envs):
        acc = 0.0
        for t in reversed(range(steps)):
            if terminated[t, env]:
                delta = rewards[t, env] - values[t, env]
                acc = delta
            elif truncated[t, env]:
                delta = rewards[t, env] + gamma * next_values[t, env] - values[t, env]
                acc = delta
            else:
                delta = rewards[t, env] + gamma * next_values[t, env] - values[t, env]
                acc = delta + gamma * lam * acc
            out[t, env] = acc
    return out


@pytest.mark.parametrize(("gamma", "lam"), [(0.99, 0.95), (0.9, 1.0), (1.0, 0.0), (0.5, 0.7)])
def test_gae_matches_reference_on_random_episodes(gamma: float, lam: float) -> None:
    rng = np.random.default_rng(0)
    steps, n_envs = 17, 5
    rewards, values, next_values = (rng.normal(size=(steps, n_envs)) for _ in range(3))
    ends = rng.random((steps, n_envs))
    terminated = ends < 0.1
    truncated = (ends >= 0.1) & (ends < 0.2)
    adv, ret = compute_gae(
        *(torch.from_numpy(x) for x in (rewards, values, next_values, terminated, truncated)), gamma, lam
    )
    expected = _reference_gae(rewards, values, next_values, terminated, truncated, gamma, lam)
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ret.numpy(), expected + values, rtol=1e-12, atol=1e-12)


def test_buffer_finish_uses_next_slot_value_and_masks_invalid_slots() -> None:
    buffer = RolloutBuffer(3, 1, (1,), (), torch.long)
    # step 0: episode truncates; step 1: autoreset slot (invalid) holding V(final obs) = 7; step 2: new episode
    for t, (value, trunc, valid) in enumerate([(1.0, True, True), (7.0, False, False), (2.0, False, True)]):
        buffer.add(
            torch.tensor([[float(t)]]),
            torch.tensor([t]),
            torch.tensor([0.0]),
            torch.tensor([value]),
            torch.tensor([1.0 if valid else 0.0]),
            torch.tensor([False]),
            torch.tensor([trunc]),
            torch.tensor([valid]),
        )
    buffer.finish(torch.tensor([3.0]), gamma=0.5, gae_lambda=1.0)
    batch = buffer.batch()
    assert batch.size == 2
    torch.testing.assert_close(batch.actions, torch.tensor([0, 2]))
    # truncated step bootstraps the autoreset slot's value: 1 + 0.5 * 7 - 1
    # last step bootstraps last_values: 1 + 0.5 * 3 - 2
    torch.testing.assert_close(batch.advantages, torch.tensor([3.5, 0.5]))
    assert buffer.observations.shape == (3, 1, 1), "storage is never reshaped in place"


def test_buffer_overflow_and_early_finish_raise() -> None:
    buffer = RolloutBuffer(1, 1, (1,), (), torch.long)
    with pytest.raises(RuntimeError, match="finish"):
        buffer.finish(torch.zeros(1), 0.9, 0.9)
    args = [torch.zeros(1, 1), torch.zeros(1, dtype=torch.long)] + [torch.zeros(1)] * 3 + [torch.zeros(1, dtype=torch.bool)] * 3
    buffer.add(*args)
    with pytest.raises(RuntimeError, match="full"):
        buffer.add(*args)


def test_minibatches_partition_the_batch() -> None:
    buffer = RolloutBuffer(5, 4, (2,), (), torch.long)
    for t in range(5):
        buffer.add(
            torch.full((4, 2), float(t)),
            torch.arange(4) + 10 * t,
            torch.zeros(4),
            torch.zeros(4),
            torch.zeros(4),
            torch.zeros(4, dtype=torch.bool),
            torch.zeros(4, dtype=torch.bool),
            torch.ones(4, dtype=torch.bool),
        )
    buffer.finish(torch.zeros(4), 0.99, 0.95)
    batch = buffer.batch()
    seen = torch.cat([mb.actions for mb in minibatches(batch, 6, torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == sorted(batch.actions.tolist())
    assert len(list(minibatches(batch, 6))) == 4


def test_gae_takes_bool_or_float_flags_and_tensors_that_need_grad() -> None:
    """One implementation: the same bits for bool and 0/1 float done flags, and for inputs
    that require grad (the result is not differentiable)."""
    g = torch.Generator().manual_seed(0)
    rewards, values, next_values = (torch.randn(64, 5, generator=g) for _ in range(3))
    terminated, truncated = torch.rand(64, 5, generator=g) < 0.1, torch.rand(64, 5, generator=g) < 0.1
    reference = compute_gae(rewards, values, next_values, terminated, truncated, 0.99, 0.95)
    for flags in ((terminated, truncated), (terminated.float(), truncated.float())):
        result = compute_gae(rewards, values.clone().requires_grad_(), next_values.clone().requires_grad_(), *flags, 0.99, 0.95)
        for a, b in zip(result, reference):
            assert not a.requires_grad and torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_gae_keeps_the_dtype_of_the_rewards(dtype: torch.dtype) -> None:
    rewards, values, next_values = (torch.ones(4, 2, dtype=dtype) for _ in range(3))
    flags = torch.zeros(4, 2, dtype=torch.bool)
    adv, ret = compute_gae(rewards, values, next_values, flags, flags, 0.5, 1.0)
    assert adv.dtype == ret.dtype == dtype
    torch.testing.assert_close(adv[-1], torch.full((2,), 0.5, dtype=dtype))  # 1 + 0.5 * 1 - 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gae_on_the_device_equals_the_cpu_one() -> None:
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(32, 3, generator=g) for _ in range(3)] + [torch.rand(32, 3, generator=g) < 0.1 for _ in range(2)]
    cpu = compute_gae(*inputs, 0.99, 0.95)
    cuda = compute_gae(*(x.cuda() for x in inputs), 0.99, 0.95)
    for a, b in zip(cpu, cuda):
        assert b.device.type == "cuda"
        torch.testing.assert_close(a, b.cpu())


def test_put_observation_returns_the_stored_slot() -> None:
    buffer = RolloutBuffer(2, 3, (2,), (), torch.long)
    slot = buffer.put_observation(np.ones((3, 2), np.float32))
    assert isinstance(slot, np.ndarray) and np.shares_memory(slot, buffer.observations.numpy())
    args = [torch.zeros(3, dtype=torch.long)] + [torch.zeros(3)] * 3 + [torch.zeros(3, dtype=torch.bool)] * 3
    buffer.add(None, *args)
    torch.testing.assert_close(buffer.observations[0], torch.ones(3, 2))
    buffer.mark_truncated(0, np.array([False, True, False]))
    assert buffer.truncated[0].tolist() == [False, True, False]


def test_invalid_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="Invalid n_steps: 0"):
        RolloutBuffer(0, 1, (1,), (), torch.long)
    batch = RolloutBuffer(1, 1, (1,), (), torch.long).batch()
    with pytest.raises(ValueError, match="Invalid batch_size: 0; expected >= 1"):
        next(minibatches(batch, 0))

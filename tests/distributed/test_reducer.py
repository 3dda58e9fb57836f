"""The Reducer in one process: every method is the identity or the local computation."""

from __future__ import annotations

import torch

from trpo_lab.distributed import Reducer
from trpo_lab.rollout.buffer import RolloutBatch, minibatches


def _batch(size: int = 11) -> RolloutBatch:
    g = torch.Generator().manual_seed(0)
    return RolloutBatch(
        observations=torch.randn(size, 3, generator=g),
        actions=torch.randint(0, 2, (size,), generator=g),
        log_probs=torch.randn(size, generator=g),
        values=torch.randn(size, generator=g),
        advantages=torch.randn(size, generator=g),
        returns=torch.randn(size, generator=g),
    )


def test_shuffled_minibatches_equal_the_buffers_minibatches_in_one_process() -> None:
    batch = _batch()
    reducer = Reducer()
    reducer.share_batch_sizes(batch.size)
    ours = list(reducer.shuffled_minibatches(batch, 4, torch.Generator().manual_seed(7)))
    reference = list(minibatches(batch, 4, torch.Generator().manual_seed(7)))
    assert [total for _, total in ours] == [4, 4, 3]
    assert len(ours) == len(reference)
    for (mine, total), theirs in zip(ours, reference):
        assert total == mine.size
        for a, b in zip(mine, theirs):
            assert torch.equal(a, b)


def test_gather_and_replicated_are_the_identity_in_one_process() -> None:
    batch = _batch()
    reducer = Reducer()
    reducer.share_batch_sizes(batch.size)
    gathered = reducer.gather([batch.observations, batch.actions])
    assert gathered[0] is batch.observations and gathered[1] is batch.actions
    assert all(a is b for a, b in zip(reducer.gather_batch(batch), batch))
    assert reducer.replicated() is reducer
    assert (reducer.local_count, reducer.total_count) == (11, 11)
    assert reducer.minibatch_plan(11, 4) == [(0, 4, 4), (4, 8, 4), (8, 11, 3)]


def test_normalize_advantages_in_one_process_is_the_plain_formula() -> None:
    advantages = _batch().advantages
    expected = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    assert torch.equal(Reducer().normalize_advantages(advantages), expected)
    one = torch.tensor([3.0])
    assert torch.equal(Reducer().normalize_advantages(one), one)  # one sample: left unchanged


def test_grads_with_means_and_fvp_in_one_process() -> None:
    param = torch.nn.Parameter(torch.ones(2))
    param.grad = torch.tensor([1.0, 2.0])
    kl = torch.tensor(0.5)
    assert Reducer().grads([param], with_means=kl) is kl
    assert torch.equal(param.grad, torch.tensor([1.0, 2.0]))
    fvp = Reducer().fvp(lambda v: 2.0 * v, damping=0.1, local_count=3, total_count=3)
    torch.testing.assert_close(fvp(torch.tensor([1.0, -1.0])), torch.tensor([2.1, -2.1]))

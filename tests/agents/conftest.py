"""Fixtures shared by the agents' tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from trpo_lab.agents.metrics import update_seed

UpdateOnDrawnRows = Callable[[Any, int], tuple[dict[str, Any], Tensor, Tensor]]


@pytest.fixture
def update_on_drawn_rows() -> UpdateOnDrawnRows:
    """``(agent, count) -> (metrics, before, after)``: one rollout and update of ``agent``, with
    the distribution parameters before and after the update on the ``count`` rows that
    ``kl_batch_size = count`` draws for this update (the rows of ``kl_sample``'s generator)."""

    def run(agent: Any, count: int) -> tuple[dict[str, Any], Tensor, Tensor]:
        agent.collect_rollout()
        batch = agent.buffer.batch()
        obs = agent.policy.preprocess(batch.observations)
        generator = torch.Generator().manual_seed(update_seed(agent.local_seed, agent.num_updates))
        rows = torch.randperm(batch.size, generator=generator)[:count]
        with torch.no_grad():
            before = agent.policy.dist_params(obs)
        metrics = agent.update(batch)
        with torch.no_grad():
            after = agent.policy.dist_params(obs)
        return metrics, before[rows], after[rows]

    return run

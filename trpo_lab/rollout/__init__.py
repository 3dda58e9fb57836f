"""Collecting experience: the rollout buffer with GAE, and the one loop that steps the environments."""

from __future__ import annotations

from trpo_lab.rollout.buffer import RolloutBatch, RolloutBuffer, compute_gae, minibatches

__all__ = ["RolloutBatch", "RolloutBuffer", "compute_gae", "minibatches"]

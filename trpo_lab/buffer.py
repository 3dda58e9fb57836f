"""Deprecated location: the buffer lives in :mod:`trpo_lab.rollout.buffer` (re-exported here until imports move)."""

from __future__ import annotations

from trpo_lab.rollout.buffer import RolloutBatch, RolloutBuffer, compute_gae, minibatches

__all__ = ["RolloutBatch", "RolloutBuffer", "compute_gae", "minibatches"]

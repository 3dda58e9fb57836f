"""The loop's side of data-parallel training: what happens around each update, once per update.

:class:`DataParallel` is what the training loop holds (``agent.data_parallel``); the update
itself only talks to the :class:`~trpo_lab.distributed.reducer.Reducer`. In one process
(``context=None``) every method is the identity or the local computation. Under torchrun:

* :meth:`DataParallel.join` starts every rank from rank 0's parameters and normalization
  statistics (one broadcast each);
* :meth:`DataParallel.merge_normalization` merges the ranks' observation and return
  statistics after each rollout, exactly (one collective per statistic);
* :meth:`DataParallel.share_batch_sizes` tells every rank every rank's batch size;
* :meth:`DataParallel.logged_metrics` turns the update's metrics into sample-weighted means
  over ranks and the rollout statistics into ones over every rank's recent episodes (one
  bucket), and counts every rank's steps, episodes and skipped transitions;
* :meth:`DataParallel.agree_to_stop` makes every rank stop after the same update;
* :meth:`DataParallel.check_in_sync` checks every ``check_every`` updates that the ranks'
  parameters are still identical (:class:`~trpo_lab.distributed.context.RankDriftError`).

Nothing here knows about a particular algorithm.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from trpo_lab.distributed.context import DistributedContext
from trpo_lab.distributed.reducer import Reducer

__all__ = ["DataParallel", "RolloutCounts"]

_T = TypeVar("_T")
RunningStatistics = Mapping[str, Any]
"""Gymnasium ``RunningMeanStd`` objects (``mean``, ``var``, ``count``) by checkpoint name."""


def _rollout_metrics(returns_sum: float, returns_square: float, count: float, lengths_sum: float) -> dict[str, float]:
    mean = returns_sum / count if count else math.nan
    return {
        "rollout/return_mean": mean,
        "rollout/return_std": math.sqrt(max(returns_square / count - mean * mean, 0.0)) if count else math.nan,
        "rollout/length_mean": lengths_sum / count if count else math.nan,
    }


class RolloutCounts:
    """What one update adds to the run's counters, over every rank.

    Attributes:
        steps: Valid transitions of this update's batch.
        episodes: Episodes finished during this update's rollout.
        skipped: Non-finite transitions dropped during this update's rollout.
    """

    def __init__(self, steps: int, episodes: int, skipped: int) -> None:
        self.steps, self.episodes, self.skipped = steps, episodes, skipped


class DataParallel:
    """The per-update bookkeeping of a data-parallel run (identity in one process).

    Args:
        context: The process-group membership, or ``None`` for a single process.
        reducer: The agent's reducer (its :attr:`~Reducer.rank_sizes` are shared here).
    """

    def __init__(self, context: DistributedContext | None, reducer: Reducer) -> None:
        self.context = context
        self.reducer = reducer
        self._bases: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
        self._bytes_logged = 0

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run directory (rank 0, or the only process)."""
        return self.context is None or self.context.is_main

    @property
    def rank(self) -> int:
        return 0 if self.context is None else self.context.rank

    @property
    def world_size(self) -> int:
        return 1 if self.context is None else self.context.world_size

    # ------------------------------------------------------------------ start and normalization
    def join(self, policy: nn.Module, statistics: RunningStatistics, device: torch.device) -> None:
        """Start every rank from rank 0's parameters and normalization statistics.

        Raises:
            ValueError: ``device`` is not of the kind the process group reduces.
        """
        if self.context is None:
            return
        if device.type != self.context.device.type:
            raise ValueError(
                f"Invalid device: {device}; this data-parallel process group reduces "
                f"{self.context.device.type} tensors (gloo: cpu, nccl: cuda)"
            )
        self.context.broadcast_module_(policy)
        local = {name: (np.array(rms.mean), np.array(rms.var), float(rms.count)) for name, rms in statistics.items()}
        for name, (mean, var, count) in self.context.broadcast_object(local).items():
            rms = statistics[name]
            rms.mean, rms.var, rms.count = mean.astype(rms.mean.dtype), var.astype(rms.var.dtype), count
        self.mark_synced(statistics)
        self._bytes_logged = self.context.bytes_reduced

    def mark_synced(self, statistics: RunningStatistics) -> None:
        """Record the (identical on every rank) statistics as the base of the next merge."""
        self._bases = {
            name: (np.array(rms.mean, np.float64), np.array(rms.var, np.float64), float(rms.count))
            for name, rms in statistics.items()
        }

    def merge_normalization(self, statistics: RunningStatistics) -> None:
        """Merge the ranks' observation and return statistics (exact, see
        :meth:`~trpo_lab.distributed.context.DistributedContext.merge_running_mean_std_`)."""
        if self.context is None:
            return
        for name, rms in statistics.items():
            self._bases[name] = self.context.merge_running_mean_std_(rms, self._bases.get(name))

    # ------------------------------------------------------------------ each update
    def share_batch_sizes(self, local_size: int, n_steps: int, update_number: int) -> list[int]:
        """Every rank's number of valid transitions in this update's batch (one collective).

        Raises:
            ValueError: a rank has no valid transition (``n_steps * n_envs`` too small).
        """
        sizes = self.reducer.share_batch_sizes(local_size)
        empty = [rank for rank, size in enumerate(sizes) if size == 0]
        if empty:
            raise ValueError(
                f"Invalid n_steps: {n_steps}; rank(s) {empty} collected no valid transition "
                f"in update {update_number}; raise n_steps or n_envs"
            )
        return sizes

    def logged_metrics(
        self,
        metrics: Mapping[str, float],
        local_steps: int,
        episode_returns: Iterable[float],
        episode_lengths: Iterable[float],
        new_episodes: int,
        new_skipped: int,
    ) -> tuple[dict[str, float], dict[str, float], RolloutCounts]:
        """The update's metrics, the rollout statistics and the counts, over every rank.

        Data-parallel: sample-weighted means over ranks of ``metrics``, and mean / std of the
        returns and mean length over every rank's recent episodes, in one bucket; the counts
        add up every rank's (one process: ``local_steps``, the rollout's). Adds
        ``dist/bytes_reduced`` (this update's) and ``dist/world_size``.
        """
        returns = np.asarray(list(episode_returns), dtype=np.float64)
        lengths = np.asarray(list(episode_lengths), dtype=np.float64)
        if self.context is None:
            rollout = {
                "rollout/return_mean": float(returns.mean()) if returns.size else math.nan,
                "rollout/return_std": float(returns.std()) if returns.size else math.nan,
                "rollout/length_mean": float(lengths.mean()) if lengths.size else math.nan,
            }
            return dict(metrics), rollout, RolloutCounts(local_steps, new_episodes, new_skipped)
        keys = sorted(metrics)
        weight = self.reducer.local_count / self.reducer.total_count
        local = [metrics[k] * weight for k in keys] + [
            float(returns.sum()), float(np.square(returns).sum()), float(returns.size), float(lengths.sum()),
            float(new_episodes), float(new_skipped),
        ]
        summed = self.context.all_reduce_sum(
            torch.tensor(local, dtype=torch.float64, device=self.context.device)
        ).cpu().tolist()
        reduced = dict(zip(keys, summed[: len(keys)]))
        ret_sum, ret_square, count, len_sum, episodes, skipped = summed[len(keys):]
        reduced["dist/bytes_reduced"] = float(self.context.bytes_reduced - self._bytes_logged)
        reduced["dist/world_size"] = float(self.context.world_size)
        self._bytes_logged = self.context.bytes_reduced
        counts = RolloutCounts(self.reducer.total_count, int(episodes), int(skipped))
        return reduced, _rollout_metrics(ret_sum, ret_square, count, len_sum), counts

    def agree_to_stop(self, signum: int | None, halt: bool) -> tuple[int | None, bool]:
        """Whether any rank was signalled (which signal) or asked to stop (one collective)."""
        if self.context is None:
            return signum, halt
        flags = torch.tensor([float(signum or 0), float(halt)], dtype=torch.float64, device=self.context.device)
        any_signum, halt_any = self.context.all_reduce_max(flags).cpu().tolist()
        return (int(any_signum) if any_signum else None), bool(halt_any)

    def check_in_sync(self, policy: nn.Module, num_updates: int) -> None:
        """Every ``check_every`` updates: fail if the ranks' parameters differ."""
        if self.context is not None and num_updates % self.context.check_every == 0:
            self.context.check_in_sync(policy)

    # ------------------------------------------------------------------ checkpoints
    def gather_local_states(self, local_state: dict[str, Any]) -> list[Any] | None:
        """Every rank's local state on rank 0 (``None`` elsewhere); ``None`` in one process."""
        if self.context is None:
            return None
        return self.context.gather_object(local_state)

    def run_on_main(self, fn: Callable[[], _T]) -> _T:
        """``fn()`` on rank 0, its result (or ValueError) on every rank; ``fn()`` in one process."""
        return fn() if self.context is None else self.context.run_on_main(fn)

"""The Reducer: every cross-process reduction an update makes, behind one object.

An agent always holds one (``agent.reducer``). In one process every method is the identity
or the local computation, so a single-process update runs exactly the arithmetic it would
without data parallelism; under torchrun (``Reducer(context)``) each method is one
collective of one flat bucket over the ranks of the process group.

Ranks may hold different numbers of valid samples (autoreset slots are dropped), so batch
means are combined as sample-weighted sums: a rank contributes
``local_mean * n_local / n_global``. The counts default to those of the current update
batch, which the loop announces with :meth:`Reducer.share_batch_sizes`.

Fewer collectives: a loop of many small sequential steps (a critic's minibatch epochs, an
L-BFGS solve) would make one all-reduce per step. Instead, :meth:`Reducer.gather` fetches
the rows it needs from every rank once per update, and the loop runs on all of them with
:meth:`Reducer.replicated`, the identity reducer: every rank repeats the same arithmetic
on the same rows with the same (shared) shuffle stream, so they stay identical without
any further collective, which the loop's drift check verifies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from trpo_lab.distributed.context import DistributedContext, minibatch_plan
from trpo_lab.optim._flat import to_device_async

if TYPE_CHECKING:
    from trpo_lab.rollout.buffer import RolloutBatch

__all__ = ["Reducer"]


def standardize(advantages: Tensor) -> Tensor:
    """``(Â − mean) / (std + 1e-8)`` over this process's samples (unbiased std); unchanged for
    at most one sample. :meth:`Reducer.normalize_advantages` in one process; traceable by ``torch.compile``."""
    if advantages.numel() <= 1:
        return advantages
    return (advantages - advantages.mean()) / (advantages.std() + 1e-8)


class Reducer:
    """Sample-weighted reductions over the ranks of a data-parallel run (identity in one process).

    Args:
        context: The process-group membership, or ``None`` for a single process.
    """

    def __init__(self, context: DistributedContext | None = None) -> None:
        self.context = context
        self.rank_sizes: list[int] = [0]
        """Valid transitions of the current update batch on every rank (rank order)."""

    # ------------------------------------------------------------------ identity
    @property
    def rank(self) -> int:
        return 0 if self.context is None else self.context.rank

    @property
    def world_size(self) -> int:
        return 1 if self.context is None else self.context.world_size

    @property
    def is_distributed(self) -> bool:
        """Whether reductions cross processes (``world_size > 1``)."""
        return self.context is not None

    @property
    def local_count(self) -> int:
        """This rank's valid transitions in the current batch."""
        return self.rank_sizes[self.rank]

    @property
    def total_count(self) -> int:
        """Valid transitions of the current batch over all ranks."""
        return sum(self.rank_sizes)

    # ------------------------------------------------------------------ batch bookkeeping
    def share_batch_sizes(self, local_size: int) -> list[int]:
        """Learn every rank's number of valid transitions in this update's batch (one collective).

        Returns:
            The sizes in rank order (also kept as :attr:`rank_sizes`).
        """
        self.rank_sizes = [local_size] if self.context is None else self.context.rank_sizes(local_size)
        return self.rank_sizes

    def minibatch_plan(self, local_size: int, batch_size: int) -> list[tuple[int, int, int]]:
        """``(start, stop, global_size)`` of each minibatch of a shuffled local batch.

        One process: consecutive slices of ``batch_size`` (the last one smaller). Data-parallel:
        :func:`~trpo_lab.distributed.context.minibatch_plan`, the same number of minibatches on
        every rank, whatever its sample count, each about ``batch_size`` samples over all ranks.
        """
        if self.context is None:
            return [
                (start, min(start + batch_size, local_size), min(batch_size, local_size - start))
                for start in range(0, local_size, batch_size)
            ]
        return minibatch_plan(self.rank_sizes, self.rank, batch_size)

    def shuffled_minibatches(
        self, batch: RolloutBatch, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[RolloutBatch, int]]:
        """Shuffled minibatches of ``batch`` (:meth:`minibatch_plan`) and each one's size over all ranks.

        One permutation from ``generator`` (drawn on the CPU) and one gather per field per
        epoch; the minibatches are views of the shuffled batch.
        """
        if batch_size < 1:
            raise ValueError(f"Invalid batch_size: {batch_size}; expected >= 1")
        perm = to_device_async(torch.randperm(batch.size, generator=generator, device="cpu"), batch.device)
        shuffled = batch.index(perm)
        for start, stop, total_count in self.minibatch_plan(batch.size, batch_size):
            yield shuffled.slice(start, stop), total_count

    # ------------------------------------------------------------------ gathered work
    def gather(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Every rank's rows of each tensor, in rank order (one collective for all of them).

        Each tensor has this rank's :attr:`local_count` rows. One process: the tensors themselves.
        """
        if self.context is None:
            return list(tensors)
        return self.context.all_gather_rows(tensors, self.rank_sizes)

    def gather_batch(self, batch: RolloutBatch) -> RolloutBatch:
        """Every rank's transitions of ``batch`` as one batch, in rank order (one collective)."""
        return batch.from_tensors(self.gather(batch.tensors()))

    def replicated(self) -> Reducer:
        """The reducer for work that every rank repeats on :meth:`gather`-ed rows.

        The identity, with the current batch being all ranks' samples (``local_count ==
        total_count``). One process: this reducer itself.
        """
        if self.context is None:
            return self
        replica = Reducer()
        replica.rank_sizes = [self.total_count]
        return replica

    # ------------------------------------------------------------------ reductions
    def _counts(self, local_count: float | None, total_count: float | None) -> tuple[float, float]:
        if local_count is None or total_count is None:
            return float(self.local_count), float(self.total_count)
        return float(local_count), float(total_count)

    def mean(self, local_mean: Tensor, local_count: float | None = None, total_count: float | None = None) -> Tensor:
        """The mean over all ranks' samples from this rank's mean over ``local_count`` samples."""
        if self.context is None:
            return local_mean
        local, total = self._counts(local_count, total_count)
        return self.context.weighted_mean(local_mean, local, total)

    def grads(
        self,
        params: Sequence[Tensor],
        local_count: float | None = None,
        total_count: float | None = None,
        with_means: Tensor | None = None,
    ) -> Tensor | None:
        """Turn each ``p.grad`` of a local mean loss into the gradient of the mean over all ranks.

        One bucket, which also carries ``with_means`` (local means over the same samples) and
        returns their means over ranks. One process: nothing to do, ``with_means`` comes back.
        """
        if self.context is None:
            return with_means
        local, total = self._counts(local_count, total_count)
        return self.context.all_reduce_grads_(params, local, total, with_means)

    def sum(self, values: Tensor) -> Tensor:
        """Element-wise sum over ranks (one collective; ``values`` itself in one process)."""
        return values if self.context is None else self.context.all_reduce_sum(values)

    def max(self, values: Tensor) -> Tensor:
        """Element-wise maximum over ranks (one collective; ``values`` itself in one process)."""
        return values if self.context is None else self.context.all_reduce_max(values)

    def weighted_means(self, tensors: Sequence[Tensor], weights: Sequence[float]) -> list[Tensor]:
        """``Σ_r w_r t_r / Σ_r w_r`` for each tensor with its own per-rank weight (one bucket).

        For statistics that are means over a per-rank number of samples the other ranks do not
        know (K-FAC's factors: ``w`` = rows seen). One process: the tensors themselves.
        """
        if self.context is None:
            return list(tensors)
        return self.context.weighted_means(tensors, weights)

    def fvp(
        self, local_fvp: Callable[[Tensor], Tensor], damping: float, local_count: int, total_count: int
    ) -> Callable[[Tensor], Tensor]:
        """``v ↦ (Σ_r w_r H_r + damping·I) v`` from this rank's undamped product ``v ↦ H_r v``.

        ``w_r = local_count / total_count`` is the rank's share of the samples the products
        average over; the damping is added once, after the ranks' products are combined.
        """

        def fvp(vector: Tensor) -> Tensor:
            return self.mean(local_fvp(vector), local_count, total_count) + damping * vector

        return fvp

    def normalize_advantages(self, advantages: Tensor) -> Tensor:
        """``(Â − mean) / (std + 1e-8)``, mean and (unbiased) std over all ranks' samples.

        Left unchanged when there is at most one sample in all.
        """
        if self.context is None:
            return standardize(advantages)
        wide = advantages.to(torch.float64)
        count = torch.tensor(float(advantages.numel()), dtype=torch.float64, device=advantages.device)
        total, total_sum, total_square = self.sum(torch.stack([count, wide.sum(), wide.square().sum()]))
        if float(total) <= 1:
            return advantages
        mean = total_sum / total
        std = ((total_square - total * mean * mean) / (total - 1)).clamp_min(0.0).sqrt()
        normalized: Tensor = ((wide - mean) / (std + 1e-8)).to(advantages.dtype)
        return normalized

"""torch.distributed helpers for data-parallel on-policy training (torchrun).

The pattern is OpenAI baselines' TRPO-MPI: every rank steps its own environments, and
every quantity the update needs from the whole batch (gradients, each Fisher-vector
product inside CG, line-search losses and KLs, K-FAC factors, advantage statistics) is
all-reduced, or the rows themselves are gathered once so that every rank repeats the same
work on all of them (:meth:`DistributedContext.all_gather_rows`).  Each reduction sends one
flat bucket, never one call per tensor.  Ranks may hold different numbers of valid samples
(autoreset slots are dropped), so batch means are combined as sample-weighted sums: a rank
contributes ``local_mean * n_local / n_global``.

Every collective runs under the process group's timeout: a rank that dies or hangs makes
the others raise :class:`RankFailedError` (one line: which rank, which collective, the
timeout) instead of waiting forever.

The collectives are torch.distributed's: gloo for CPU tensors, nccl for CUDA ones.  Each
rank seeds its environments and samplers with :func:`rank_seed` (``seed + 1000 * rank``), so
ranks collect different data while rank 0's stream is the single-process one.

Nothing here knows about RL agents; :class:`DistributedContext` is what the agents hold.
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from trpo_lab.validation import first_line

__all__ = [
    "DistributedContext",
    "CollectiveTraffic",
    "init_distributed",
    "joined_process_group",
    "flatten",
    "unflatten_into",
    "rank_seed",
    "split_sizes",
    "minibatch_plan",
    "RANK_SEED_STRIDE",
    "RankDriftError",
    "RankFailedError",
]

_T = TypeVar("_T")

RANK_SEED_STRIDE = 1000
"""Rank ``r`` seeds its environments and samplers with ``seed + RANK_SEED_STRIDE * r``."""


class RankDriftError(RuntimeError):
    """The ranks' parameters differ: the data-parallel run is no longer in lock-step."""


class RankFailedError(RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or left the group."""


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s environments and samplers: ``seed + 1000 * rank``.

    Rank 0 keeps ``seed`` itself, so its environments see what a single process would.
    """
    return seed + RANK_SEED_STRIDE * rank


def _failure(rank: int, world_size: int, what: str, timeout_s: float, detail: str) -> RankFailedError:
    return RankFailedError(
        f"data-parallel rank {rank} of {world_size}: {what} failed: another rank failed, exited or did not "
        f"answer within the {timeout_s:g} s timeout ({detail[:200]})"
    )


def split_sizes(size: int, parts: int) -> list[int]:
    """Sizes of ``torch.tensor_split`` of ``size`` items into ``parts`` near-equal pieces."""
    base, extra = divmod(size, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def minibatch_plan(rank_sizes: Sequence[int], rank: int, batch_size: int) -> list[tuple[int, int, int]]:
    """Minibatches of a shuffled data-parallel batch that every rank can step through in lock-step.

    The batch over all ranks has ``N = Σ rank_sizes`` samples; it is cut into
    ``M = ceil(N / batch_size)`` minibatches (at most the smallest rank's size, so that no
    rank has an empty one), and each rank cuts its own samples into ``M`` near-equal pieces:
    minibatch ``j`` is the union of every rank's piece ``j``.  Every rank takes the same
    number of gradient steps whatever its sample count, which the all-reduces require.

    Returns:
        ``(start, stop, global_size)`` per minibatch: this rank's slice of its shuffled
        samples, and the minibatch's size over all ranks (the weight denominator).
    """
    total = sum(rank_sizes)
    parts = max(1, min(math.ceil(total / batch_size), min(rank_sizes)))
    own = split_sizes(rank_sizes[rank], parts)
    global_sizes = [sum(column) for column in zip(*(split_sizes(n, parts) for n in rank_sizes))]
    plan, start = [], 0
    for size, global_size in zip(own, global_sizes):
        plan.append((start, start + size, global_size))
        start += size
    return plan


def flatten(tensors: Iterable[Tensor]) -> Tensor:
    """Concatenate tensors into one flat bucket."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten_into(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    """Copy consecutive slices of ``flat`` back into ``tensors`` (in place)."""
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


@dataclass
class CollectiveTraffic:
    """What this rank has sent through all-reduces so far (for ``dist/bytes_reduced``).

    Attributes:
        bytes_reduced: Payload bytes of every all-reduce (gradients, FVPs, statistics...).
        reductions: Number of all-reduce calls.
    """

    bytes_reduced: int = 0
    reductions: int = 0


@dataclass(frozen=True)
class DistributedContext:
    """A process group membership and the reductions the agents need.

    Attributes:
        rank: This process's rank.
        world_size: Number of processes.
        device: Device of the tensors that are reduced (CPU for gloo, CUDA for nccl).
        timeout_s: The process group's collective timeout (for error messages).
        check_every: Updates between :meth:`check_in_sync` checks of the agents' parameters.
        traffic: Running counts of the bytes all-reduced.
    """

    rank: int
    world_size: int
    device: torch.device
    timeout_s: float = 120.0
    check_every: int = 10
    traffic: CollectiveTraffic = field(default_factory=CollectiveTraffic, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs and checkpoints."""
        return self.rank == 0

    @property
    def bytes_reduced(self) -> int:
        """Payload bytes this rank has all-reduced since the context was created."""
        return self.traffic.bytes_reduced

    def close(self) -> None:
        """Leave the process group (call once at the end of training)."""
        if dist.is_initialized():
            dist.destroy_process_group()

    @contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        """Turn a failed collective into one clear line (the backend's are many, and vary)."""
        try:
            yield
        except RuntimeError as exc:  # DistBackendError, DistNetworkError, gloo/nccl timeouts
            detail = first_line(exc)
            raise _failure(self.rank, self.world_size, what, self.timeout_s, detail) from None

    # -------------------------------------------------------------- reductions
    def _all_reduce(self, flat: Tensor, op: str) -> Tensor:
        with self._collective(f"all-reduce ({op})"):
            out = flat.detach().clone()
            dist.all_reduce(out, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        self.traffic.bytes_reduced += out.numel() * out.element_size()
        self.traffic.reductions += 1
        return out

    def all_reduce_sum(self, flat: Tensor) -> Tensor:
        """Sum of ``flat`` over ranks (returns a new tensor; one collective)."""
        return self._all_reduce(flat, "sum")

    def all_reduce_max(self, flat: Tensor) -> Tensor:
        """Element-wise maximum of ``flat`` over ranks (a new tensor; one collective)."""
        return self._all_reduce(flat, "max")

    def weighted_mean(self, local_mean: Tensor, local_weight: Tensor | float, total_weight: Tensor | float) -> Tensor:
        """``Σ_r local_mean_r * w_r / W``: the mean over all ranks' samples from per-rank means."""
        return self.all_reduce_sum(local_mean * (local_weight / total_weight))

    def all_reduce_grads_(
        self, params: Sequence[Tensor], local_weight: float, total_weight: float, with_means: Tensor | None = None
    ) -> Tensor | None:
        """Replace each ``p.grad`` by the sample-weighted mean over ranks (one bucket).

        ``with_means``, local means over the same samples (e.g. a minibatch's KL estimate),
        travel in the same bucket; their means over ranks are returned (else ``None``).
        """
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        extra = [] if with_means is None else [with_means.detach().reshape(-1).to(grads[0].dtype)]
        reduced = self.all_reduce_sum(flatten([*grads, *extra]) * (local_weight / total_weight))
        for p, g in zip(params, grads):
            if p.grad is None:
                p.grad = g
        size = sum(g.numel() for g in grads)
        unflatten_into(reduced[:size], [p.grad for p in params])  # type: ignore[misc]
        return None if with_means is None else reduced[size:].view_as(with_means)

    def weighted_means(self, tensors: Sequence[Tensor], weights: Sequence[float]) -> list[Tensor]:
        """``Σ_r w_r t_r / Σ_r w_r`` for each tensor ``t`` with its own weight ``w`` (one bucket).

        For statistics that are means over a per-rank number of samples which the other ranks
        do not know (K-FAC's factors: ``w`` = rows seen); the weights travel in the bucket.
        """
        scaled = [t.reshape(-1) * float(w) for t, w in zip(tensors, weights)]
        weight_slots = torch.tensor([float(w) for w in weights], dtype=tensors[0].dtype, device=tensors[0].device)
        summed = self.all_reduce_sum(torch.cat([*scaled, weight_slots]))
        totals = summed[-len(tensors):]
        out, offset = [], 0
        for i, t in enumerate(tensors):
            out.append((summed[offset : offset + t.numel()] / totals[i]).view_as(t))
            offset += t.numel()
        return out

    def all_gather_rows(self, tensors: Sequence[Tensor], rank_sizes: Sequence[int]) -> list[Tensor]:
        """Every rank's rows of each tensor, concatenated in rank order (one collective).

        ``tensors`` have ``rank_sizes[rank]`` rows each on this rank (any dtype that float64
        holds exactly: floats up to float64, integers below 2**53). They travel as one float64
        bucket per rank, padded to the largest rank's rows, and come back in their own dtypes.
        """
        local = rank_sizes[self.rank]
        longest = max(rank_sizes)
        widths = [t[0].numel() if t.shape[0] else math.prod(t.shape[1:]) for t in tensors]
        row = sum(widths)
        bucket = torch.zeros(longest, row, dtype=torch.float64, device=self.device)
        offset = 0
        for t, width in zip(tensors, widths):
            bucket[:local, offset : offset + width] = t.detach().reshape(local, width).to(self.device, torch.float64)
            offset += width
        buckets = [torch.empty_like(bucket) for _ in range(self.world_size)]
        with self._collective("all-gather"):
            dist.all_gather(buckets, bucket)
        self.traffic.bytes_reduced += bucket.numel() * bucket.element_size() * self.world_size
        self.traffic.reductions += 1
        rows = torch.cat([b[:n] for b, n in zip(buckets, rank_sizes)])
        out, offset = [], 0
        for t, width in zip(tensors, widths):
            out.append(rows[:, offset : offset + width].reshape(-1, *t.shape[1:]).to(t.device, t.dtype))
            offset += width
        return out

    def total_count(self, local_count: int) -> int:
        """Σ over ranks of an integer count (one collective, reads the result on the host)."""
        return int(self.all_reduce_sum(torch.tensor([float(local_count)], device=self.device)).item())

    def rank_sizes(self, local_count: int) -> list[int]:
        """Every rank's ``local_count``, in rank order (one collective of ``world_size`` numbers)."""
        slots = torch.zeros(self.world_size, dtype=torch.float64, device=self.device)
        slots[self.rank] = float(local_count)
        return [int(n) for n in self.all_reduce_sum(slots).cpu().tolist()]

    # -------------------------------------------------------------- synchronisation
    def broadcast_module_(self, module: nn.Module, src: int = 0) -> None:
        """Overwrite parameters and buffers with rank ``src``'s (one bucket)."""
        tensors = [*module.parameters(), *module.buffers()]
        if not tensors:
            return
        with torch.no_grad():
            flat = flatten(tensors).to(self.device)
            with self._collective("broadcast"):
                dist.broadcast(flat, src=src)
            unflatten_into(flat, tensors)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s picklable object on every rank (small, trusted, in-process data)."""
        holder = [obj if self.rank == src else None]
        with self._collective("broadcast"):
            dist.broadcast_object_list(holder, src=src)
        return holder[0]

    def run_on_main(self, fn: Callable[[], _T]) -> _T:
        """``fn()`` run on rank 0 only (e.g. reading a file only its machine has), its result
        sent to every rank; a ``ValueError`` it raises is raised on every rank, so no rank is
        left waiting in the next collective."""
        outcome: tuple[bool, Any] | None = None
        if self.is_main:
            try:
                outcome = (True, fn())
            except ValueError as exc:
                outcome = (False, str(exc))
        ok, value = self.broadcast_object(outcome)
        if not ok:
            raise ValueError(value)
        result: _T = value
        return result

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """Every rank's picklable ``obj`` in rank order on rank ``dst`` (``None`` elsewhere)."""
        holder: list[Any] | None = [None] * self.world_size if self.rank == dst else None
        with self._collective("gather"):
            dist.gather_object(obj, holder, dst=dst)
        return holder

    def check_in_sync(self, module: nn.Module, what: str = "parameters") -> None:
        """Fail loudly if the ranks' parameters differ (a cheap checksum, one collective).

        Raises:
            RankDriftError: naming the largest difference between ranks' checksums.
        """
        with torch.no_grad():
            flat = flatten(module.parameters()).to(torch.float64)
            positions = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
            checksum = torch.stack([flat.sum(), flat.abs().sum(), (flat * positions).sum()]).to(self.device)
            extremes = self.all_reduce_max(torch.cat([checksum, -checksum]))  # max and -min, one bucket
            spread = float((extremes[:3] + extremes[3:]).abs().max())
        if spread != 0.0:
            raise RankDriftError(
                f"Data-parallel ranks have drifted apart: {what} checksums differ by {spread:.3e} "
                f"(rank {self.rank} of {self.world_size}); the run cannot continue"
            )

    def merge_running_mean_std_(
        self, rms: Any, base: tuple[np.ndarray, np.ndarray, float] | None
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """Merge Gymnasium ``RunningMeanStd`` statistics across ranks, exactly.

        Every rank starts from the same synced statistics ``base`` (mean, var, count) and
        has since added its own observations.  Each rank's *new* moments are recovered by
        subtracting ``base`` from its running (count, Σx, Σx²), summed over ranks in one
        bucket, and combined with ``base``; all ranks end with identical statistics.

        Returns:
            The merged ``(mean, var, count)`` as stored in ``rms`` (in float64), the ``base``
            of the next merge.
        """
        mean, var, count = np.asarray(rms.mean, np.float64), np.asarray(rms.var, np.float64), float(rms.count)
        local = np.concatenate([[count], count * mean.ravel(), count * (var + mean**2).ravel()])
        if base is not None:
            b_mean, b_var, b_count = base
            local = local - np.concatenate([[b_count], b_count * b_mean.ravel(), b_count * (b_var + b_mean**2).ravel()])
        summed = self.all_reduce_sum(torch.from_numpy(local).to(self.device)).cpu().numpy()
        if base is not None:
            b_mean, b_var, b_count = base
            summed = summed + np.concatenate([[b_count], b_count * b_mean.ravel(), b_count * (b_var + b_mean**2).ravel()])
        total = summed[0]
        n = mean.size
        new_mean = (summed[1 : 1 + n] / total).reshape(mean.shape)
        new_var = np.maximum((summed[1 + n :] / total).reshape(mean.shape) - new_mean**2, 0.0)
        rms.mean = new_mean.astype(np.asarray(rms.mean).dtype)
        rms.var = new_var.astype(np.asarray(rms.var).dtype)
        rms.count = float(total)
        # The base is what the statistics hold now (e.g. float32 for gymnasium's vector
        # wrappers), so that a rank restored from a checkpoint continues with the same base.
        return np.asarray(rms.mean, np.float64), np.asarray(rms.var, np.float64), float(total)


_JOINED = False


def joined_process_group() -> bool:
    """Whether :func:`init_distributed` joined a process group in this process."""
    return _JOINED


def _mark_joined() -> None:
    global _JOINED
    _JOINED = True


def init_distributed(
    backend: str | None = None, timeout_s: float = 120.0, check_every: int = 10
) -> DistributedContext | None:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...).

    Returns ``None`` outside torchrun or with a world size of 1.  The backend defaults to
    nccl when CUDA is available and gloo otherwise.  ``timeout_s`` bounds every collective,
    so a rank that dies makes the others fail with an error instead of hanging.
    ``check_every`` is the number of updates between parameter drift checks.

    Raises:
        ValueError: a bad ``backend``, ``timeout_s`` or ``check_every``, or ``WORLD_SIZE``.
        RankFailedError: the other ranks did not join within ``timeout_s``.
    """
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"Invalid WORLD_SIZE: {os.environ['WORLD_SIZE']!r}; expected an integer") from None
    if not timeout_s > 0 or not math.isfinite(timeout_s):
        raise ValueError(f"Invalid timeout_s: {timeout_s!r}; expected a positive number of seconds")
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"Invalid check_every: {check_every!r}; expected an integer >= 1")
    if world_size <= 1:
        return None
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"Invalid backend: {backend!r}; expected 'gloo' (CPU) or 'nccl' (CUDA)")
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
            _mark_joined()
        except RuntimeError as exc:
            detail = first_line(exc)
            raise RankFailedError(
                f"data-parallel rank {os.environ.get('RANK', '?')} of {world_size}: joining the process group "
                f"failed within the {timeout_s:g} s timeout ({detail[:200]})"
            ) from None
    rank = dist.get_rank()
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    world = dist.get_world_size()
    return DistributedContext(
        rank=rank, world_size=world, device=device, timeout_s=timeout_s, check_every=check_every
    )

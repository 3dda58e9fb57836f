"""torch.distributed helpers for data-parallel on-policy training (torchrun).

The pattern is OpenAI baselines' TRPO-MPI: every rank steps its own environments, and
every quantity the update needs from the whole batch (gradients, each Fisher-vector
product inside CG, line-search losses and KLs, critic gradients, K-FAC factors,
advantage statistics) is all-reduced.  Each reduction sends one flat bucket, never one
call per tensor.  Ranks may hold different numbers of valid samples (autoreset slots are
dropped), so batch means are combined as sample-weighted sums: a rank contributes
``local_mean * n_local / n_global``.

Nothing here knows about RL agents; :class:`DistributedContext` is what the agents hold.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "DistributedContext",
    "init_distributed",
    "flatten",
    "unflatten_into",
    "RankDriftError",
]


class RankDriftError(RuntimeError):
    """The ranks' parameters differ: the data-parallel run is no longer in lock-step."""


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


@dataclass(frozen=True)
class DistributedContext:
    """A process group membership and the reductions the agents need.

    Attributes:
        rank: This process's rank.
        world_size: Number of processes.
        device: Device of the tensors that are reduced (CPU for gloo, CUDA for nccl).
    """

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs and checkpoints."""
        return self.rank == 0

    def close(self) -> None:
        """Leave the process group (call once at the end of training)."""
        if dist.is_initialized():
            dist.destroy_process_group()

    # -------------------------------------------------------------- reductions
    def all_reduce_sum(self, flat: Tensor) -> Tensor:
        """Sum of ``flat`` over ranks (returns a new tensor; one collective)."""
        out = flat.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def weighted_mean(self, local_mean: Tensor, local_weight: Tensor | float, total_weight: Tensor | float) -> Tensor:
        """``Σ_r local_mean_r * w_r / W``: the mean over all ranks' samples from per-rank means."""
        return self.all_reduce_sum(local_mean * (local_weight / total_weight))

    def all_reduce_grads_(self, params: Sequence[Tensor], local_weight: float, total_weight: float) -> None:
        """Replace each ``p.grad`` by the sample-weighted mean over ranks (one bucket)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        reduced = self.all_reduce_sum(flatten(grads) * (local_weight / total_weight))
        for p, g in zip(params, grads):
            if p.grad is None:
                p.grad = g
        unflatten_into(reduced, [p.grad for p in params])  # type: ignore[misc]

    def total_count(self, local_count: int) -> int:
        """Σ over ranks of an integer count (one collective, reads the result on the host)."""
        return int(self.all_reduce_sum(torch.tensor([float(local_count)], device=self.device)).item())

    # -------------------------------------------------------------- synchronisation
    def broadcast_module_(self, module: nn.Module, src: int = 0) -> None:
        """Overwrite parameters and buffers with rank ``src``'s (one bucket)."""
        tensors = [*module.parameters(), *module.buffers()]
        if not tensors:
            return
        with torch.no_grad():
            flat = flatten(tensors).to(self.device)
            dist.broadcast(flat, src=src)
            unflatten_into(flat, tensors)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s picklable object on every rank (small, trusted, in-process data)."""
        holder = [obj if self.rank == src else None]
        dist.broadcast_object_list(holder, src=src)
        return holder[0]

    def check_in_sync(self, module: nn.Module, what: str = "parameters") -> None:
        """Fail loudly if the ranks' parameters differ (a cheap checksum, one collective).

        Raises:
            RankDriftError: naming the largest difference between ranks' checksums.
        """
        with torch.no_grad():
            flat = flatten(module.parameters()).to(torch.float64)
            checksum = torch.stack([flat.sum(), flat.abs().sum(), (flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)).sum()])
            low, high = checksum.clone().to(self.device), checksum.clone().to(self.device)
            dist.all_reduce(low, op=dist.ReduceOp.MIN)
            dist.all_reduce(high, op=dist.ReduceOp.MAX)
            spread = float((high - low).abs().max())
        if spread != 0.0:
            raise RankDriftError(
                f"Data-parallel ranks have drifted apart: {what} checksums differ by {spread:.3e} "
                f"(rank {self.rank} of {self.world_size}); the run cannot continue"
            )

    def merge_running_mean_std_(self, rms: Any, base: tuple[np.ndarray, np.ndarray, float] | None) -> tuple[np.ndarray, np.ndarray, float]:
        """Merge Gymnasium ``RunningMeanStd`` statistics across ranks, exactly.

        Every rank starts from the same synced statistics ``base`` (mean, var, count) and
        has since added its own observations.  Each rank's *new* moments are recovered by
        subtracting ``base`` from its running (count, Σx, Σx²), summed over ranks in one
        bucket, and combined with ``base``; all ranks end with identical statistics.

        Returns:
            The merged ``(mean, var, count)``, the ``base`` of the next merge.
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
        return new_mean, new_var, float(total)


def init_distributed(backend: str | None = None, timeout_s: float = 120.0) -> DistributedContext | None:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...).

    Returns ``None`` outside torchrun or with a world size of 1.  The backend defaults to
    nccl when CUDA is available and gloo otherwise.  ``timeout_s`` bounds every collective,
    so a rank that dies makes the others fail with an error instead of hanging.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return None
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    rank = dist.get_rank()
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistributedContext(rank=rank, world_size=dist.get_world_size(), device=device)

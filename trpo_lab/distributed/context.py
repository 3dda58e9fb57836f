"""torch.distributed helpers for data-parallel on-policy training (torchrun).

The pattern is OpenAI baselines' TRPO-MPI: every rank steps its own environments, and
every quantity the update needs from the whole batch (gradients, each Fisher-vector
product inside CG, line-search losses and KLs, critic gradients, K-FAC factors,
advantage statistics) is all-reduced.  Each reduction sends one flat bucket, never one
call per tensor.  Ranks may hold different numbers of valid samples (autoreset slots are
dropped), so batch means are combined as sample-weighted sums: a rank contributes
``local_mean * n_local / n_global``.

Every collective runs under the process group's timeout: a rank that dies or hangs makes
the others raise :class:`RankFailedError` (one line: which rank, which collective, the
timeout) instead of waiting forever.

When every rank runs on one x86-64 machine (``trpo-lab train --nproc N``), the all-reduces go
through :class:`SharedMemoryTransport` instead of gloo's TCP loopback: a trust-region update
makes hundreds of small, strictly sequential all-reduces (one per CG step, per critic
minibatch...), and on small VMs each gloo all-reduce costs about a millisecond of thread and
vCPU wake-ups, more than the work it synchronises; through shared memory it costs ~10 µs.  Each rank seeds its environments and samplers with
:func:`rank_seed` (``seed + 1000 * rank``), so ranks collect different data while rank 0's
stream is the single-process one.

Nothing here knows about RL agents; :class:`DistributedContext` is what the agents hold.
"""

from __future__ import annotations

import datetime
import math
import mmap
import os
import platform
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "DistributedContext",
    "CollectiveTraffic",
    "init_distributed",
    "flatten",
    "unflatten_into",
    "rank_seed",
    "split_sizes",
    "minibatch_plan",
    "RANK_SEED_STRIDE",
    "RankDriftError",
    "RankFailedError",
    "SharedMemoryTransport",
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


class SharedMemoryTransport:
    """Sum and max all-reduces between the ranks of one machine through a shared memory file.

    The file holds one 64-byte counter per rank and two banks of one slot per rank. The
    ``k``-th all-reduce writes this rank's tensor into its slot of bank ``k % 2``, then
    publishes ``k + 1`` in its counter, waits until every counter has reached ``k + 1`` and
    combines the slots in rank order, so every rank computes the same bits. A rank can only
    write bank ``k % 2`` again at call ``k + 2``, after every rank has published ``k + 2``,
    that is after every rank has finished reading call ``k``: two banks are enough.

    Publishing a counter after the data relies on x86-64's store order (TSO), so the transport
    is only used on x86-64. A wait spins for :attr:`SPIN_S` (5 ms, yielding the CPU to anything
    else runnable), then sleeps in growing steps (up to 1 ms); it fails with :class:`RankFailedError` when another rank's process is gone
    (checked every second) or after ``timeout_s``. The file is unlinked as soon as every rank
    has mapped it, so nothing is left behind whatever happens to the processes. Slots grow
    (collectively: every rank reduces the same sizes in the same order) when a tensor is
    larger than they are.
    """

    _COUNTER_BYTES = 64  # one cache line per rank
    SPIN_S = 5e-3
    """How long a wait spins (yielding the CPU) before it starts to sleep."""

    def __init__(self, rank: int, world_size: int, timeout_s: float, peer_pids: Sequence[int]) -> None:
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.peer_pids = [pid for r, pid in enumerate(peer_pids) if r != rank]
        self.slot_bytes = 0
        self.calls = 0
        self._map: mmap.mmap | None = None
        self._counters: np.ndarray = np.zeros(0, dtype=np.int64)

    @classmethod
    def connect(cls, rank: int, world_size: int, timeout_s: float) -> SharedMemoryTransport | None:
        """Collective: the transport if every rank runs on this x86-64 machine, else ``None``."""
        here = (socket.gethostname(), _boot_id(), platform.machine().lower())
        everyone: list[Any] = [None] * world_size
        dist.all_gather_object(everyone, (here, os.getpid()))
        same_machine = all(host == here for host, _ in everyone)
        if not same_machine or here[2] not in ("x86_64", "amd64"):
            return None
        transport = cls(rank, world_size, timeout_s, [pid for _, pid in everyone])
        return transport if transport._remap(1 << 20) else None

    def _remap(self, slot_bytes: int) -> bool:
        """Collective: map a new file with slots of ``slot_bytes``; False (on every rank) if any rank failed."""
        slot_bytes = -(-slot_bytes // 64) * 64
        size = self.world_size * self._COUNTER_BYTES + 2 * self.world_size * slot_bytes
        path = None
        if self.rank == 0:
            try:
                folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
                fd, path = tempfile.mkstemp(prefix="trpo_lab_allreduce_", dir=folder)
                os.ftruncate(fd, size)
                os.close(fd)
            except OSError:
                path = None
        holder = [path]
        dist.broadcast_object_list(holder, src=0)
        path = holder[0]
        new_map = None
        if path is not None:
            try:
                with open(path, "r+b") as fh:
                    new_map = mmap.mmap(fh.fileno(), size)
            except OSError:
                new_map = None
        mapped = [False] * self.world_size
        dist.all_gather_object(mapped, new_map is not None)  # every rank has mapped (or failed): unlink
        if self.rank == 0 and path is not None:
            os.unlink(path)
        if not all(mapped):
            if new_map is not None:
                new_map.close()
            return False
        assert new_map is not None
        self.close()
        self._map, self.slot_bytes, self.calls = new_map, slot_bytes, 0
        self._counters = np.frombuffer(new_map, dtype=np.int64, count=self.world_size * 8)[::8]
        return True

    def _slot(self, bank: int, rank: int, like: Tensor) -> Tensor:
        offset = self.world_size * self._COUNTER_BYTES + (bank * self.world_size + rank) * self.slot_bytes
        return torch.frombuffer(self._map, dtype=like.dtype, count=like.numel(), offset=offset)

    def all_reduce(self, flat: Tensor, op: str) -> Tensor:
        """Sum (``op="sum"``) or element-wise maximum (``"max"``) of a CPU tensor over ranks, as a new tensor."""
        data = flat.detach().reshape(-1)
        needed = data.numel() * data.element_size()
        if needed > self.slot_bytes and not self._remap(max(needed, 2 * self.slot_bytes)):
            raise RuntimeError(f"cannot map {needed} bytes of shared memory per rank")
        bank = self.calls % 2
        self._slot(bank, self.rank, data).copy_(data)
        self.calls += 1
        self._counters[self.rank] = self.calls
        self._wait(self.calls)
        out = self._slot(bank, 0, data).clone()
        for rank in range(1, self.world_size):
            if op == "sum":
                out.add_(self._slot(bank, rank, data))
            else:
                torch.maximum(out, self._slot(bank, rank, data), out=out)
        return out.view_as(flat)

    def _wait(self, target: int) -> None:
        counters = self._counters
        if (counters >= target).all():
            return
        start = time.monotonic()
        next_check, delay = start + 1.0, 0.0
        while not (counters >= target).all():
            now = time.monotonic()
            if now - start < 2e-4:
                continue  # the other ranks are usually a few microseconds away
            if now - start < self.SPIN_S:
                os.sched_yield()  # spin, but let whatever else wants this CPU run
            else:  # a long wait (a rank still collecting its rollout): sleep, in growing steps
                time.sleep(delay)
                delay = min(max(2 * delay, 5e-5), 1e-3)
            if now >= next_check:
                next_check = now + 1.0
                gone = [pid for pid in self.peer_pids if not _process_alive(pid)]
                if gone:
                    raise RuntimeError(f"the process of another rank (pid {gone[0]}) has exited")
                if now - start > self.timeout_s:
                    raise RuntimeError(f"no answer for {now - start:.0f} s through shared memory")

    def close(self) -> None:
        """Unmap the file (it is already unlinked)."""
        self._counters = np.zeros(0, dtype=np.int64)  # drop the view that pins the map
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a tensor still views it: the map goes with the last view
                pass
            self._map = None


def _boot_id() -> str:
    """Tells machines (and containers sharing a host name) apart; empty where there is none."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an exited child not yet reaped by its launcher is a zombie
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


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
        transport: The shared-memory transport of CPU all-reduces when every rank runs on
            this machine (see :func:`init_distributed`), else ``None`` (the backend's).
    """

    rank: int
    world_size: int
    device: torch.device
    timeout_s: float = 120.0
    check_every: int = 10
    traffic: CollectiveTraffic = field(default_factory=CollectiveTraffic, compare=False, repr=False)
    transport: SharedMemoryTransport | None = field(default=None, compare=False, repr=False)

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
        if self.transport is not None:
            self.transport.close()
        if dist.is_initialized():
            dist.destroy_process_group()

    @contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        """Turn a failed collective into one clear line (the backend's are many, and vary)."""
        try:
            yield
        except RuntimeError as exc:  # DistBackendError, DistNetworkError, gloo/nccl timeouts
            detail = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise _failure(self.rank, self.world_size, what, self.timeout_s, detail) from None

    # -------------------------------------------------------------- reductions
    def _all_reduce(self, flat: Tensor, op: str) -> Tensor:
        with self._collective(f"all-reduce ({op})"):
            if self.transport is not None and flat.device.type == "cpu":
                out = self.transport.all_reduce(flat, op)
            else:
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

    def merge_running_mean_std_(self, rms: Any, base: tuple[np.ndarray, np.ndarray, float] | None) -> tuple[np.ndarray, np.ndarray, float]:
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
    backend: str | None = None, timeout_s: float = 120.0, check_every: int = 10, shared_memory: bool | None = None
) -> DistributedContext | None:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...).

    Returns ``None`` outside torchrun or with a world size of 1.  The backend defaults to
    nccl when CUDA is available and gloo otherwise.  ``timeout_s`` bounds every collective,
    so a rank that dies makes the others fail with an error instead of hanging.
    ``check_every`` is the number of updates between parameter drift checks.
    ``shared_memory``: with gloo, reduce CPU tensors through :class:`SharedMemoryTransport`
    when every rank runs on this x86-64 machine (``None``, default: whenever possible;
    ``False``: always gloo).

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
            detail = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
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
    transport = None
    if backend == "gloo" and shared_memory is not False:
        try:
            transport = SharedMemoryTransport.connect(rank, world, timeout_s)
        except RuntimeError as exc:
            detail = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise _failure(rank, world, "setting up shared memory", timeout_s, detail) from None
    return DistributedContext(
        rank=rank, world_size=world, device=device, timeout_s=timeout_s, check_every=check_every, transport=transport
    )

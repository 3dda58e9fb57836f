"""Test helpers for users and for trpo_lab's own CI: counting host synchronisations on the CPU.

On a GPU, an operation whose result the host needs (``.item()``, ``float(t)``, ``bool(t)``, a
tensor whose shape depends on its data, a copy to the host) makes the CPU wait until every
kernel queued before it has run. :class:`HostSyncCounter` is a
:class:`~torch.utils._python_dispatch.TorchDispatchMode` that records every such operation
*by what it is*, not by timing, so it works on the CPU: a code path that makes no host sync
under it on the CPU makes none on a GPU either. It is how the CI proves the GPU path of
every agent (``sync_free``) without a GPU::

    from trpo_lab.testing import HostSyncCounter

    with HostSyncCounter() as counter:
        agent.update(batch)
    assert counter.count == 0, counter.report()

What it records (:attr:`HostSyncCounter.syncs`):

* ``_local_scalar_dense``: ``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``, ``if t:``;
* ``is_nonzero`` and ``equal`` (``bool(t)`` of a comparison, ``torch.equal``);
* data-dependent shapes: ``nonzero`` (``torch.where(mask)``), ``masked_select``, the
  ``unique`` family, ``repeat_interleave`` without ``output_size``, indexing or assigning
  with a boolean mask (``x[mask]``, ``x[mask] = v``);
* copies between devices that block the host: device → host always, host → device unless
  ``non_blocking=True`` (CPU → CPU copies are not transfers).

Separately, :attr:`HostSyncCounter.host_data` records host values entering as new tensors
(``torch.tensor(...)``, ``torch.as_tensor(numpy)``, ``torch.from_numpy``: the
``lift_fresh`` operation). On a GPU each is a host → device copy, blocking unless it goes
through pinned memory and ``non_blocking``; on the CPU it is the only trace such a copy leaves.

Reading a tensor with ``.tolist()`` or ``.numpy()`` does not go through the dispatcher for a
CPU tensor (for a GPU tensor it needs the copy to the host that the counter sees), so while
the counter is active these two methods are wrapped and recorded as syncs too
(``count_host_reads=False`` turns that off, e.g. around a numpy rollout on the CPU).

Limits: a dispatch mode sees only what goes through torch's dispatcher from Python. Checks that
a library kernel makes internally (e.g. the error-code read of ``torch.linalg.eigh`` on CUDA)
are invisible to it, as are operations inside ``torch.compile``d graphs unless the graph falls
back to eager; CUDA's ``torch.cuda.set_sync_debug_mode("error")`` catches those on a GPU
(``tests/gpu/``).
"""

from __future__ import annotations

import traceback
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSync", "HostSyncCounter", "SYNC_OPS"]

_aten = torch.ops.aten

SYNC_OPS: dict[Any, str] = {
    _aten._local_scalar_dense.default: "item / float / int / bool of a tensor",
    _aten.is_nonzero.default: "bool of a tensor",
    _aten.equal.default: "torch.equal",
    _aten.nonzero.default: "nonzero (data-dependent shape)",
    _aten.masked_select.default: "masked_select (data-dependent shape)",
    _aten._unique2.default: "unique (data-dependent shape)",
    _aten.unique_dim.default: "unique (data-dependent shape)",
    _aten.unique_consecutive.default: "unique_consecutive (data-dependent shape)",
    _aten.unique_dim_consecutive.default: "unique_consecutive (data-dependent shape)",
}
"""Operations that always wait for the host, with the reason reported for each."""

_REPEAT_INTERLEAVE = (_aten.repeat_interleave.Tensor, _aten.repeat_interleave.self_Tensor)
_MASK_INDEX = (_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default, _aten._index_put_impl_.default)
_COPIES = (_aten._to_copy.default, _aten.copy_.default, _aten.copy.default)
_LIFT = (_aten.lift_fresh.default, _aten.lift_fresh_copy.default)
_TORCH = Path(torch.__file__).resolve().parent


@dataclass(frozen=True)
class HostSync:
    """One recorded operation.

    Attributes:
        op: The aten operation, e.g. ``"aten._local_scalar_dense.default"``.
        reason: Why it waits for the host (or, for :attr:`HostSyncCounter.host_data`, what entered).
        location: ``file:line in function`` of the innermost frame outside torch (the caller's
            line), with the line's source text when available.
    """

    op: str
    reason: str
    location: str


def _is_bool_index(indices: Iterable[Any]) -> bool:
    return any(isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


def _device_of(value: Any) -> torch.device | None:
    return value.device if isinstance(value, Tensor) else None


def _copy_reason(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """Why a copy blocks the host (device → host, or a blocking host → device), or None."""
    if func is _aten._to_copy.default:
        source, target = _device_of(args[0]), kwargs.get("device")
        target = torch.device(target) if target is not None else source
    else:  # copy_(self, src, non_blocking)
        target, source = _device_of(args[0]), _device_of(args[1]) if len(args) > 1 else None
    if source is None or target is None or source.type == target.type == "cpu" or source == target:
        return None
    if source.type == "meta" or target.type == "meta":
        return None
    non_blocking = bool(kwargs.get("non_blocking", args[2] if func is not _aten._to_copy.default and len(args) > 2 else False))
    if target.type == "cpu":
        return f"copy {source} -> host"
    if source.type == "cpu" and non_blocking:
        return None  # asynchronous (from pinned memory); counted in transfers
    return f"copy {source} -> {target}" + ("" if non_blocking else " (blocking)")


def _caller() -> str:
    """The innermost frame outside torch and this module: where the operation was asked for."""
    frames = traceback.extract_stack()
    here = Path(__file__).resolve()
    for frame in reversed(frames):
        path = Path(frame.filename).resolve()
        if path == here or _TORCH in path.parents:
            continue
        text = f"{frame.filename}:{frame.lineno} in {frame.name}"
        return f"{text}: {frame.line.strip()}" if frame.line else text
    return "<unknown>"


class HostSyncCounter(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch leaves it untyped
    """Record the operations that make a GPU wait for the host, and where they were made.

    Use it as a context manager around the code to check; it nests with other dispatch modes
    and changes no result. Each record is a :class:`HostSync` with the caller's location.

    Attributes:
        syncs: Operations that wait for the host (see the module docstring).
        host_data: Host values that entered as new tensors (``lift_fresh``).
        transfers: Non-blocking host → device copies (asynchronous, not syncs).
    """

    def __init__(self, count_host_reads: bool = True) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.count_host_reads = count_host_reads
        self._saved_methods: dict[str, Any] = {}
        self.syncs: list[HostSync] = []
        self.host_data: list[HostSync] = []
        self.transfers: list[HostSync] = []

    @property
    def count(self) -> int:
        """The number of host synchronisations recorded."""
        return len(self.syncs)

    def reset(self) -> None:
        """Forget everything recorded so far."""
        self.syncs.clear()
        self.host_data.clear()
        self.transfers.clear()

    def by_location(self) -> Counter[str]:
        """How many syncs each location made."""
        return Counter(f"{sync.location} [{sync.reason}]" for sync in self.syncs)

    def report(self) -> str:
        """A readable summary: the counts, then each sync location with its count, most first."""
        lines = [f"{self.count} host sync(s), {len(self.host_data)} host value(s) entering, "
                 f"{len(self.transfers)} non-blocking transfer(s)"]
        lines += [f"  {n:4d} x {where}" for where, n in self.by_location().most_common()]
        lines += [f"  host data: {n} x {where}" for where, n in
                  Counter(f"{d.location}" for d in self.host_data).most_common()]
        return "\n".join(lines)

    def __enter__(self) -> HostSyncCounter:
        if self.count_host_reads:
            for name in ("tolist", "numpy"):
                original = getattr(torch.Tensor, name)
                self._saved_methods[name] = original
                setattr(torch.Tensor, name, self._reading(name, original))
        super().__enter__()  # type: ignore[no-untyped-call]
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)  # type: ignore[no-untyped-call]
        for name, original in self._saved_methods.items():
            setattr(torch.Tensor, name, original)
        self._saved_methods.clear()

    def _reading(self, name: str, original: Any) -> Any:
        counter = self

        def read(tensor: Tensor, *args: Any, **kwargs: Any) -> Any:
            counter._record(counter.syncs, f"Tensor.{name}", f"{name}() of a tensor (a device-to-host read on a GPU)")
            return original(tensor, *args, **kwargs)

        return read

    def _record(self, into: list[HostSync], func: Any, reason: str) -> None:
        into.append(HostSync(str(func), reason, _caller()))

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        reason = SYNC_OPS.get(func)
        if reason is None:
            if func in _REPEAT_INTERLEAVE and kwargs.get("output_size") is None:
                reason = "repeat_interleave without output_size (data-dependent shape)"
            elif func in _MASK_INDEX and len(args) > 1 and _is_bool_index(args[1]):
                reason = "boolean-mask indexing (data-dependent shape)"
            elif func in _COPIES:
                reason = _copy_reason(func, args, kwargs)
                if reason is None:
                    source = _device_of(args[0] if func is _aten._to_copy.default else args[1])
                    target = kwargs.get("device") if func is _aten._to_copy.default else _device_of(args[0])
                    if source is not None and target is not None and torch.device(target) != source:
                        if source.type == "cpu" and torch.device(target).type not in ("cpu", "meta"):
                            self._record(self.transfers, func, f"non-blocking copy host -> {target}")
            elif func in _LIFT:
                self._record(self.host_data, func, "host value -> tensor")
        if reason is not None:
            self._record(self.syncs, func, reason)
        return func(*args, **kwargs)

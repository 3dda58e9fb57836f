"""The update guard: undo an update that left NaN or inf in the parameters or optimizer state.

Before each update the guard snapshots the policy's parameters and the algorithm's
optimizer state; after it, one fused finiteness check decides whether to keep the result.
A rejected update (non-finite values, or a ``torch.linalg.LinAlgError`` from a factorisation
of NaN or singular curvature) is restored from the snapshot and counted
(``train/rejected_updates``); :attr:`UpdateGuard.max_consecutive` rejections in a row stop
the run with :class:`NonFiniteUpdateError`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from trpo_lab.envs import NonFiniteError
from trpo_lab.optim._flat import all_finite
from trpo_lab.validation import first_line

_LINALG_ERROR: type[Exception] = getattr(torch.linalg, "LinAlgError", RuntimeError)
"""torch.linalg.LinAlgError (a RuntimeError), which its stubs do not export."""

__all__ = ["NonFiniteUpdateError", "UpdateGuard", "tensor_leaves", "clone_tree"]

Metrics = Mapping[str, Tensor | float]


class NonFiniteUpdateError(NonFiniteError):
    """Several updates in a row produced NaN or inf parameters (each was rejected and undone)."""


def tensor_leaves(tree: Any) -> list[Tensor]:
    """The tensors in nested dicts / lists / tuples (optimizer state_dicts), without recursion."""
    leaves: list[Tensor] = []
    stack = [tree]
    while stack:
        value = stack.pop()
        kind = type(value)
        if kind is dict:
            stack.extend(value.values())
        elif kind is list or kind is tuple:
            stack.extend(value)
        elif isinstance(value, Tensor):
            leaves.append(value)
        elif isinstance(value, (dict, list, tuple)):  # subclasses
            stack.extend(value.values() if isinstance(value, dict) else value)
    return leaves


def clone_tree(value: Any, shared: Collection[int] = ()) -> Any:
    """Deep copy of nested dicts / lists / tuples, cloning tensors (optimizer state_dicts);
    tensors whose ``id`` is in ``shared`` are kept by reference."""
    if isinstance(value, Tensor):
        return value if id(value) in shared else value.detach().clone()
    if isinstance(value, dict):
        return {k: clone_tree(v, shared) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(clone_tree(v, shared) for v in value)
    return value


class _Snapshot(NamedTuple):
    params: list[Tensor]
    state: Any
    shared: list[tuple[Tensor, int]]
    """The replaced-not-mutated tensors kept by reference, with their version counters."""


class UpdateGuard:
    """Snapshot, check and restore around each update; count the rejections.

    Args:
        policy: The module whose parameters the update changes.
        get_state: Returns the algorithm's optimizer state (nested dicts of tensors).
        set_state: Restores what ``get_state`` returned.
        max_consecutive: Rejections in a row after which :meth:`check_consecutive` raises.
        replaced_tensors: Returns the state tensors that the optimizer replaces with new ones
            and never modifies in place (:meth:`~trpo_lab.optim.KFAC.replaced_state_tensors`).
            The snapshot keeps references to them instead of copies, and the finiteness check
            skips those it has already found finite (the same tensor at the same version).
            A restore checks that none of them was modified in place since the snapshot, and
            raises ``RuntimeError`` if one was (the optimizer broke its promise).
    """

    def __init__(
        self,
        policy: nn.Module,
        get_state: Callable[[], Any],
        set_state: Callable[[Any], None],
        max_consecutive: int = 10,
        replaced_tensors: Callable[[], Iterable[Tensor]] | None = None,
    ) -> None:
        self.policy = policy
        self.get_state = get_state
        self.set_state = set_state
        self.max_consecutive = max_consecutive
        self.replaced_tensors = replaced_tensors
        self._known_finite: dict[int, tuple[Tensor, int]] = {}
        """Replaced-not-mutated tensors found finite: id -> (the tensor, its version then)."""
        self.num_rejected = 0
        """Updates rejected over the agent's lifetime (checkpointed)."""
        self.consecutive = 0
        """Rejections in a row up to the last update (checkpointed)."""

    def _replaced(self) -> dict[int, Tensor]:
        return {} if self.replaced_tensors is None else {id(t): t for t in self.replaced_tensors()}

    def snapshot(self) -> _Snapshot:
        """Copies of the parameters and the optimizer state, taken before an update (the
        replaced-not-mutated tensors by reference)."""
        with torch.no_grad():
            params = [p.detach().clone() for p in self.policy.parameters()]
        replaced = self._replaced()
        shared = [(tensor, tensor._version) for tensor in replaced.values()]
        return _Snapshot(params, clone_tree(self.get_state(), replaced), shared)

    def restore(self, snapshot: _Snapshot) -> None:
        """Put back what :meth:`snapshot` copied."""
        for tensor, version in snapshot.shared:
            if tensor._version != version:
                raise RuntimeError(
                    f"UpdateGuard: an optimizer-state tensor of shape {tuple(tensor.shape)} listed by "
                    "replaced_tensors was modified in place during the update, so the snapshot "
                    "cannot restore it; the optimizer must assign new tensors instead"
                )
        with torch.no_grad():
            for param, saved in zip(self.policy.parameters(), snapshot.params):
                param.copy_(saved)
        self.set_state(snapshot.state)

    def is_finite(self) -> bool:
        """Whether every parameter and floating optimizer-state tensor is finite (one host sync).

        A replaced-not-mutated tensor that an earlier call found finite and that is still the
        same object at the same version is not read again."""
        tensors = [p.detach() for p in self.policy.parameters()]
        device = tensors[0].device
        replaced = self._replaced()
        known = self._known_finite
        still_known: dict[int, tuple[Tensor, int]] = {}
        unchecked: dict[int, tuple[Tensor, int]] = {}
        for tensor in tensor_leaves(self.get_state()):
            if not tensor.is_floating_point() or tensor.device != device:
                continue  # (Adam keeps its step counts on the CPU even for CUDA parameters)
            key = id(tensor)
            if key in replaced:
                entry = known.get(key)
                if entry is not None and entry[0] is tensor and entry[1] == tensor._version:
                    still_known[key] = entry
                    continue
                unchecked[key] = (tensor, tensor._version)
            tensors.append(tensor)
        finite = all_finite(tensors)
        self._known_finite = {**still_known, **unchecked} if finite else still_known
        return finite

    def run(self, update: Callable[[], Metrics], update_number: int) -> tuple[Metrics, bool]:
        """Run ``update()``, undo it if it came out non-finite; returns ``(metrics, rejected)``."""
        snapshot = self.snapshot()
        try:
            metrics = update()
            rejected = not self.is_finite()
        except _LINALG_ERROR as exc:  # a factorisation of NaN or singular curvature
            metrics, rejected = {"train/linalg_error": 1.0}, True
            warnings.warn(f"Update {update_number} failed ({first_line(exc)}); it is undone", stacklevel=3)
        if rejected:
            self.restore(snapshot)
            self.num_rejected += 1
            self.consecutive += 1
        else:
            self.consecutive = 0
        return metrics, rejected

    def too_many_rejections(self, num_updates: int) -> NonFiniteUpdateError | None:
        """The error to stop with after :attr:`max_consecutive` rejections in a row, else ``None``."""
        if self.consecutive < self.max_consecutive:
            return None
        return NonFiniteUpdateError(
            f"{self.consecutive} updates in a row (the last at update {num_updates}) "
            "produced NaN or inf parameters or optimizer state and were undone; the policy is still "
            f"the one from update {num_updates - self.consecutive}. Lower the step "
            "size (learning_rate, target_kl, kl_clip), scale or normalise the rewards "
            "(normalize_reward = true), or check the environment"
        )

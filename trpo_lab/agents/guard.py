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
from collections.abc import Callable, Mapping
from typing import Any

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


def clone_tree(value: Any) -> Any:
    """Deep copy of nested dicts / lists / tuples, cloning tensors (optimizer state_dicts)."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: clone_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(clone_tree(v) for v in value)
    return value


class UpdateGuard:
    """Snapshot, check and restore around each update; count the rejections.

    Args:
        policy: The module whose parameters the update changes.
        get_state: Returns the algorithm's optimizer state (nested dicts of tensors).
        set_state: Restores what ``get_state`` returned.
        max_consecutive: Rejections in a row after which :meth:`check_consecutive` raises.
    """

    def __init__(
        self,
        policy: nn.Module,
        get_state: Callable[[], Any],
        set_state: Callable[[Any], None],
        max_consecutive: int = 10,
    ) -> None:
        self.policy = policy
        self.get_state = get_state
        self.set_state = set_state
        self.max_consecutive = max_consecutive
        self.num_rejected = 0
        """Updates rejected over the agent's lifetime (checkpointed)."""
        self.consecutive = 0
        """Rejections in a row up to the last update (checkpointed)."""

    def snapshot(self) -> tuple[list[Tensor], Any]:
        """Copies of the parameters and the optimizer state, taken before an update."""
        with torch.no_grad():
            params = [p.detach().clone() for p in self.policy.parameters()]
        return params, clone_tree(self.get_state())

    def restore(self, snapshot: tuple[list[Tensor], Any]) -> None:
        """Put back what :meth:`snapshot` copied."""
        params, optimizer_states = snapshot
        with torch.no_grad():
            for param, saved in zip(self.policy.parameters(), params):
                param.copy_(saved)
        self.set_state(optimizer_states)

    def is_finite(self) -> bool:
        """Whether every parameter and floating optimizer-state tensor is finite (one host sync)."""
        tensors = [p.detach() for p in self.policy.parameters()]
        device = tensors[0].device
        tensors += [
            t for t in tensor_leaves(self.get_state()) if t.is_floating_point() and t.device == device
        ]  # (Adam keeps its step counts on the CPU even for CUDA parameters)
        return all_finite(tensors)

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

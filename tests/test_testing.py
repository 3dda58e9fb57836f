"""trpo_lab.testing.HostSyncCounter: what it counts, where it says it happened, what it leaves alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trpo_lab.testing import HostSyncCounter

X = torch.tensor([1.0, -2.0, 3.0])


@pytest.mark.parametrize(
    ("operation", "reason"),
    [
        (lambda: float(X.sum()), "item / float / int / bool"),
        (lambda: X.sum().item(), "item / float / int / bool"),
        (lambda: bool(X.sum() > 0), "item / float / int / bool"),
        (lambda: torch.equal(X, X), "torch.equal"),
        (lambda: torch.nonzero(X > 0), "nonzero"),
        (lambda: torch.where(X > 0), "nonzero"),
        (lambda: torch.masked_select(X, X > 0), "masked_select"),
        (lambda: torch.unique(X), "unique"),
        (lambda: X[X > 0], "boolean-mask indexing"),
        (lambda: X.clone().__setitem__(X > 0, 0.0), "boolean-mask indexing"),
        (lambda: torch.repeat_interleave(torch.tensor([1, 2])), "repeat_interleave"),
        (lambda: X.tolist(), "tolist() of a tensor"),
        (lambda: X.numpy(), "numpy() of a tensor"),
    ],
)
def test_counts_each_kind_of_host_sync(operation, reason: str) -> None:  # type: ignore[no-untyped-def]
    with HostSyncCounter() as counter:
        operation()
    assert counter.count >= 1
    assert any(reason in sync.reason for sync in counter.syncs), counter.report()
    assert all("test_testing.py" in sync.location for sync in counter.syncs), counter.report()


def test_device_resident_operations_are_not_syncs() -> None:
    with HostSyncCounter() as counter:
        y = torch.where(X > 0, X, 0.0).cumsum(0) @ X
        torch.nonzero_static(X > 0, size=3)
        X.to("cpu")
        X.to("meta")
        _ = y * 2 + X.max()
    assert counter.count == 0, counter.report()


def test_host_values_entering_are_recorded_apart() -> None:
    with HostSyncCounter() as counter:
        torch.tensor([1.0, 2.0])
        torch.as_tensor(np.ones(3))
    assert counter.count == 0 and len(counter.host_data) == 2


def test_report_names_the_line_and_counts_by_location() -> None:
    with HostSyncCounter() as counter:
        for _ in range(3):
            float(X.sum())  # the line the report must name
    assert counter.count == 3
    (location, count), = counter.by_location().items()
    assert count == 3 and "float(X.sum())  # the line the report must name" in location
    assert counter.report().startswith("3 host sync(s)")
    counter.reset()
    assert counter.count == 0


def test_reads_are_unwrapped_after_the_context_and_can_be_left_out() -> None:
    original = torch.Tensor.tolist
    with HostSyncCounter(count_host_reads=False) as counter:
        X.tolist()
        X.numpy()
    assert counter.count == 0
    with HostSyncCounter():
        pass
    assert torch.Tensor.tolist is original
    with pytest.raises(RuntimeError), HostSyncCounter():
        raise RuntimeError("boom")
    assert torch.Tensor.tolist is original

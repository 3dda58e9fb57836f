"""The update guard: a non-finite update is undone, a finite one kept, rejections counted."""

from __future__ import annotations

import math

import pytest
import torch

from trpo_lab.agents.guard import NonFiniteUpdateError, UpdateGuard, clone_tree, tensor_leaves


def _guarded() -> tuple[torch.nn.Linear, torch.optim.Adam, UpdateGuard]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()  # optimizer state exists
    guard = UpdateGuard(model, optimizer.state_dict, optimizer.load_state_dict, max_consecutive=2)
    return model, optimizer, guard


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def test_a_non_finite_update_is_undone_and_counted() -> None:
    model, optimizer, guard = _guarded()
    before = _flat(model)
    exp_avg = optimizer.state[model.weight]["exp_avg"].clone()

    def poison() -> dict[str, float]:
        with torch.no_grad():
            model.weight.fill_(math.nan)
            optimizer.state[model.weight]["exp_avg"].fill_(math.inf)
        return {"train/kl": 1.0}

    metrics, rejected = guard.run(poison, 1)
    assert rejected and metrics == {"train/kl": 1.0}
    assert torch.equal(_flat(model), before)
    assert torch.equal(optimizer.state[model.weight]["exp_avg"], exp_avg)
    assert (guard.num_rejected, guard.consecutive) == (1, 1)
    assert guard.too_many_rejections(1) is None
    guard.run(poison, 2)
    error = guard.too_many_rejections(2)
    assert isinstance(error, NonFiniteUpdateError) and "2 updates in a row" in str(error)


def test_a_finite_update_is_kept_and_resets_the_streak() -> None:
    model, _, guard = _guarded()
    guard.consecutive = 1

    def step() -> dict[str, float]:
        with torch.no_grad():
            model.bias.add_(1.0)
        return {}

    before = _flat(model)
    _, rejected = guard.run(step, 1)
    assert not rejected and guard.consecutive == 0 and not torch.equal(_flat(model), before)


def test_a_linalg_error_is_undone_with_a_warning() -> None:
    model, _, guard = _guarded()
    before = _flat(model)

    def failing() -> dict[str, float]:
        with torch.no_grad():
            model.bias.add_(1.0)
        raise torch.linalg.LinAlgError("linalg.cholesky: The factorization could not be completed")

    with pytest.warns(UserWarning, match="Update 3 failed .*cholesky.*; it is undone"):
        metrics, rejected = guard.run(failing, 3)
    assert rejected and metrics == {"train/linalg_error": 1.0} and torch.equal(_flat(model), before)


def test_tree_helpers_find_and_copy_every_tensor() -> None:
    tree = {"a": [torch.ones(2), (torch.zeros(1), 3)], "b": {"c": torch.full((1,), 5.0)}, "d": "text"}
    assert sorted(t.numel() for t in tensor_leaves(tree)) == [1, 1, 2]
    copy = clone_tree(tree)
    copy["b"]["c"].fill_(0.0)
    assert tree["b"]["c"].item() == 5.0 and copy["d"] == "text" and isinstance(copy["a"][1], tuple)


def _guard_with_replaced_state() -> tuple[torch.nn.Linear, dict[str, torch.Tensor], UpdateGuard]:
    """A guard over an optimizer-like state whose "factor" is replaced, never mutated (as K-FAC's)."""
    model = torch.nn.Linear(3, 2)
    state = {"factor": torch.eye(3), "buffer": torch.zeros(2)}

    def load(saved: dict[str, torch.Tensor]) -> None:
        state.clear()
        state.update(saved)

    guard = UpdateGuard(model, lambda: dict(state), load, replaced_tensors=lambda: [state["factor"]])
    return model, state, guard


def test_replaced_tensors_are_shared_by_the_snapshot_and_restored() -> None:
    model, state, guard = _guard_with_replaced_state()
    factor, before = state["factor"], _flat(model)

    def poison() -> dict[str, float]:
        state["factor"] = torch.full((3, 3), math.nan)  # replaced, as K-FAC does
        state["buffer"].fill_(math.nan)  # modified in place: the snapshot holds a copy
        return {}

    _, rejected = guard.run(poison, 1)
    assert rejected and state["factor"] is factor and torch.equal(factor, torch.eye(3))
    assert torch.equal(state["buffer"], torch.zeros(2)) and torch.equal(_flat(model), before)


def test_a_replaced_tensor_modified_in_place_cannot_be_restored() -> None:
    _, state, guard = _guard_with_replaced_state()

    def broken_promise() -> dict[str, float]:
        state["factor"].fill_(math.nan)
        return {}

    with pytest.raises(RuntimeError, match=r"shape \(3, 3\) listed by replaced_tensors was modified in place"):
        guard.run(broken_promise, 1)


def test_the_finiteness_check_reads_a_replaced_tensor_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import trpo_lab.agents.guard as guard_module

    model, state, guard = _guard_with_replaced_state()
    checked: list[list[torch.Tensor]] = []
    real_all_finite = guard_module.all_finite

    def recording(tensors: list[torch.Tensor]) -> bool:
        checked.append(list(tensors))
        return real_all_finite(tensors)

    monkeypatch.setattr(guard_module, "all_finite", recording)

    def read(tensors: list[torch.Tensor], tensor: torch.Tensor) -> bool:  # (parameters are read detached)
        return any(t.data_ptr() == tensor.data_ptr() for t in tensors)

    assert guard.is_finite() and read(checked[-1], state["factor"])
    assert guard.is_finite() and not read(checked[-1], state["factor"])  # same tensor, same version
    assert read(checked[-1], state["buffer"]) and all(read(checked[-1], p) for p in model.parameters())
    state["factor"].mul_(2.0)  # a new version is read again
    assert guard.is_finite() and read(checked[-1], state["factor"])
    state["factor"] = torch.full((3, 3), math.inf)  # so is a new tensor, and it is caught
    assert not guard.is_finite()
    state["factor"] = torch.eye(3)
    assert guard.is_finite() and read(checked[-1], state["factor"])

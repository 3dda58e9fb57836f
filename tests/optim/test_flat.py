"""The small tensor-list helpers of trpo_lab.optim._flat that the agents' hot loops use."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import trpo_lab.optim
from trpo_lab.optim._flat import all_finite, any_nonfinite, clip_grad_norm_


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_all_finite_finds_one_bad_element_and_changes_nothing(dtype: torch.dtype, bad: float) -> None:
    tensors = [torch.randn(3, 4, dtype=dtype), torch.randn(5), torch.randn(()), torch.randn(2, 2, dtype=dtype)]
    before = [t.clone() for t in tensors]
    assert all_finite(tensors)
    assert any_nonfinite(tensors).item() == 0.0
    tensors[3][1, 0] = bad
    assert not all_finite(tensors)
    tensors[3][1, 0] = before[3][1, 0]
    for t, b in zip(tensors, before):
        assert torch.equal(t, b)  # the check multiplies by exactly 1
    huge = {torch.float16: 6e4, torch.bfloat16: 3e38, torch.float32: 3e38, torch.float64: 1e300}[dtype]
    assert all_finite([torch.full((4,), huge, dtype=dtype)])  # large but finite is finite
    assert all_finite([])


def test_all_finite_is_exact_where_a_sum_would_overflow_and_skips_empty_tensors() -> None:
    """No sum is taken: many float32 values near the top of the range stay finite, a NaN in a
    0-d tensor or beside empty tensors is found."""
    assert all_finite([torch.full((1000,), 3e38), torch.full((1000,), -3e38)])
    assert all_finite([torch.empty(0), torch.ones(2), torch.empty(0, 3)])
    assert all_finite([torch.empty(0)]) and any_nonfinite([torch.empty(0)]).item() == 0.0
    assert not all_finite([torch.empty(0), torch.tensor(float("nan"))])
    assert any_nonfinite([torch.ones(3), torch.tensor(float("-inf"))]).item() == 1.0


def test_all_finite_with_mixed_dtypes_keeps_each_dtypes_range() -> None:
    tensors = [torch.tensor([1e300], dtype=torch.float64), torch.ones(3), torch.full((2,), 6e4, dtype=torch.float16)]
    assert all_finite(tensors)  # no float32 cast on the way: 1e300 stays finite
    assert any_nonfinite(tensors).dtype == torch.get_default_dtype() and any_nonfinite(tensors).shape == (1,)
    tensors[1][2] = float("nan")
    assert not all_finite(tensors)
    assert any_nonfinite(tensors).item() == 1.0


def test_all_finite_ignores_autograd_and_builds_no_graph() -> None:
    param = torch.nn.Parameter(torch.ones(3))
    flag = any_nonfinite([param * 2.0, param])
    assert not flag.requires_grad and flag.item() == 0.0


def test_optim_uses_no_private_torch_api() -> None:
    """Private torch operators (``torch._foreach_*``, ``torch._amp_*``) change without notice."""
    package = Path(trpo_lab.optim.__file__).parent
    offenders = [
        f"{path.name}:{number}: {line.strip()}"
        for path in sorted(package.glob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if re.search(r"\btorch\._[a-z]", line)
    ]
    assert offenders == []


@pytest.mark.parametrize("max_norm", [0.1, 1.0, 100.0])
def test_clip_grad_norm_matches_torch(max_norm: float) -> None:
    torch.manual_seed(0)
    ours, theirs = ([torch.nn.Parameter(torch.zeros(s)) for s in [(3, 4), (4,), (2, 2)]] for _ in range(2))
    for a, b in zip(ours, theirs):
        a.grad = torch.randn(a.shape)
        b.grad = a.grad.clone()
    ours[1].grad = None  # parameters without a gradient are skipped
    theirs[1].grad = None
    norm = clip_grad_norm_(ours, max_norm)
    # Bitwise: the same per-tensor norms, the same scale, so runs clip exactly as torch would.
    assert torch.equal(norm, torch.nn.utils.clip_grad_norm_(theirs, max_norm))
    for a, b in zip(ours, theirs):
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad)


def test_clip_grad_norm_mixed_dtypes_and_no_gradients() -> None:
    mixed = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))]
    for p in mixed:
        p.grad = torch.full_like(p, 3.0)
    torch.testing.assert_close(clip_grad_norm_(mixed, 1.0).double(), torch.tensor(6.0, dtype=torch.float64))
    torch.testing.assert_close(mixed[0].grad, torch.full((2,), 0.5), rtol=1e-5, atol=1e-6)
    assert clip_grad_norm_([torch.nn.Parameter(torch.zeros(1))], 1.0) == 0.0

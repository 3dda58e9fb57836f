"""trpo_lab.validation: what counts as an integer / a number, and the one message shape."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from trpo_lab.validation import check_int, check_number, invalid, is_int, is_number, require


@pytest.mark.parametrize(
    ("value", "integer", "number"),
    [
        (3, True, True),
        (np.int64(3), True, True),
        (True, False, False),  # bool is an int in Python, never a hyperparameter
        (np.bool_(True), False, False),
        (3.0, False, True),
        (np.float32(0.5), False, True),
        (Fraction(1, 3), False, True),
        ("3", False, False),
        (None, False, False),
        (math.inf, False, False),
        (math.nan, False, False),
    ],
)
def test_what_is_an_integer_and_what_is_a_number(value: object, integer: bool, number: bool) -> None:
    assert is_int(value) is integer
    assert is_number(value) is number


def test_non_finite_numbers_only_when_asked() -> None:
    assert is_number(math.inf, finite=False) and is_number(math.nan, finite=False)
    assert not is_number(True, finite=False)


def test_the_message_names_the_thing_the_value_and_what_is_accepted() -> None:
    assert str(invalid("gamma", 1.5, "in (0, 1]")) == "Invalid gamma: 1.5; expected in (0, 1]"
    assert str(invalid("env", "x", "an id")) == "Invalid env: 'x'; expected an id"
    require(True, "gamma", 1.5, "anything")
    with pytest.raises(ValueError, match=r"^Invalid gamma: 1.5; expected in \(0, 1\]$"):
        require(False, "gamma", 1.5, "in (0, 1]")


def test_check_int() -> None:
    assert check_int("n", np.int32(4), minimum=1) == 4 and type(check_int("n", np.int32(4))) is int
    assert check_int("n", -7) == -7
    with pytest.raises(ValueError, match=r"^Invalid n: 0; expected an integer >= 1$"):
        check_int("n", 0, minimum=1)
    with pytest.raises(ValueError, match=r"^Invalid n: 2.0; expected an integer >= 1$"):
        check_int("n", 2.0, minimum=1)
    with pytest.raises(ValueError, match=r"^Invalid n: True; expected an integer$"):
        check_int("n", True)
    with pytest.raises(ValueError, match=r"^Invalid n: -1; expected an integer >= 0 \(0: off\)$"):
        check_int("n", -1, minimum=0, expected="an integer >= 0 (0: off)")


def test_check_number_bounds() -> None:
    assert check_number("x", 2) == 2.0 and type(check_number("x", np.float32(0.5))) is float
    assert check_number("x", 0.0, minimum=0.0) == 0.0
    assert check_number("x", 1.0, maximum=1.0) == 1.0
    cases = [
        (dict(value=0.0, minimum=0.0, strict=True), r"^Invalid x: 0.0; expected a finite number > 0$"),
        (dict(value=1.0, minimum=0.0, maximum=1.0, strict=True), r"^Invalid x: 1.0; expected a finite number > 0 and < 1$"),
        (dict(value=-0.1, minimum=0.0), r"^Invalid x: -0.1; expected a finite number >= 0$"),
        (dict(value=2.0, maximum=1.0), r"^Invalid x: 2.0; expected a finite number <= 1$"),
        (dict(value=math.nan), r"^Invalid x: nan; expected a finite number$"),
        (dict(value=False), r"^Invalid x: False; expected a finite number$"),
        (dict(value="1", expected="a rate"), r"^Invalid x: '1'; expected a rate$"),
    ]
    for kwargs, message in cases:
        value = kwargs.pop("value")
        with pytest.raises(ValueError, match=message):
            check_number("x", value, **kwargs)  # type: ignore[arg-type]


def test_device_auto_picks_cuda_when_available(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from trpo_lab.validation import check_device

    assert check_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"Invalid device: 'cuda'; CUDA is not available on this machine"):
        check_device("cuda")
    with pytest.raises(ValueError, match=r"Invalid device: 'gpu0'; expected 'cpu', 'cuda', 'cuda:N' or 'auto'"):
        check_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert check_device("auto") == torch.device("cuda")


def test_agent_device_auto_and_its_sync_free_default() -> None:
    import torch

    from trpo_lab import TRPO

    agent = TRPO("CartPole-v1", n_envs=1, n_steps=8, device="auto")
    expected = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert agent.device.type == expected.type
    assert agent.sync_free is (expected.type == "cuda")
    agent.close()

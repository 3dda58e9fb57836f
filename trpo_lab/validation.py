"""The one argument-validation helper of trpo_lab.

Every public function, optimizer, config and adapter checks its arguments with these, so
that every message has the same shape::

    Invalid <name>: <value!r>; expected <what is accepted>

``bool`` is never accepted where a number is expected (``True`` is an ``int`` in Python),
and numpy scalars are accepted where the Python type is.
"""

from __future__ import annotations

import math
import numbers
from typing import NoReturn, cast

import torch

__all__ = ["is_int", "is_number", "invalid", "require", "check_int", "check_number", "check_device", "first_line"]


def is_int(value: object) -> bool:
    """Whether ``value`` is an integer (Python or numpy), and not a ``bool``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: object, *, finite: bool = True) -> bool:
    """Whether ``value`` is a real number (not a ``bool``), finite unless ``finite=False``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return not finite or math.isfinite(float(value))


def invalid(name: str, value: object, expected: str) -> ValueError:
    """The ``ValueError`` for a bad ``value`` of ``name`` (to ``raise`` at the call site)."""
    return ValueError(f"Invalid {name}: {value!r}; expected {expected}")


def require(condition: bool, name: str, value: object, expected: str) -> None:
    """Raise :func:`invalid` unless ``condition`` holds."""
    if not condition:
        raise invalid(name, value, expected)


def _fail(name: str, value: object, expected: str) -> NoReturn:
    raise invalid(name, value, expected)


def check_int(name: str, value: object, *, minimum: int | None = None, expected: str | None = None) -> int:
    """Return ``value`` as an ``int`` if it is an integer ``>= minimum``; else raise.

    ``expected`` defaults to ``"an integer >= {minimum}"`` (``"an integer"`` without a minimum).
    """
    if expected is None:
        expected = "an integer" if minimum is None else f"an integer >= {minimum}"
    if not is_int(value):
        _fail(name, value, expected)
    number = int(cast(numbers.Integral, value))
    if minimum is not None and number < minimum:
        _fail(name, value, expected)
    return number


def check_number(
    name: str,
    value: object,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    strict: bool = False,
    expected: str | None = None,
) -> float:
    """Return ``value`` as a ``float`` if it is a finite number in range; else raise.

    Args:
        name: The argument's name, as the user wrote it.
        value: What was passed.
        minimum: Lower bound, or ``None``.
        maximum: Upper bound, or ``None``.
        strict: Bounds are exclusive (``minimum < value < maximum``) when ``True``.
        expected: What is accepted, for the message; derived from the bounds by default.
    """
    if expected is None:
        bounds = []
        if minimum is not None:
            bounds.append(f"{'>' if strict else '>='} {minimum:g}")
        if maximum is not None:
            bounds.append(f"{'<' if strict else '<='} {maximum:g}")
        expected = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
    if not is_number(value):
        _fail(name, value, expected)
    number = float(cast(numbers.Real, value))
    if minimum is not None and (number <= minimum if strict else number < minimum):
        _fail(name, value, expected)
    if maximum is not None and (number >= maximum if strict else number > maximum):
        _fail(name, value, expected)
    return number


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_device(device: str | torch.device) -> torch.device:
    """The torch device for ``device`` (``"auto"``: CUDA when available), or a clear error."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"Invalid device: {device!r}; expected 'cpu', 'cuda', 'cuda:N' or 'auto'") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Invalid device: {device!r}; CUDA is not available on this machine (use 'cpu')")
    return resolved

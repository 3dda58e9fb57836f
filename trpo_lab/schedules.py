"""Hyperparameter schedules: a value as a function of the remaining progress of ``learn``.

Stable-Baselines3's convention: a schedule is a function of ``progress_remaining``, which
goes from 1 at the start of :meth:`~trpo_lab.agents.base.OnPolicyAgent.learn` to 0 at its
``total_timesteps``:

    progress_remaining = clip(1 − num_timesteps / total_timesteps, 0, 1)

evaluated by the shared loop after each rollout (with that rollout's steps counted, as SB3),
so the first update sees ``1 − steps/total`` and the update of the last rollout sees 0: a
schedule ends at its final value. A linear schedule from ``initial`` to ``final`` is

    value(p) = final + (initial − final) · p.

The fields that take schedules (``learning_rate``, ``ent_coef``, PPO's ``clip_range``; see
:data:`trpo_lab.config.SCHEDULED`) accept

* a number: constant;
* ``"linear"``: from the field's initial value to 0;
* ``"linear:<final>"``: from the field's initial value to ``final``;
* ``"linear:<initial>:<final>"``: both ends given (how ``config.toml`` records a schedule);
* a callable ``f(progress_remaining) -> float`` (Python only).

The *initial value* of ``"linear"`` and ``"linear:<final>"`` is the number the field had
before the string was applied (the preset's, when ``--set learning_rate=linear`` lands on a
preset, see :func:`trpo_lab.config.merge_hyperparameters`), else the config's default.
Callables cannot be written to ``config.toml`` or a checkpoint: saving a config that holds one
raises a ``ValueError`` that says what to write instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trpo_lab.validation import is_number

__all__ = ["Schedule", "parse_schedule", "progress_remaining", "with_initial"]

ProgressFunction = Callable[[float], float]
_FORMS = "a number, 'linear', 'linear:<final>', 'linear:<initial>:<final>' or a callable of progress_remaining"


@dataclass(frozen=True)
class Schedule:
    """A scheduled hyperparameter: linear between two values, or a callable of the remaining progress.

    Attributes:
        initial: The value at ``progress_remaining = 1`` (for a callable: ``function(1.0)``).
        final: The value at ``progress_remaining = 0`` (for a callable: ``function(0.0)``).
        function: The user's callable, or ``None`` for the linear schedule.
    """

    initial: float
    final: float
    function: ProgressFunction | None = None

    def __call__(self, progress_remaining: float) -> float:
        """The value at ``progress_remaining`` (clipped to [0, 1])."""
        p = min(max(float(progress_remaining), 0.0), 1.0)
        if self.function is None:
            return self.final + (self.initial - self.final) * p
        return float(self.function(p))

    @property
    def is_callable(self) -> bool:
        return self.function is not None

    def to_string(self, name: str) -> str:
        """``"linear:<initial>:<final>"``, the form ``config.toml`` and checkpoints hold.

        Raises:
            ValueError: a callable schedule, which no file can hold.
        """
        if self.function is not None:
            raise ValueError(
                f"Cannot save {name}: it is a callable schedule ({getattr(self.function, '__name__', self.function)}), "
                "which config.toml and checkpoints cannot hold; use a number, 'linear', 'linear:<final>' or "
                "'linear:<initial>:<final>' to save or resume the run"
            )
        return f"linear:{self.initial!r}:{self.final!r}"


def _number(name: str, text: str, whole: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"Invalid {name}: {whole!r}; {text!r} is not a number (expected {_FORMS})") from None
    if not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {whole!r}; {text!r} is not finite (expected {_FORMS})")
    return value


def parse_schedule(name: str, value: Any, initial: float) -> float | Schedule:
    """A number (constant) or a :class:`Schedule` from any accepted form (see the module docstring).

    Args:
        name: The field, for error messages.
        value: A number, a schedule string, a :class:`Schedule` or a callable.
        initial: The start of ``"linear"`` / ``"linear:<final>"``.

    Raises:
        ValueError: anything else, or a callable that does not return a finite number at 1 and 0.
    """
    if isinstance(value, Schedule):
        return value
    if is_number(value, finite=False):
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"Invalid {name}: {value!r}; expected a finite number or a schedule ({_FORMS})")
        return number
    if isinstance(value, str):
        kind, *ends = [part.strip() for part in value.strip().split(":")]
        if kind != "linear" or len(ends) > 2:
            raise ValueError(f"Invalid {name}: {value!r}; expected {_FORMS}")
        numbers = [_number(name, end, value) for end in ends]
        if len(numbers) == 2:
            return Schedule(initial=numbers[0], final=numbers[1])
        return Schedule(initial=float(initial), final=numbers[0] if numbers else 0.0)
    if callable(value) and not isinstance(value, type):
        at_ends: list[float] = []
        for p in (1.0, 0.0):
            try:
                out = value(p)
            except Exception as exc:
                raise ValueError(f"Invalid {name}: the callable schedule failed at progress_remaining={p}: {exc}") from exc
            if not is_number(out) or not math.isfinite(float(out)):
                raise ValueError(
                    f"Invalid {name}: the callable schedule returned {out!r} at progress_remaining={p}; "
                    "expected a finite number"
                )
            at_ends.append(float(out))
        return Schedule(initial=at_ends[0], final=at_ends[1], function=value)
    raise ValueError(f"Invalid {name}: {value!r} ({type(value).__name__}); expected {_FORMS}")


def with_initial(new: Any, old: Any) -> Any:
    """``new`` with the start of a ``"linear"`` / ``"linear:<final>"`` string taken from ``old``:
    a number, or the initial value of a schedule (a :class:`Schedule` or its string form).

    So ``learning_rate = "linear"`` layered over ``learning_rate = 1e-3`` decays from 1e-3, and
    over ``learning_rate = "linear:1e-3:1e-4"`` from 1e-3 to 0; anything else is returned unchanged.
    """
    if isinstance(old, str):
        try:
            old = parse_schedule("value", old, initial=math.nan)
        except ValueError:
            return new
    if isinstance(old, Schedule):
        old = old.initial
    if isinstance(new, str) and is_number(old) and math.isfinite(float(old)):
        kind, *ends = [part.strip() for part in new.strip().split(":")]
        if kind == "linear" and len(ends) <= 1:
            return f"linear:{float(old)!r}:{ends[0] if ends else '0.0'}"
    return new


def progress_remaining(num_timesteps: int, total_timesteps: int) -> float:
    """``clip(1 − num_timesteps / total_timesteps, 0, 1)`` (SB3's convention)."""
    if total_timesteps <= 0:
        return 1.0
    return min(max(1.0 - num_timesteps / total_timesteps, 0.0), 1.0)

"""Stopping a training run cleanly on SIGINT / SIGTERM.

During :meth:`~trpo_lab.agents.base.OnPolicyAgent.learn` the first SIGINT or SIGTERM is
recorded (:class:`StopRequest`): the current update finishes, a checkpoint is written and
:class:`TrainingInterrupted` is raised. A second signal stops at once (``KeyboardInterrupt``).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["StopRequest", "TrainingInterrupted", "stop_on_signals"]


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped :meth:`OnPolicyAgent.learn` after writing a checkpoint.

    A ``KeyboardInterrupt``, so code that treats Ctrl-C as "stop" keeps doing so.

    Attributes:
        signum: The signal received.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class StopRequest:
    """The first SIGINT/SIGTERM received during :meth:`OnPolicyAgent.learn` (``None``: none yet)."""

    def __init__(self) -> None:
        self.signum: int | None = None


@contextmanager
def stop_on_signals(stop: StopRequest) -> Iterator[None]:
    """While inside: SIGINT/SIGTERM set ``stop.signum`` (a second one raises KeyboardInterrupt).

    Only in the main thread (Python delivers signals there); signals that are ignored
    (``SIG_IGN``, e.g. under ``nohup``) stay ignored; the previous handlers come back on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.signum is not None:
            raise KeyboardInterrupt
        stop.signum = signum
        print(
            f"trpo-lab: {signal.Signals(signum).name} received; finishing this update and writing a checkpoint "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    previous: dict[signal.Signals, Any] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        current = signal.getsignal(signum)
        if current is signal.SIG_IGN:
            continue
        previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old if old is not None else signal.SIG_DFL)

"""Suite-wide settings: one torch thread (small networks run faster, and CI has 2 cores), and
Python's own SIGINT handler for every test."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def default_sigint_handler() -> Iterator[None]:
    """Install ``signal.default_int_handler`` for SIGINT during each test, restore it after.

    Python installs it at start-up only when SIGINT is not ignored; a suite started under
    ``nohup`` (or by a parent that ignores SIGINT) would otherwise run with ``SIG_IGN``, and
    the tests of the learn loop's signal handling rely on the handler a terminal session has.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)

"""Spawning two local ranks for the distributed tests (a plain module the test files import)."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _exit_cleanly(rank: int, worker: Callable[..., None], *args: object) -> None:
    """Run a worker, then leave without the interpreter's teardown: gloo's threads can abort
    it (SIGABRT, "terminate called without an active exception") after a clean run, as the
    CLI's torchrun ranks also avoid. A failing worker still raises and exits non-zero."""
    worker(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_two(worker: Callable[..., None], *args: object) -> None:
    """Run ``worker(rank, port, *args)`` on ranks 0 and 1 (spawned processes) and wait."""
    mp.start_processes(_exit_cleanly, args=(worker, free_port(), *args), nprocs=2, start_method="spawn", join=True)

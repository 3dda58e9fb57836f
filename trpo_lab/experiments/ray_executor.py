"""The Ray executor of a compare: each run is a Ray task of one CPU.

The runs write into their run directories exactly as local worker processes do, so every
Ray node must have trpo_lab installed and see the compare folder at the same path (a shared
filesystem); a rerun then skips finished runs and continues unfinished ones from their
checkpoints, whichever executor ran them first.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from trpo_lab.experiments.spec import RunSpec

__all__ = ["import_ray", "run_on_ray"]


def import_ray() -> Any:
    """The ``ray`` module, or a ``ValueError`` that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ValueError("Invalid executor 'ray': Ray is not installed; pip install 'trpo-lab[ray]'") from None
    return ray


def run_on_ray(
    pending: Sequence[RunSpec],
    execute: Callable[[RunSpec], dict[str, Any]],
    max_in_flight: int | None,
    address: str | None,
    finish: Callable[[RunSpec, Callable[[], dict[str, Any]]], None],
    say: Callable[[str], None],
) -> None:
    """Run ``execute`` on each of ``pending`` as Ray tasks (one CPU each, no retries); ``finish`` each as it ends.

    Uses the Ray instance this process has already initialised, else ``ray.init(address)``
    (``num_cpus = max_in_flight`` for a new local instance), shut down again at the end. The
    runs' ``run_dir`` are made absolute. On Ctrl-C the running tasks are cancelled; they
    continue from their last periodic checkpoint on a rerun.

    Args:
        pending: The runs to do.
        execute: What a task runs (picklable by reference: a module-level function).
        max_in_flight: The most tasks at once (default: the cluster's CPU count).
        address: ``ray.init`` address, or ``None`` for a local instance (or ``RAY_ADDRESS``).
        finish: Called as ``finish(spec, result)`` when a task ends; ``result()`` returns its
            record or raises the run's own error.
        say: Where the progress lines go.
    """
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        local_cpus = max_in_flight if address is None and "RAY_ADDRESS" not in os.environ else None
        ray.init(address=address, num_cpus=local_cpus, include_dashboard=False, logging_level="ERROR")
    try:
        limit = max_in_flight or max(1, int(ray.cluster_resources().get("CPU", 1)))
        say(f"ray: {len(pending)} run(s) as tasks, at most {limit} at once, on {ray.cluster_resources().get('CPU', 0):g} CPUs")
        task = ray.remote(num_cpus=1, max_retries=0)(execute)
        waiting = [replace(spec, run_dir=spec.run_dir.resolve()) for spec in pending]
        running: dict[Any, RunSpec] = {}

        def result_of(ref: Any) -> Callable[[], dict[str, Any]]:
            def result() -> dict[str, Any]:
                try:
                    record: dict[str, Any] = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:  # re-raise the run's own error
                    cause = getattr(exc, "cause", None)
                    raise (cause if isinstance(cause, Exception) else exc) from None
                return record
            return result

        try:
            while waiting or running:
                while waiting and len(running) < limit:
                    spec = waiting.pop(0)
                    running[task.remote(spec)] = spec
                done, _ = ray.wait(list(running), num_returns=1, timeout=0.25)
                for ref in done:
                    finish(running.pop(ref), result_of(ref))
        except BaseException:
            say(f"stopping: cancelling {len(running)} Ray task(s); run the same command again to continue them")
            for ref in running:
                ray.cancel(ref)
            raise
    finally:
        if started:
            ray.shutdown()

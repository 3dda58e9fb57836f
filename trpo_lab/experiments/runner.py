"""Running a compare: one grid cell in a worker, the workers' lifecycle, the local process pool.

Every run trains in a worker process with one torch thread (:func:`execute_run`), evaluates
its final agent deterministically and writes ``result.json`` last, atomically. A run is
finished when its ``final.pt`` and ``result.json`` exist; rerunning a compare skips finished
runs and continues unfinished ones from their ``checkpoint.pt``, and a rerun with other
settings into the same folder is refused rather than mixing results, and so is a folder
holding a ``result.json`` without its final agent (restarting it would delete the result).

Ctrl-C or SIGTERM stops every running run at a fresh checkpoint (exit status 130 / 143):
workers ignore SIGINT, and the main process answers the interrupt by sending each worker one
SIGTERM, on which ``learn`` finishes its update, writes ``checkpoint.pt`` and stops. A
watchdog thread in each worker does the same if the main process dies.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trpo_lab.experiments.peers import check_peer, is_peer
from trpo_lab.experiments.ray_executor import import_ray, run_on_ray
from trpo_lab.experiments.report import write_outputs
from trpo_lab.experiments.spec import DEFAULT_TIMESTEPS, Experiment, RunSpec, without_speed_only
from trpo_lab.logging import FolderLock, atomic_write_text
from trpo_lab.validation import check_int

if TYPE_CHECKING:
    from trpo_lab.agents.base import OnPolicyAgent
    from trpo_lab.distributed import DistributedContext

__all__ = [
    "SPEC_FILE",
    "RESULT_FILE",
    "CompareResult",
    "run_experiment",
    "execute_run",
    "finished_result",
    "resume_run",
    "interleaved",
]

SPEC_FILE = "spec.json"
RESULT_FILE = "result.json"


# ---------------------------------------------------------------------------- one run
def resume_run(
    run_dir: str | Path,
    device: str = "cpu",
    dist: DistributedContext | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[OnPolicyAgent, int]:
    """Load a run's ``checkpoint.pt`` to continue it with ``agent.learn(total, run_dir=run_dir)``.

    ``learn`` trims ``progress.csv`` to the checkpoint (rows a killed run logged after it, and
    a row cut short, go), so the continued file has no gap or duplicate. With ``dist`` (every
    rank calls this), rank 0 reads the run directory and every rank continues from it.

    Args:
        run_dir: The run directory.
        device: Torch device to continue on.
        dist: Data-parallel context (every rank calls this).
        overrides: Hyperparameters to change from here on (``train --resume --set``), layered
            on the checkpoint's as presets are (``"linear"`` starts from the saved number).
            Keys the checkpoint fixes (network shape, ``n_envs``, optimizer state...) are
            refused (:func:`~trpo_lab.config.check_resume_overrides`).

    Returns:
        ``(agent, total_timesteps)``, the budget recorded in the run's ``config.toml``.

    Raises:
        ValueError: no such folder, an unreadable or hand-edited ``config.toml`` with an
            unknown key or invalid value (:func:`~trpo_lab.agents.checkpoint.check_config_toml`),
            or a missing, damaged or unsafe ``checkpoint.pt``.
    """
    from trpo_lab.agents.base import OnPolicyAgent
    from trpo_lab.agents.checkpoint import check_config_toml
    from trpo_lab.config import check_resume_overrides, load_toml

    run_dir = Path(run_dir)
    overrides = dict(overrides or {})

    def recorded() -> tuple[int, str]:
        if not run_dir.is_dir():
            raise ValueError(f"Run directory not found: {run_dir}")
        data = load_toml(run_dir / "config.toml")
        budget = check_config_toml(data, run_dir / "config.toml")
        return DEFAULT_TIMESTEPS if budget is None else budget, str(data.get("algo", ""))

    budget, algo = recorded() if dist is None else dist.run_on_main(recorded)
    if overrides and algo:
        check_resume_overrides(algo, overrides)
    agent = OnPolicyAgent.load(run_dir / "checkpoint.pt", device=device, dist=dist, **overrides)
    return agent, budget


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _final_file(spec: RunSpec) -> str:
    """The file name of a run's final agent (a peer run saves its SB3 model)."""
    return "final.zip" if is_peer(spec.algo) else "final.pt"


def finished_result(spec: RunSpec) -> dict[str, Any] | None:
    """The result record of a finished run with these settings, else ``None``."""
    if not (spec.run_dir / _final_file(spec)).is_file():
        return None
    record = _read_json(spec.run_dir / RESULT_FILE)
    if record is None or not spec.same_run(record.get("settings")):
        return None
    return record


_progress_queue: Any = None
_busy = threading.Event()  # set while this worker runs a task
_in_worker = False  # set by _init_worker
# Set in a worker once the experiment is stopping (a SIGTERM, or a run stopped by one): the
# executor may already have handed this worker its next run, which must then not start.
_stopping = threading.Event()


def _init_worker(queue: Any) -> None:
    """Worker set-up: one torch thread, progress queue, signals (see :func:`run_experiment`).

    SIGINT is ignored: Ctrl-C reaches the whole process group, and the main process answers
    it by sending each worker one SIGTERM, on which ``learn`` finishes its update, writes
    ``checkpoint.pt`` and stops. Outside ``learn`` SIGTERM does not exit: killing an idle
    worker could leave the executor's shared call-queue lock held and deadlock the others,
    which then exit normally on the executor's shutdown. Once stopped, by a signal or by a run
    that stopped at a checkpoint, a worker starts no further run: the executor hands a worker
    its next run ahead of time, and cancelling the queue cannot take that one back. A watchdog stops the run the same
    way if the main process dies, then exits instead of waiting forever for tasks.
    """
    import torch

    global _progress_queue, _in_worker
    _progress_queue = queue
    _in_worker = True
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _note_stop)  # a handler, not SIG_IGN: learn() replaces it while training
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _note_stop(signum: int, frame: Any) -> None:
    """SIGTERM outside ``learn``: no exit (see :func:`_init_worker`'s docstring), but no further
    run starts in this worker (:func:`execute_run`)."""
    _stopping.set()


def _exit_with_parent(parent_pid: int, grace_s: float = 300.0) -> None:
    """The watchdog: once the parent is gone, stop a running run at a checkpoint, then exit."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    if _busy.is_set():
        os.kill(os.getpid(), signal.SIGTERM)  # learn() checkpoints and stops
        deadline = time.monotonic() + grace_s
        while _busy.is_set() and time.monotonic() < deadline:
            time.sleep(0.1)
    os._exit(1)


def _report(message: tuple[Any, ...]) -> None:
    if _progress_queue is not None:
        _progress_queue.put(message)


def _start_or_resume(spec: RunSpec) -> OnPolicyAgent:
    from trpo_lab.agents import agent_class
    from trpo_lab.agents.base import OnPolicyAgent

    run_dir = spec.run_dir
    stored = _read_json(run_dir / SPEC_FILE)
    if spec.same_run(stored) and (run_dir / "checkpoint.pt").is_file():
        if stored != spec.settings():  # a speed-only setting changed: the run goes on with the new one
            atomic_write_text(run_dir / SPEC_FILE, json.dumps(spec.settings(), indent=2))
        return OnPolicyAgent.load(run_dir / "checkpoint.pt", **spec.speed_only_hyperparameters())
    if run_dir.exists():  # started but never checkpointed: start over
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    atomic_write_text(run_dir / SPEC_FILE, json.dumps(spec.settings(), indent=2))
    return agent_class(spec.algo)(
        spec.env_id,
        n_envs=spec.n_envs,
        seed=spec.seed,
        vectorization=spec.vectorization,
        **spec.hyperparameters,
    )


def execute_run(spec: RunSpec) -> dict[str, Any]:
    """Train, evaluate and record one run (in a worker process); returns its result record.

    A peer run (``sb3-trpo``, ``sb3-ppo``) trains through
    :func:`~trpo_lab.experiments.peers.execute_peer_run`, with the same files and record.
    """
    import torch

    from trpo_lab.agents.base import TrainingInterrupted

    if _in_worker and _stopping.is_set():  # handed over before the stop: leave it for the rerun
        raise TrainingInterrupted(f"{spec.key} not started: the experiment is stopping", signal.SIGTERM)
    torch.set_num_threads(1)
    _busy.set()
    try:
        if is_peer(spec.algo):
            from trpo_lab.experiments.peers import execute_peer_run

            return execute_peer_run(spec, _report)
        return _train_and_evaluate(spec)
    except KeyboardInterrupt:  # TrainingInterrupted, or a second signal's plain KeyboardInterrupt
        if _in_worker:
            _stopping.set()
        raise
    finally:
        _busy.clear()


def _train_and_evaluate(spec: RunSpec) -> dict[str, Any]:
    agent = _start_or_resume(spec)
    _report(("start", spec.key, agent.num_timesteps))

    def on_update(trained: OnPolicyAgent, metrics: dict[str, float]) -> None:
        _report(("progress", spec.key, trained.num_timesteps))

    try:
        agent.learn(spec.total_timesteps, run_dir=spec.run_dir, callback=on_update)
        eval_start = time.perf_counter()
        returns = agent.evaluate(spec.eval_episodes)
        eval_s = time.perf_counter() - eval_start
    finally:
        agent.close()
    return write_result(
        spec, returns, timesteps=agent.num_timesteps, updates=agent.num_updates, wall_s=agent.wall_time,
        cpu_s=agent.cpu_time,
        train_returns=list(agent.episode_returns), eval_s=eval_s,
    )


def write_result(
    spec: RunSpec,
    returns: Any,
    *,
    timesteps: int,
    updates: int,
    wall_s: float,
    train_returns: list[float],
    eval_s: float,
    cpu_s: float = math.nan,
) -> dict[str, Any]:
    """The run's ``result.json`` record (ours and SB3 peers alike), written atomically.

    ``returns`` are the final agent's deterministic evaluation returns; ``train_returns`` the
    returns of the last training episodes; ``cpu_s`` the training's CPU seconds (NaN: unknown).
    """
    record = {
        "algo": spec.name,
        "base_algo": spec.algo,
        "env": spec.env_id,
        "seed": spec.seed,
        "final_return": float(np.mean(returns)),
        "final_return_std": float(np.std(returns)),
        "eval_returns": [float(r) for r in returns],
        "eval_episodes": spec.eval_episodes,
        "timesteps": int(timesteps),
        "updates": int(updates),
        "wall_s": wall_s,
        "fps": timesteps / max(wall_s, 1e-9),
        "cpu_s": cpu_s,
        "train_return": float(np.mean(train_returns)) if train_returns else float("nan"),
        "eval_s": eval_s,
        "settings": spec.settings(),
    }
    atomic_write_text(spec.run_dir / RESULT_FILE, json.dumps(record, indent=2))
    return record


# ---------------------------------------------------------------------------- the local executor
class _Display:
    """Overall progress (rich) plus one printed line per finished or skipped run.

    The live bars (the whole compare, with its ETA from the steps finished so far, and one per
    running run) are drawn only when ``enabled`` and both stdout and stderr are terminals: a
    compare piped into a file or a CI log prints just the per-run lines.
    """

    def __init__(self, total_steps: int, done_steps: int, n_runs: int, enabled: bool) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        self.live = bool(enabled and sys.stdout.isatty() and self.console.is_terminal)
        enabled = self.live
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not enabled,
        )
        self.n_runs = n_runs
        self.finished = 0
        self.overall = self.progress.add_task("compare", total=max(total_steps, 1), completed=done_steps, info="")
        self.tasks: dict[str, Any] = {}
        self.steps: dict[str, int] = {}
        self.base = done_steps

    def __enter__(self) -> _Display:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def line(self, text: str) -> None:
        self.progress.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def count(self) -> None:
        self.finished += 1
        self.progress.update(self.overall, info=f"{self.finished}/{self.n_runs} runs")

    def message(self, message: tuple[Any, ...], budgets: Mapping[str, int]) -> None:
        kind, key, steps = message
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(f"  {key}", total=budgets[key], completed=steps, info="")
        self.steps[key] = max(self.steps.get(key, 0), min(int(steps), budgets[key]))
        self.progress.update(self.tasks[key], completed=self.steps[key])
        self.progress.update(self.overall, completed=self.base + sum(self.steps.values()))

    def done(self, key: str, budget: int) -> None:
        if key in self.tasks:
            self.progress.remove_task(self.tasks.pop(key))
        self.steps[key] = budget
        self.progress.update(self.overall, completed=self.base + sum(self.steps.values()))
        self.count()


def _drain(queue: Any, show: Callable[[tuple[Any, ...]], None]) -> None:
    import queue as queue_module

    while True:
        try:
            message = queue.get_nowait()
        except (queue_module.Empty, OSError, EOFError):
            return
        show(message)


def _stop_workers(pool: ProcessPoolExecutor, timeout_s: float = 300.0) -> None:
    """Cancel queued runs and SIGTERM the workers: a training one checkpoints and stops, an idle
    one ignores it (see :func:`_init_worker`); all then leave on the executor's shutdown."""
    # ProcessPoolExecutor has no public handle on its processes.
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + timeout_s
    for process in processes:
        process.join(timeout=max(deadline - time.monotonic(), 0.0))
        if process.is_alive():
            process.kill()


def _run_locally(
    pending: Sequence[RunSpec],
    workers: int,
    finish: Callable[[RunSpec, Callable[[], dict[str, Any]]], None],
    say: Callable[[str], None],
    show: Callable[[tuple[Any, ...]], None],
) -> None:
    """Run ``pending`` in a pool of ``workers`` spawned processes; ``finish`` each as it ends.

    ``show`` receives the workers' progress messages. On any exception (Ctrl-C included) the
    unfinished runs stop at a checkpoint (:func:`_stop_workers`) and the exception propagates.
    """
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    pool = ProcessPoolExecutor(
        max_workers=min(workers, len(pending)), mp_context=context,
        initializer=_init_worker, initargs=(queue,),
    )
    futures: dict[Future[dict[str, Any]], RunSpec] = {}
    try:
        futures.update({pool.submit(execute_run, s): s for s in pending})
        while futures:
            done, _ = wait(futures, timeout=0.25, return_when=FIRST_COMPLETED)
            _drain(queue, show)
            for future in done:
                finish(futures.pop(future), future.result)
    except BaseException:
        say(
            f"stopping: {len(futures)} unfinished run(s) stop at a checkpoint; "
            "run the same command again to continue them"
        )
        _stop_workers(pool)
        raise
    pool.shutdown(wait=True)
    queue.close()


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """In the main thread, turn SIGTERM into KeyboardInterrupt so it stops the workers cleanly."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    from trpo_lab.agents.base import TrainingInterrupted

    def handler(signum: int, frame: Any) -> None:
        raise TrainingInterrupted(f"{signal.Signals(signum).name} received", signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------- the compare
@dataclass
class CompareResult:
    """What :func:`run_experiment` did."""

    out_dir: Path
    records: list[dict[str, Any]]
    skipped: list[str]
    failures: list[str] = field(default_factory=list)
    report: str = ""
    elapsed_s: float = 0.0


def _check_existing(specs: Sequence[RunSpec]) -> None:
    for spec in specs:
        final = _final_file(spec)
        if (spec.run_dir / RESULT_FILE).is_file() and not (spec.run_dir / final).is_file():
            # a finished run whose agent file is missing (not copied, or deleted): starting it
            # over would delete its result, so refuse instead
            raise ValueError(
                f"{spec.run_dir} holds a {RESULT_FILE} but no {final}; restore {final} to keep the "
                "finished run, or delete the folder to train it again"
            )
        stored = _read_json(spec.run_dir / SPEC_FILE)
        if stored is not None and not spec.same_run(stored):
            stored, wanted = without_speed_only(stored), without_speed_only(spec.settings())
            changed = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
            raise ValueError(
                f"{spec.run_dir} holds a run with other settings ({', '.join(changed)} differ); "
                "use another --out or delete it"
            )


def run_experiment(
    experiment: Experiment,
    out_dir: str | Path,
    workers: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    interleave: bool = False,
) -> CompareResult:
    """Run every unfinished cell of the grid in ``workers`` processes, then write the outputs.

    Args:
        experiment: The validated spec (:func:`~trpo_lab.experiments.spec.load_experiment`).
        out_dir: The compare folder (created); finished runs already in it are skipped.
        workers: Worker processes (default: the spec's ``workers``, else the CPU count); with
            Ray, the most runs in flight at once (default: all, as the cluster's CPUs allow).
        progress: Show the rich progress display (on stderr).
        log: Where the per-run lines go (default: the display's console).
        executor: ``"local"`` (a process pool on this machine) or ``"ray"``: each run is a Ray
            task of one CPU (:func:`~trpo_lab.experiments.ray_executor.run_on_ray`), on the Ray
            instance already initialised in this process, the cluster at ``ray_address``, or a
            local one started here. Every Ray node must have trpo_lab installed and see
            ``out_dir`` at the same path (a shared filesystem), where the runs write as they
            would locally.
        ray_address: ``ray.init`` address (``"auto"``, ``"ray://head:10001"``...); ``None``
            starts a local instance (or joins ``RAY_ADDRESS``).
        interleave: Start the runs seed by seed, then env by env, the algorithms in the order
            of ``experiment.algos`` within each (instead of the grid's env-major order): with
            ours and peers alternating in ``algos``, each comes next to the other in time, so
            machine load hits both alike, and an interrupted compare has every algorithm on
            the first seeds. The outputs keep the grid's order.

    Raises:
        ValueError: bad spec, an algorithm this install cannot run, ``workers < 1``, an
            unknown executor or Ray not installed, or an output folder holding runs with
            other settings.
        FolderLockedError: another compare (local or Ray) is writing into ``out_dir``; the
            message names its pid.
        WriteFailedError: a result file or the report could not be written (full disk,
            read-only folder), naming the file.
    """
    from trpo_lab.agents import agent_class

    if executor not in ("local", "ray"):
        raise ValueError(f"Invalid executor: {executor!r}; expected 'local' or 'ray'")
    if ray_address is not None and executor != "ray":
        raise ValueError(f"Invalid ray_address: {ray_address!r}; it needs executor 'ray'")
    workers_given = workers if workers is not None else experiment.workers
    workers = check_int("workers", workers if workers is not None else (experiment.workers or os.cpu_count() or 1), minimum=1)
    if executor == "ray":
        import_ray()  # fail before starting anything if Ray is missing
    for label in experiment.algos:  # fail before starting anything if an algorithm is unavailable
        if is_peer(label):
            check_peer(label)
        else:
            agent_class(experiment.algo_of(label))
    out = Path(out_dir)
    specs = experiment.runs(out)
    budget_notes = _budget_notes(specs)
    _check_existing(specs)
    with FolderLock(out, "compare folder"):  # one compare (local or Ray) per folder at a time
        _check_existing(specs)  # again, now that no other compare can write into it
        return _run_grid(
            experiment, out, specs, budget_notes, workers, workers_given, progress, log, executor, ray_address,
            interleave,
        )


def interleaved(experiment: Experiment, specs: Sequence[RunSpec]) -> list[RunSpec]:
    """``specs`` seed by seed, then env by env, the names in the order of ``experiment.algos``.

    With ours and peers alternating in ``algos`` (``trpo, sb3-trpo, ppo, sb3-ppo``), each run
    starts next to its counterpart on the same env and seed.
    """
    seed_rank = {seed: i for i, seed in enumerate(experiment.seeds)}
    env_rank = {env_id: i for i, env_id in enumerate(experiment.envs)}
    algo_rank = {label: i for i, label in enumerate(experiment.algos)}
    return sorted(specs, key=lambda s: (seed_rank[s.seed], env_rank[s.env_id], algo_rank[s.name]))


def _budget_notes(specs: Sequence[RunSpec]) -> list[str]:
    """One line per run whose budget is less than one rollout (what will run instead), before
    anything starts; more environments than steps is an error naming the run."""
    from trpo_lab.config import config_class
    from trpo_lab.resources import rollout_budget_note

    notes = []
    for spec in specs:
        if is_peer(spec.algo):  # SB3 runs at least one rollout of its own n_steps
            continue
        n_steps = config_class(spec.algo).from_dict(spec.hyperparameters).n_steps
        try:
            note = rollout_budget_note(spec.total_timesteps, spec.n_envs, n_steps)
        except ValueError as exc:
            raise ValueError(f"{spec.key}: {exc}") from None
        if note is not None:
            notes.append(f"warning {spec.key}: {note}")
    return notes


def _run_grid(
    experiment: Experiment,
    out: Path,
    specs: Sequence[RunSpec],
    budget_notes: Sequence[str],
    workers: int,
    workers_given: int | None,
    progress: bool,
    log: Callable[[str], None] | None,
    executor: str,
    ray_address: str | None,
    interleave: bool = False,
) -> CompareResult:
    """The body of :func:`run_experiment`, in the held compare folder."""
    atomic_write_text(out / "experiment.toml", experiment.to_toml())
    start = time.perf_counter()
    records: dict[str, dict[str, Any]] = {}
    skipped: list[str] = []
    failures: list[str] = []
    pending: list[RunSpec] = []
    for spec in specs:
        record = finished_result(spec)
        if record is not None:
            records[spec.key] = record
            skipped.append(spec.key)
        else:
            pending.append(spec)
    if interleave:
        pending = interleaved(experiment, pending)
    budgets = {spec.key: spec.total_timesteps for spec in specs}
    done_steps = sum(budgets[key] for key in skipped)
    display = _Display(sum(budgets.values()), done_steps, len(specs), enabled=progress)
    say = log or display.line
    say(
        f"compare {experiment.name}: {len(specs)} runs ({len(experiment.algos)} algos x {len(experiment.envs)} envs "
        f"x {len(experiment.seeds)} seeds), {len(skipped)} already finished, {len(pending)} to run "
        f"on {min(workers, max(len(pending), 1))} worker(s); output {out}"
    )
    for note in budget_notes:
        say(note)
    for key in skipped:
        say(f"skipped {key}: finished earlier (final return {records[key]['final_return']:.1f})")

    def finish(spec: RunSpec, result: Callable[[], dict[str, Any]]) -> None:
        display.done(spec.key, spec.total_timesteps)
        try:
            record = result()
        except Exception as exc:  # a failed run must not lose the others
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            failures.append(f"{spec.key}: {type(exc).__name__}: {message}")
            say(f"FAILED  {failures[-1]}")
            return
        records[spec.key] = record
        say(
            f"done    {spec.key}: final return {record['final_return']:.1f} "
            f"({record['wall_s']:.0f} s, {record['fps']:,.0f} steps/s)"
        )

    with display, _sigterm_as_interrupt():
        for _ in skipped:
            display.count()
        if pending and executor == "ray":
            run_on_ray(pending, execute_run, workers_given, ray_address, finish, say)
        elif pending:
            _run_locally(pending, workers, finish, say, lambda message: display.message(message, budgets))
    finished = [s for s in specs if s.key in records]
    ordered = [records[s.key] for s in finished]
    elapsed = time.perf_counter() - start
    report = write_outputs(experiment, finished, ordered, failures, elapsed, workers, out)
    return CompareResult(out, ordered, skipped, failures, report, elapsed)

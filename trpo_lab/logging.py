"""Run logging: ``progress.csv``, TensorBoard events and a console progress bar; safe writes.

Metric keys are grouped (``rollout/return_mean``, ``train/kl``, ``time/fps``).  The
CSV has one row per update; its first columns are the ones DESIGN.md promises
(``timesteps,episodes,return_mean,kl,fps,wall_s``), followed by every other
metric under its grouped name.

Every file a run or a compare writes goes through this module: results and checkpoints
atomically (:func:`atomic_write_bytes`), so that a failed write (a full disk, a read-only
place) leaves the previous file as it was, and any failed write raises
:class:`WriteFailedError` naming the file and the error. A run directory or compare folder
is held by one process at a time (:class:`FolderLock`).
"""

from __future__ import annotations

import csv
import errno
import io
import math
import os
import tempfile
import threading
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

try:
    import fcntl
except ImportError:  # pragma: no cover  # Windows: folders are not locked
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "RunLogger",
    "CSV_HEADLINE",
    "TIMING_COLUMNS",
    "atomic_write_bytes",
    "atomic_write_text",
    "WriteFailedError",
    "FolderLock",
    "FolderLockedError",
    "LOCK_FILE",
]


class WriteFailedError(OSError, ValueError):
    """Writing a result file failed (``ENOSPC``, ``EACCES``, ``EROFS``...): ``filename`` names it.

    An ``OSError`` (with the original ``errno``) and a ``ValueError`` (the CLI's one-line exit 2).
    """

    def __str__(self) -> str:
        return f"Cannot write {self.filename}: {self.strerror}"


def _write_failed(path: str | Path, exc: OSError, note: str = "") -> WriteFailedError:
    if isinstance(exc, WriteFailedError):
        return exc
    number = exc.errno or errno.EIO
    code = errno.errorcode.get(number, "")
    detail = (exc.strerror or str(exc)) + (f" ({code})" if code else "") + note
    return WriteFailedError(number, detail, str(path))


@contextmanager
def _writing(path: str | Path, note: str = "") -> Iterator[None]:
    """Turn any ``OSError`` inside into a :class:`WriteFailedError` naming ``path`` (``note`` appended)."""
    try:
        yield
    except OSError as exc:
        raise _write_failed(path, exc, note) from exc

# progress.csv column -> metric key
CSV_HEADLINE: dict[str, str] = {
    "timesteps": "time/timesteps",
    "updates": "time/updates",
    "episodes": "rollout/episodes",
    "return_mean": "rollout/return_mean",
    "return_std": "rollout/return_std",
    "length_mean": "rollout/length_mean",
    "kl": "train/kl",
    "fps": "time/fps",
    "wall_s": "time/wall_s",
}
TIMING_COLUMNS = ("fps", "wall_s", "time/update_s", "time/rollout_s", "time/cpu_s")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, fsync and rename.

    A reader (or a crash) sees the old file or the new one, never a mix; the folder is
    fsynced too, so the rename itself survives a power cut (POSIX).

    Raises:
        WriteFailedError: the write failed (the old file, if any, is unchanged and no
            temporary file is left behind).
    """
    path = Path(path)
    with _writing(path, f"; the previous {path.name}, if any, is unchanged"):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


LOCK_FILE = ".trpo_lab.lock"
"""The lock file of a run directory or compare folder (holds the holder's pid)."""


class FolderLockedError(ValueError):
    """Another process holds the folder (:class:`FolderLock`); the message names its pid."""


class FolderLock:
    """An exclusive lock on a folder for one process: a run directory or a compare folder.

    ``flock`` on ``FOLDER/.trpo_lab.lock``, which holds the holder's pid. The kernel releases
    the lock when its holder exits, however it dies (``kill -9`` included), so a lock left by a
    killed process is stale by construction: the next process takes it over
    (:attr:`taken_over_from` is the dead holder's pid). The file itself is never deleted
    (deleting a lock file lets two processes lock two different files). Without ``fcntl``
    (Windows) folders are not locked.

    Args:
        folder: The folder (created).
        what: What the folder is, for the message (``"run directory"``, ``"compare folder"``).
    """

    def __init__(self, folder: str | Path, what: str = "folder") -> None:
        self.folder = Path(folder)
        self.what = what
        self.path = self.folder / LOCK_FILE
        self.taken_over_from: int | None = None
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        """Take the lock, or raise :class:`FolderLockedError` at once (no waiting).

        Raises:
            FolderLockedError: another process (or another lock in this one) holds it.
            WriteFailedError: the lock file cannot be created.
        """
        if fcntl is None or self._fd is not None:  # pragma: no cover
            return self
        with _writing(self.path):
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise _write_failed(self.path, exc) from exc
            who = f"pid {holder}" if holder is not None else "a process whose pid is not recorded"
            raise FolderLockedError(
                f"The {self.what} {self.folder} is in use by another trpo-lab process ({who}, lock file {self.path}); "
                "wait for it to finish or stop it, or use another folder"
            ) from None
        previous = _read_pid(fd)
        self.taken_over_from = previous if previous not in (None, os.getpid()) else None
        try:
            with _writing(self.path):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Let the folder go (the file stays, emptied); idempotent."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:  # a full or read-only disk: the kernel still drops the lock below
            pass
        finally:
            os.close(fd)  # releases the flock

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _format(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return repr(value)
    return str(value)


def _trim_progress(path: Path, last_update: int | None) -> list[str] | None:
    """Keep the header and the complete rows up to ``last_update``; return the header.

    Rows of updates after ``last_update`` (logged after the checkpoint by a run that was then
    killed) go silently. Damage goes with a warning, and the file is repaired atomically: a
    row cut short, rows with the wrong number of fields or an unreadable update number, a
    header cut short (the file starts over) and a file that is not CSV text at all (kept as
    ``progress.csv.damaged``; a new one starts). Rows missing before ``last_update`` (a file
    truncated by something else) are reported.
    """
    try:
        text = path.read_text(encoding="utf-8")
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except (UnicodeDecodeError, csv.Error) as exc:
        damaged = path.with_name(path.name + ".damaged")
        with _writing(damaged):
            os.replace(path, damaged)
        warnings.warn(f"{path} is not readable CSV text ({exc}); kept as {damaged.name}, a new one starts", stacklevel=4)
        return None
    if not rows:
        return None
    header, body = rows[0], rows[1:]
    if not body and not text.endswith("\n"):  # the header itself was cut short
        with _writing(path):
            path.unlink()
        warnings.warn(f"{path} held only part of its header ({len(text)} bytes); it starts over", stacklevel=4)
        return None
    torn = bool(body) and not text.endswith("\n")  # the last row was cut short mid-write
    complete = [row for row in (body[:-1] if torn else body) if len(row) == len(header)]
    col = header.index("updates") if "updates" in header else None
    damaged_rows = len(body) - len(complete)
    kept: list[list[str]] = []
    last_kept = 0
    for row in complete:
        if col is not None:
            try:
                update = int(float(row[col]))
            except ValueError:  # an unreadable update number: a damaged row
                damaged_rows += 1
                continue
            if last_update is not None and update > last_update:
                continue
            last_kept = update
        kept.append(row)
    if damaged_rows:
        warnings.warn(
            f"{path}: dropped {damaged_rows} damaged row(s) (cut short or with the wrong number of fields); repaired",
            stacklevel=4,
        )
    if col is not None and last_update is not None and last_kept < last_update:
        warnings.warn(
            f"{path} holds rows up to update {last_kept} but the checkpoint is at update {last_update}: "
            f"the rows of updates {last_kept + 1}..{last_update} are missing (the file was cut short)",
            stacklevel=4,
        )
    if len(kept) != len(body):
        out = io.StringIO()
        csv.writer(out).writerows([header, *kept])
        atomic_write_text(path, out.getvalue())
    return header


def _quiet_tensorboard_writer_errors() -> None:
    """Keep TensorBoard's writer thread from printing a traceback when a write fails.

    The thread stores the error and TensorBoard raises it again in the main thread on the
    next event, where :class:`RunLogger` reports it as one :class:`WriteFailedError`.
    Installed once, for ``OSError`` in that thread only.
    """
    previous = threading.excepthook
    if getattr(previous, "_trpo_lab", False):
        return

    def hook(args: Any) -> None:
        if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError):
            return
        previous(args)

    hook._trpo_lab = True  # type: ignore[attr-defined]
    threading.excepthook = hook


class RunLogger:
    """Writes one row per update to ``progress.csv`` and TensorBoard, and drives a console bar.

    The logger holds the run directory (a :class:`FolderLock`, from construction to
    :meth:`close`): a second process logging into the same folder is refused with
    :class:`FolderLockedError` before it writes anything. Every failed write (a full disk, a
    read-only folder) raises :class:`WriteFailedError` naming the file.

    Args:
        run_dir: Folder of the run (created). ``None`` logs to the console only.
        total_timesteps: For the progress bar.
        progress_bar: Show a rich progress bar.
        tensorboard: Write TensorBoard events into ``run_dir``.
        resume: Append to an existing ``progress.csv`` instead of starting a new one.  Rows
            of updates after ``start_updates`` (logged by a run killed after its last
            checkpoint) and a row cut short by the kill are dropped first, atomically; their
            TensorBoard events are purged (hidden) from step ``start_timesteps + 1`` on. A
            damaged file is repaired with a warning (see :func:`_trim_progress`).
        start_timesteps: Where the progress bar starts (the checkpoint's timesteps).
        start_updates: Updates already done (the checkpoint's); ``None`` keeps every row.
        config_toml: Written to ``run_dir/config.toml`` (atomically) once the folder is held.
    """

    def __init__(
        self,
        run_dir: str | Path | None,
        total_timesteps: int,
        progress_bar: bool = False,
        tensorboard: bool = True,
        resume: bool = False,
        start_timesteps: int = 0,
        start_updates: int | None = None,
        config_toml: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._csv_file: TextIO | None = None
        self._csv_writer: Any = None
        self._columns: list[str] | None = None
        self._tb: Any = None
        self._progress: Any = None
        self._task: Any = None
        self._lock: FolderLock | None = None
        if self.run_dir is not None:
            self._lock = FolderLock(self.run_dir, "run directory").acquire()
            try:
                self._open_files(resume, tensorboard, start_timesteps, start_updates, config_toml)
            except BaseException:
                self.close(raise_errors=False)
                raise
        if progress_bar:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.completed:,.0f}/{task.total:,.0f} steps"),
                TextColumn("{task.fields[status]}"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(
                "training", total=total_timesteps, completed=start_timesteps, status=""
            )

    def _open_files(
        self, resume: bool, tensorboard: bool, start_timesteps: int, start_updates: int | None, config_toml: str | None
    ) -> None:
        assert self.run_dir is not None
        if config_toml is not None:
            atomic_write_text(self.run_dir / "config.toml", config_toml)
        csv_path = self.csv_path
        if resume and csv_path.exists():
            self._columns = _trim_progress(csv_path, start_updates)
        with _writing(csv_path):
            self._csv_file = csv_path.open("a" if resume and self._columns is not None else "w", newline="")
        if self._columns is not None:
            self._csv_writer = csv.writer(self._csv_file)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            _quiet_tensorboard_writer_errors()
            # A resumed run hides (TensorBoard's SessionLog.START purge) every event of the
            # interrupted one logged after the checkpoint's timestep: those updates are redone.
            purge_step = start_timesteps + 1 if resume else None
            with _writing(self._events_path()):
                self._tb = SummaryWriter(log_dir=str(self.run_dir), purge_step=purge_step)

    @property
    def csv_path(self) -> Path:
        assert self.run_dir is not None
        return self.run_dir / "progress.csv"

    def _events_path(self) -> Path:
        """This process's TensorBoard event file (named after the pid by TensorBoard), for messages."""
        assert self.run_dir is not None
        mine = sorted(self.run_dir.glob(f"events.out.tfevents.*.{os.getpid()}.*"))
        return mine[-1] if mine else self.run_dir / "events.out.tfevents.*"

    def _columns_for(self, metrics: Mapping[str, float]) -> list[str]:
        headline_keys = set(CSV_HEADLINE.values())
        rest = sorted(k for k in metrics if k not in headline_keys)
        return list(CSV_HEADLINE) + rest

    def log(self, metrics: Mapping[str, float]) -> None:
        """Record one update's metrics (keys grouped like ``train/kl``).

        Raises:
            WriteFailedError: ``progress.csv`` or the TensorBoard events could not be written.
        """
        step = int(metrics.get("time/timesteps", 0))
        if self._csv_file is not None:
            with _writing(self.csv_path):
                if self._columns is None:
                    self._columns = self._columns_for(metrics)
                    self._csv_writer = csv.writer(self._csv_file)
                    self._csv_writer.writerow(self._columns)
                row = [_format(metrics.get(CSV_HEADLINE.get(col, col), float("nan"))) for col in self._columns]
                self._csv_writer.writerow(row)
                self._csv_file.flush()
        if self._tb is not None:
            with _writing(self._events_path()):
                for key, value in metrics.items():
                    if isinstance(value, (int, float)) and math.isfinite(value):
                        self._tb.add_scalar(key, value, step)
        if self._progress is not None:
            ret = metrics.get("rollout/return_mean", float("nan"))
            status = f"return {ret:8.2f}" if math.isfinite(ret) else ""
            status += f"  {metrics.get('time/fps', 0.0):,.0f} steps/s"
            self._progress.update(self._task, completed=step, status=status)

    def sync(self) -> None:
        """Flush ``progress.csv`` to disk (called before each checkpoint, so the rows up to it survive a crash)."""
        if self._csv_file is not None:
            with _writing(self.csv_path):
                self._csv_file.flush()
                os.fsync(self._csv_file.fileno())
        if self._tb is not None:
            with _writing(self._events_path()):
                self._tb.flush()

    def close(self, raise_errors: bool = True) -> None:
        """Close the files and let the run directory go; a failed final flush raises
        :class:`WriteFailedError` after everything is closed (unless ``raise_errors=False``)."""
        errors: list[WriteFailedError] = []
        if self._csv_file is not None:
            csv_file, self._csv_file = self._csv_file, None
            try:
                with _writing(self.csv_path):
                    csv_file.close()
            except WriteFailedError as exc:
                errors.append(exc)
        if self._tb is not None:
            tb, self._tb = self._tb, None
            try:
                with _writing(self._events_path()):
                    tb.close()
            except WriteFailedError as exc:
                errors.append(exc)
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if errors and raise_errors:
            raise errors[0]

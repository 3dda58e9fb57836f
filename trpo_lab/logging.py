"""Run logging: ``progress.csv``, TensorBoard events and a console progress bar.

Metric keys are grouped (``rollout/return_mean``, ``train/kl``, ``time/fps``).  The
CSV has one row per update; its first columns are the ones DESIGN.md promises
(``timesteps,episodes,return_mean,kl,fps,wall_s``), followed by every other
metric under its grouped name.
"""

from __future__ import annotations

import csv
import io
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

__all__ = ["RunLogger", "CSV_HEADLINE", "TIMING_COLUMNS", "atomic_write_bytes", "atomic_write_text"]

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
TIMING_COLUMNS = ("fps", "wall_s", "time/update_s", "time/rollout_s")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, fsync and rename.

    A reader (or a crash) sees the old file or the new one, never a mix; the folder is
    fsynced too, so the rename itself survives a power cut (POSIX).
    """
    path = Path(path)
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


def _format(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return repr(value)
    return str(value)


def _trim_progress(path: Path, last_update: int | None) -> list[str] | None:
    """Keep the header and the complete rows up to ``last_update``; return the header."""
    text = path.read_text()
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if not rows:
        return None
    header, body = rows[0], rows[1:]
    torn = bool(body) and not text.endswith("\n")  # the last row was cut short mid-write
    kept = [row for row in (body[:-1] if torn else body) if len(row) == len(header)]
    if last_update is not None and "updates" in header:
        col = header.index("updates")
        kept = [row for row in kept if row[col] and float(row[col]) <= last_update]
    if len(kept) != len(body):
        out = io.StringIO()
        csv.writer(out).writerows([header, *kept])
        atomic_write_text(path, out.getvalue())
    return header


class RunLogger:
    """Writes one row per update to ``progress.csv`` and TensorBoard, and drives a console bar.

    Args:
        run_dir: Folder of the run (created). ``None`` logs to the console only.
        total_timesteps: For the progress bar.
        progress_bar: Show a rich progress bar.
        tensorboard: Write TensorBoard events into ``run_dir``.
        resume: Append to an existing ``progress.csv`` instead of starting a new one.  Rows
            of updates after ``start_updates`` (logged by a run killed after its last
            checkpoint) and a row cut short by the kill are dropped first, atomically; their
            TensorBoard events are purged (hidden) from step ``start_timesteps + 1`` on.
        start_timesteps: Where the progress bar starts (the checkpoint's timesteps).
        start_updates: Updates already done (the checkpoint's); ``None`` keeps every row.
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
    ) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._csv_file: TextIO | None = None
        self._csv_writer: Any = None
        self._columns: list[str] | None = None
        self._tb: Any = None
        self._progress: Any = None
        self._task: Any = None
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            csv_path = self.run_dir / "progress.csv"
            if resume and csv_path.exists():
                self._columns = _trim_progress(csv_path, start_updates)
            self._csv_file = csv_path.open("a" if resume else "w", newline="")
            if self._columns is not None:
                self._csv_writer = csv.writer(self._csv_file)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                # A resumed run hides (TensorBoard's SessionLog.START purge) every event of the
                # interrupted one logged after the checkpoint's timestep: those updates are redone.
                purge_step = start_timesteps + 1 if resume else None
                self._tb = SummaryWriter(log_dir=str(self.run_dir), purge_step=purge_step)
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

    def _columns_for(self, metrics: Mapping[str, float]) -> list[str]:
        headline_keys = set(CSV_HEADLINE.values())
        rest = sorted(k for k in metrics if k not in headline_keys)
        return list(CSV_HEADLINE) + rest

    def log(self, metrics: Mapping[str, float]) -> None:
        """Record one update's metrics (keys grouped like ``train/kl``)."""
        step = int(metrics.get("time/timesteps", 0))
        if self._csv_file is not None:
            if self._columns is None:
                self._columns = self._columns_for(metrics)
                self._csv_writer = csv.writer(self._csv_file)
                self._csv_writer.writerow(self._columns)
            row = [_format(metrics.get(CSV_HEADLINE.get(col, col), float("nan"))) for col in self._columns]
            self._csv_writer.writerow(row)
            self._csv_file.flush()
        if self._tb is not None:
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
            self._csv_file.flush()
            os.fsync(self._csv_file.fileno())
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._csv_file is not None:
            self._csv_file.close()
            self._csv_file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

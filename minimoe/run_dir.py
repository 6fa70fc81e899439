"""A training run's directory (train.out_dir): who may write it, what it holds, and its metrics log.

    out_dir/checkpoint.bin        the last checkpoint (checkpoint.py; with expert parallelism also its parts)
    out_dir/metrics.jsonl         one JSON record per line: {"step", "train_loss", ...} or {"step", "val_loss"}
    out_dir/.lock                 held (flock) by the process writing the run, and holding its pid

Rules that keep finished work safe:
- One writer. A run holds an exclusive lock on out_dir/.lock while it trains; a second run on the same
  directory is refused with the first one's pid. The operating system releases the lock when the
  process ends, however it ends, so a killed run never leaves the directory locked.
- No silent overwrite. A new run refuses a directory that already holds a run, unless it continues it
  (--resume) or the user asks to start it over (--overwrite, which deletes the old run's files).
- The log never lags the checkpoint. metrics.jsonl is rewritten whole and atomically *before* each
  checkpoint, so it holds at least every record up to the checkpoint's step; a resume keeps the records
  up to that step and drops the rest. Reading skips a damaged line instead of failing on it.
- Temporary files of a killed save (.<name>.tmp-<pid>) are removed when the next run takes the lock.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from minimoe.checkpoint import write_atomically
from minimoe.config import ConfigError

CHECKPOINT_NAME = "checkpoint.bin"
METRICS_NAME = "metrics.jsonl"
LOSS_PLOT_NAME, EXPERT_LOAD_PLOT_NAME = "loss.png", "expert_load.png"  # written by `minimoe plot` (plot.py)
LOCK_NAME = ".lock"


@dataclass
class RunDir:
    path: Path
    lock: IO[str] | None = None  # the open lock file while this process holds the directory

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_NAME

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_NAME

    def run_files(self) -> list[Path]:
        """The files of a run in this directory: checkpoint, its expert parts, metrics and plots."""
        names = [CHECKPOINT_NAME, METRICS_NAME, LOSS_PLOT_NAME, EXPERT_LOAD_PLOT_NAME]
        return [self.path / name for name in names if (self.path / name).exists()] + sorted(
            self.path.glob(f"{CHECKPOINT_NAME}.step*.part*"))

    def claim(self, resume: bool, overwrite: bool) -> None:
        """Create and lock the directory for a run: continue the run in it (resume), replace it
        (overwrite), or start in a directory that holds none. ConfigError, with the way out, otherwise."""
        where = f"train.out_dir {str(self.path)!r}"
        if os.path.lexists(self.path) and not self.path.is_dir():
            raise ConfigError(f"{where} is a file, not a directory")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            lock = open(self.path / LOCK_NAME, "a+")
        except (OSError, ValueError) as error:  # ValueError: a NUL byte in the name
            raise ConfigError(f"{where} cannot be created or written ({getattr(error, 'strerror', None) or error})"
                              ) from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            lock.close()
            raise ConfigError(f"{where} is in use by another run (pid {holder}); wait for it to end or choose "
                              f"another train.out_dir") from None
        existing = self.run_files()
        if resume and not self.checkpoint.exists():
            lock.close()
            raise ConfigError(f"--resume: {where} holds no {CHECKPOINT_NAME} to continue")
        if not resume and existing and not overwrite:
            lock.close()
            raise ConfigError(f"{where} already holds a run ({', '.join(p.name for p in existing[:3])}); "
                              f"continue it with --resume, start it over with --overwrite, or choose another "
                              f"train.out_dir")
        self.lock = lock
        if not resume and existing:
            for path in existing:
                path.unlink()
        # Only a run that goes ahead changes the directory: its pid, and no temporaries of killed saves.
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        for stale in self.path.glob(".*.tmp-*"):  # no one else writes here while the lock is held
            stale.unlink(missing_ok=True)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.close()  # closing the descriptor releases the flock
            self.lock = None


def read_metrics(path: Path, up_to_step: int | None = None) -> tuple[list[dict[str, Any]], int]:
    """(the records of a metrics.jsonl, how many lines were skipped as damaged), keeping only records up
    to `up_to_step` when given. A line that is not a JSON object with an integer "step" (say, the partial
    last line of a killed write from an older version) is skipped, not fatal."""
    records, skipped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            skipped += 1
        elif up_to_step is None or record["step"] <= up_to_step:
            records.append(record)
    return records, skipped


def write_metrics(path: Path, records: list[dict[str, Any]]) -> None:
    write_atomically(path, [("\n".join(json.dumps(record) for record in records) + "\n").encode("utf-8")])

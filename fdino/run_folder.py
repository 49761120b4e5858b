"""A run folder's bookkeeping, so that nothing is lost and one process writes at a time.

- `RunLock`: an exclusive ``fcntl.flock`` on ``<run>/.fdino.lock``, held by the writing process
  (rank 0) for the whole job. The kernel drops the lock when its process ends, killed or not, so a
  lock never goes stale on a local file system (on NFS, Linux maps flock to POSIX locks, which the
  server releases when the client's lease ends). The file names the holder for the error message.
- ``run.json`` is written atomically (`atomic_write_text`) and, when it is missing or corrupt,
  rebuilt from the newest checkpoint, which holds a copy (`read_run_meta`).
- ``--overwrite`` moves the old run aside into ``<run>/.replaced-run/`` (`set_aside`) and deletes it
  only once the new run's first checkpoint is durable (`discard_replaced`); a new run that fails
  before that gets the old run back (`restore_replaced`), also after a kill (`recover`, at the next
  start in the folder).
- Temp files of saves that a kill interrupted are removed at the next start (`recover`).
- Config changes made at a resume (``fdino train --resume RUN --lr ...``) are recorded in run.json as
  ``{"step": N, "config": {...}, "skip_batches": K}`` (`config_at` replays them).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from .config import DinoConfig

LOCK_NAME = ".fdino.lock"
REPLACED = ".replaced-run"
_TEMP = re.compile(r"^\..+\.tmp-[^/]+$")  # `temp_name` files: ".<final name>.tmp-<host>-<pid>-<random>"

# Config fields `fdino train --resume` may change, as a recorded change at the checkpoint's step: they
# steer the optimization from there on (how fast, how hard, how sharp), not the model or the data.
RESUMABLE_CONFIG = (
    "lr",
    "min_lr",
    "weight_decay",
    "weight_decay_end",
    "clip_grad",
    "teacher_temp",
    "teacher_momentum",
)


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder's lock."""


def temp_name(path: Path) -> Path:
    """A temp file beside ``path``, unique across hosts, containers (all PID 1) and threads."""
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}")


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # makes a rename in the folder durable
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temp file, flush it to disk, rename it over ``path``: all or nothing."""
    tmp = temp_name(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


class RunLock:
    """``with RunLock(run_dir):`` this process alone writes ``run_dir``; else `RunFolderBusy` naming the holder."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "an unknown process"
            os.close(fd)
            raise RunFolderBusy(
                f"{self.run_dir} is in use by {holder}: one process writes a run folder at a time. Wait for it "
                "to finish or stop it (its lock goes when it ends, also when killed), or use another --run-dir"
            ) from None
        holder = f"pid {os.getpid()} on host {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock; the file stays (deleting it would race a new locker)
            self._fd = None


# --- the old run of an --overwrite ---------------------------------------------------------------------
def _entries(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.iterdir() if p.name not in (LOCK_NAME, REPLACED)]


def set_aside(run_dir: Path) -> None:
    """Move everything of the old run into ``.replaced-run/`` (renames in one folder: nothing is copied)."""
    aside = run_dir / REPLACED
    aside.mkdir()
    for entry in _entries(run_dir):
        entry.rename(aside / entry.name)
    fsync_dir(run_dir)


def discard_replaced(run_dir: Path) -> None:
    """The new run has a durable checkpoint: the old one goes."""
    shutil.rmtree(run_dir / REPLACED, ignore_errors=True)


def restore_replaced(run_dir: Path) -> bool:
    """Put the set-aside old run back, dropping what the new run wrote; False when nothing was set aside."""
    aside = run_dir / REPLACED
    if not aside.is_dir():
        return False
    for entry in _entries(run_dir):
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    for entry in aside.iterdir():
        entry.rename(run_dir / entry.name)
    aside.rmdir()
    fsync_dir(run_dir)
    return True


def recover(run_dir: Path, has_checkpoint) -> None:
    """At the start of a job in ``run_dir`` (lock held): clean up after a process that was killed.

    Removes temp files of interrupted saves; settles an interrupted ``--overwrite``: if the new run
    reached a checkpoint the old run is discarded, else the old run is restored.
    ``has_checkpoint(run_dir)`` says whether the folder holds a checkpoint of its own.
    """
    for entry in run_dir.iterdir():
        if _TEMP.match(entry.name) and entry.is_file():
            entry.unlink()
    if (run_dir / REPLACED).is_dir():
        if has_checkpoint(run_dir):
            discard_replaced(run_dir)
        else:
            restore_replaced(run_dir)
            warnings.warn(
                f"{run_dir}: an --overwrite run ended before its first checkpoint; the run it replaced is restored",
                stacklevel=2,
            )


# --- run.json --------------------------------------------------------------------------------------------
def write_run_meta(run_dir: Path, meta: dict[str, Any]) -> None:
    atomic_write_text(run_dir / "run.json", json.dumps(meta, indent=2) + "\n")


def _valid_meta(meta: Any) -> bool:
    return isinstance(meta, dict) and isinstance(meta.get("config"), dict) and isinstance(meta.get("options"), dict)


def read_run_meta(run_dir: Path, from_checkpoint) -> dict[str, Any]:
    """run.json, or (missing or corrupt) the copy in the newest checkpoint holding one, written back.

    ``from_checkpoint(run_dir)`` returns that copy or None.
    """
    path = run_dir / "run.json"
    problem = "is missing"
    if path.exists():
        try:
            meta = json.loads(path.read_text())
            if _valid_meta(meta):
                return meta
            problem = "lacks its config or options"
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            problem = f"is corrupt ({err})"
    meta = from_checkpoint(run_dir)
    if not _valid_meta(meta):
        raise FileNotFoundError(
            f"{path} {problem} and no checkpoint in {run_dir} holds a copy: it is not a resumable fdino run folder"
        )
    warnings.warn(f"{path} {problem}; rebuilt it from the newest checkpoint's copy", stacklevel=2)
    write_run_meta(run_dir, meta)
    return meta


def config_at(meta: dict[str, Any], step: int) -> DinoConfig:
    """The run's config after the changes recorded at resumes up to ``step``."""
    values = dict(meta["config"])
    for change in meta.get("changes", ()):
        if change["step"] <= step:
            values.update(change.get("config", {}))
    return DinoConfig.from_dict(values)


def with_change(meta: dict[str, Any], step: int, config: dict[str, Any], skip_batches: int) -> dict[str, Any]:
    """``meta`` plus a change at ``step``; changes recorded past ``step`` belonged to a future this resume drops."""
    for name in config:
        if name not in RESUMABLE_CONFIG:
            raise ValueError(
                f"--resume cannot change {name!r} (it changes the model or the data); it can change "
                f"{', '.join(RESUMABLE_CONFIG)} and skip batches with --skip-batches"
            )
    kept = [c for c in meta.get("changes", ()) if c["step"] <= step]
    change = {"step": step, "config": dict(config), "skip_batches": int(skip_batches), "time": time.time()}
    return {**meta, "changes": [*kept, change]}


__all__ = [
    "LOCK_NAME",
    "REPLACED",
    "RESUMABLE_CONFIG",
    "RunFolderBusy",
    "RunLock",
    "atomic_write_text",
    "config_at",
    "discard_replaced",
    "read_run_meta",
    "recover",
    "restore_replaced",
    "set_aside",
    "temp_name",
    "with_change",
    "write_run_meta",
]

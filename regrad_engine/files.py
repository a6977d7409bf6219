"""Atomic file writes: a temporary file beside the target, fsynced, then renamed into place,
so a crash leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


TMP_SUFFIX = ".tmp"  # atomic_write's temporary file is the target's name + this; a kill can leave one behind


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[Path], Any]) -> None:
    """Replace ``path`` with ``data`` (bytes, text as UTF-8, or a function that writes the
    temporary path it is given, e.g. ``safetensors.torch.save_file``)."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.write_bytes(b"" if callable(data) else data.encode("utf-8") if isinstance(data, str) else data)
    if callable(data):
        mode = tmp.stat().st_mode & 0o777  # what the umask gives a new file
        data(tmp)
        os.chmod(tmp, mode)  # safetensors creates 0600 files: keep shards as readable as the manifest
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in ``path`` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 1) -> None:
    """Replace ``path`` with ``obj`` as JSON."""
    atomic_write(path, json.dumps(obj, indent=indent, ensure_ascii=False))


class LockHeld(Exception):
    """Raised by :meth:`WriterLock.acquire` when another writer holds the lock."""

    def __init__(self, path: Path, holder: dict) -> None:
        super().__init__(f"{path} is held by {describe_holder(holder)}")
        self.path, self.holder = path, holder


def describe_holder(holder: dict) -> str:
    if not holder:
        return "another process (it left no details)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"pid {holder.get('pid')} on host {holder.get('host')} (since {since})"


class WriterLock:
    """One writer at a time for a directory: an exclusive OS file lock (``filelock``), plus
    the holder's pid, host and start time in ``<name>.json`` so a second writer is told who
    holds it. The OS drops the lock when its process dies, so a killed writer leaves no stale
    lock (its holder file is simply overwritten by the next writer)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._info = self.path.with_name(self.path.name + ".json")
        self._lock = FileLock(str(self.path), timeout=0, thread_local=False)

    @property
    def held(self) -> bool:
        return self._lock.is_locked

    def acquire(self) -> None:
        """Take the lock now or raise :class:`LockHeld` naming the holder."""
        if self.held:
            return
        try:
            self._lock.acquire()
        except Timeout:
            raise LockHeld(self.path, self.holder()) from None
        try:
            atomic_write_json(self._info, {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        except BaseException:
            self._lock.release()  # never hold a lock the caller does not know it has
            raise

    def holder(self) -> dict:
        try:
            return json.loads(self._info.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self.held:
            self._info.unlink(missing_ok=True)
            self._lock.release()

"""Atomic file writes: a temporary file beside the target, fsynced, then renamed into place,
so a crash leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[Path], Any]) -> None:
    """Replace ``path`` with ``data`` (bytes, text as UTF-8, or a function that writes the
    temporary path it is given, e.g. ``safetensors.torch.save_file``)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if callable(data):
        data(tmp)
    else:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    fsync_file(tmp)
    os.replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 1) -> None:
    """Replace ``path`` with ``obj`` as JSON."""
    atomic_write(path, json.dumps(obj, indent=indent, ensure_ascii=False))
